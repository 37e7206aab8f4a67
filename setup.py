"""Builds vlmkernels._C from csrc/: C++ CPU kernels always, CUDA kernels where nvcc and a CUDA torch exist.

Environment:
  VLMKERNELS_NO_CUDA=1     build the CPU part only
  VLMKERNELS_FORCE_CUDA=1  fail loudly when the CUDA part cannot be built
  TORCH_CUDA_ARCH_LIST     archs to build when no GPU is visible (default: 9.0, compile-only)
  MAX_JOBS                 parallel compile jobs (honoured by torch's ninja backend)
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"


def say(msg: str) -> None:
    print(f"[vlmkernels build] {msg}", file=sys.stderr, flush=True)


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def cuda_plan(torch, cpp_extension) -> tuple[bool, str, str]:
    """(build_cuda, arch_list, why) for this machine."""
    if _flag("VLMKERNELS_NO_CUDA"):
        return False, "", "VLMKERNELS_NO_CUDA=1 is set"
    if torch.version.cuda is None:
        return False, "", f"torch {torch.__version__} is a CPU-only build"
    home = cpp_extension.CUDA_HOME
    nvcc = os.path.join(home, "bin", "nvcc") if home else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        return False, "", "no nvcc found (set CUDA_HOME to the toolkit root that holds bin/nvcc)"
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        archs = ";".join(f"{a}.{b}" for a, b in caps)
        return True, archs, f"local GPU(s): {archs}"
    env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if env:
        return True, env, f"TORCH_CUDA_ARCH_LIST={env}"
    return True, "9.0", "no GPU visible: compile-only build for sm_90"


def wheel_cuda_includes(cuda_home: str) -> list[str]:
    """Headers (cusparse.h, ...) that pip's nvidia wheels ship and a bare toolkit lacks.

    Only the missing entries are linked into build/cuda-extra-include, so that the toolkit's own
    headers always win and versions never mix.
    """
    try:
        import nvidia  # type: ignore

        roots = [d for r in nvidia.__path__ for d in sorted(glob.glob(os.path.join(r, "*", "include")))]
    except Exception:
        return []
    have = set(os.listdir(os.path.join(cuda_home, "include"))) if cuda_home else set()
    extra = os.path.join(ROOT, "build", "cuda-extra-include")
    os.makedirs(extra, exist_ok=True)
    for root in roots:
        for name in os.listdir(root):
            dst = os.path.join(extra, name)
            if name not in have and not os.path.lexists(dst):
                os.symlink(os.path.join(root, name), dst)
    return [extra]


def find_cuda_home() -> None:
    """Point CUDA_HOME at the toolkit root holding bin/nvcc and lib64 (nvcc on PATH may be a wrapper)."""
    def ok(d):
        return d and os.path.exists(os.path.join(d, "bin", "nvcc")) and os.path.isdir(os.path.join(d, "lib64"))

    if ok(os.environ.get("CUDA_HOME")):
        return
    cands = ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for d in cands:
        if ok(d):
            os.environ["CUDA_HOME"] = d
            return


def extensions():
    find_cuda_home()
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        say("torch is not installed: skipping vlmkernels._C (install torch, then reinstall with --no-build-isolation)")
        return [], {}

    cpu_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/ops/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    build_cuda, archs, why = cuda_plan(torch, cpp_extension)
    if not build_cuda and _flag("VLMKERNELS_FORCE_CUDA"):
        raise SystemExit(f"[vlmkernels build] VLMKERNELS_FORCE_CUDA=1 but CUDA cannot be built: {why}")

    # -fopenmp: ATen's at::parallel_for (OpenMP backend) only runs in parallel when the caller is
    # compiled with OpenMP; otherwise every CPU kernel runs on one thread. libgomp is torch's own.
    cxx = ["-O3", "-std=c++20", "-fvisibility=hidden", "-fopenmp"]
    link = ["-fopenmp"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    if build_cuda:
        say(f"building CPU and CUDA kernels; archs {archs} ({why})")
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        defines = ["-DVLMK_WITH_CUDA", f'-DVLMK_CUDA_ARCHS="{archs}"']
        nvcc = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"] + defines
        include_dirs += wheel_cuda_includes(cpp_extension.CUDA_HOME)
        ext = cpp_extension.CUDAExtension(
            "vlmkernels._C",
            cpu_sources + cuda_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx + defines, "nvcc": nvcc},
            extra_link_args=link,
        )
    else:
        say(f"building the CPU kernels only: {why}")
        ext = cpp_extension.CppExtension(
            "vlmkernels._C", cpu_sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx},
            extra_link_args=link,
        )
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None or _has_ninja_module())
    return [ext], {"build_ext": build_ext}


def _has_ninja_module() -> bool:
    try:
        import ninja  # noqa: F401

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        return True
    except Exception:
        return False


ext_modules, cmdclass = extensions()

setup(
    name="vlmkernels",
    version=VERSION,
    description="Fused GPU kernels for vision-language models",
    packages=find_packages(include=["vlmkernels", "vlmkernels.*", "python_ref", "python_ref.*"]),
    package_data={"vlmkernels": ["configs/*.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "numpy"],
    extras_require={"hf": ["transformers>=5.17", "torchvision"], "test": ["pytest", "pytest-benchmark", "hypothesis"]},
)
