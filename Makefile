# `make test` and `make bench` set up .venv from nothing (or reuse it), build vlmkernels._C
# (CUDA part included wherever nvcc exists) and run.
PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.deps-installed
DEPS   := torch==2.14.1 torchvision==0.29.1 triton "transformers>=5.17" numpy pytest pytest-benchmark \
          hypothesis pybind11 ninja pillow matplotlib "setuptools>=70" wheel "peft>=0.21" bitsandbytes
export MAX_JOBS ?= 2
# setup.py finds the CUDA toolkit itself (CUDA_HOME, /usr/local/cuda, or the nvcc on PATH)
# CUDA compile-only build here: sm_90 unless the caller says otherwise
export TORCH_CUDA_ARCH_LIST ?= 9.0
PYTEST_ARGS ?=
# ccache, when installed, makes rebuilds of unchanged sources near-instant
CCACHE := $(shell command -v ccache 2>/dev/null)
NVCC_BIN := $(firstword $(wildcard $(CUDA_HOME)/bin/nvcc) $(wildcard /usr/local/cuda/bin/nvcc))
ifneq ($(CCACHE),)
export PATH := /usr/lib/ccache:$(PATH)
# paths relative to the checkout, so that another clone of the repo hits the same cache entries
export CCACHE_BASEDIR ?= $(CURDIR)
export CCACHE_NOHASHDIR ?= 1
ifneq ($(NVCC_BIN),)
export PYTORCH_NVCC ?= ccache $(NVCC_BIN)
endif
endif

.PHONY: venv build test bench bench-full cmake-build clean

venv: $(STAMP)
$(STAMP):
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q $(DEPS)
	touch $(STAMP)

# In-place build: ninja rebuilds only what changed; the repo root is then importable as is.
build: $(STAMP)
	$(VPY) setup.py -q build_ext --inplace

test: build
	TRITON_INTERPRET=1 VLMKERNELS_REQUIRE_EXT=1 $(VPY) -m pytest -q tests $(PYTEST_ARGS)

bench: build
	$(VPY) -m bench $(BENCH_ARGS)

bench-full: build
	$(VPY) -m bench --full $(BENCH_ARGS)

cmake-build: $(STAMP)
	cmake -S . -B .cmake-build -DCMAKE_PREFIX_PATH="$$($(VPY) -c 'import torch;print(torch.utils.cmake_prefix_path)')" \
	  -DPython_EXECUTABLE=$(abspath $(VPY)) && cmake --build .cmake-build -j $(MAX_JOBS)

clean:
	rm -rf build .cmake-build vlmkernels/_C*.so *.egg-info
