"""The op registry, backend selection, the fake/autograd plumbing and `python -m vlmkernels`."""

import logging
import os
import subprocess
import sys

import pytest
import torch

import vlmkernels
from vlmkernels import library, registry
from vlmkernels.schemas import FAMILIES, SCHEMAS, SERVED_BY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_schema_is_a_torch_op_in_the_vlmkernels_namespace():
    for name, (family, _) in SCHEMAS.items():
        assert family in FAMILIES
        packet = getattr(torch.ops.vlmkernels, name)
        assert packet.default._schema.name == f"vlmkernels::{name}"
        # the trailing `backend` argument lets callers force an implementation
        assert packet.default._schema.arguments[-1].name == "backend"


def test_every_op_has_a_fake_and_a_reference_backend():
    from torch._library.simple_registry import singleton

    for name in SCHEMAS:
        entry = singleton.find(library.qualname(name))
        assert entry.fake_impl.kernel is not None, f"{name} has no fake (meta) implementation"
        assert "reference" in registry.ops()[name].impls, f"{name} has no reference backend"


def test_every_op_is_in_the_functional_api():
    missing = [n for n in SCHEMAS if not hasattr(vlmkernels.ops, SERVED_BY.get(n, n))]
    assert not missing, f"ops without a vlmkernels.ops function: {missing}"


def test_backends_table_reports_reasons():
    table = vlmkernels.backends()
    assert set(table) == set(SCHEMAS)
    for op, row in table.items():
        assert set(row) == set(registry.BACKENDS)
        assert row["reference"]["cpu"] == "yes"
        # a CUDA kernel never claims CPU tensors, and says why
        assert row["cuda"]["cpu"] != "yes" and row["cuda"]["cpu"]
    assert "moe_topk_route" in vlmkernels.format_backends(table)


def test_forcing_an_unavailable_backend_raises_clearly():
    with pytest.raises(vlmkernels.BackendUnavailableError, match="cuda.*unavailable"):
        registry.select("moe_topk_route", "cuda", "cpu")
    with pytest.raises(ValueError, match="backend must be"):
        registry.select("moe_topk_route", "fastest", "cpu")


def test_env_backend_is_honoured(monkeypatch):
    monkeypatch.setenv("VLMKERNELS_BACKEND", "reference")
    name, _ = registry.select("moe_topk_route", "auto", "cpu")
    assert name == "reference"
    monkeypatch.setenv("VLMKERNELS_BACKEND", "cuda")
    with pytest.raises(vlmkernels.BackendUnavailableError):
        registry.select("moe_topk_route", "auto", "cpu")
    # an explicit argument wins over the environment
    assert registry.select("moe_topk_route", "reference", "cpu")[0] == "reference"


def test_auto_logs_its_choice_once(caplog, monkeypatch):
    monkeypatch.delenv("VLMKERNELS_BACKEND", raising=False)
    monkeypatch.setattr(registry, "_LOGGED", set())
    with caplog.at_level(logging.INFO, logger="vlmkernels"):
        first = registry.select("moe_align_block_size", "auto", "cpu")[0]
        registry.select("moe_align_block_size", "auto", "cpu")
    msgs = [r.getMessage() for r in caplog.records if "auto selected" in r.getMessage()]
    assert len(msgs) == 1 and first in msgs[0]


def test_auto_prefers_the_compiled_cpu_kernel_when_built():
    from vlmkernels import _ext

    name, _ = registry.select("moe_topk_route", "auto", "cpu")
    assert name == ("cpu" if _ext.C is not None else "reference")


def test_python_m_vlmkernels_reports_the_build():
    out = subprocess.run([sys.executable, "-m", "vlmkernels"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, check=True).stdout
    assert f"vlmkernels   {vlmkernels.__version__}" in out
    for mod in ("torch", "triton", "transformers"):
        assert mod in out
    assert "CUDA archs" in out or "not built" in out
    assert "device" in out
    assert "moe_topk_route" in out and "reference" in out


def test_compiled_extension_reports_its_archs():
    from vlmkernels import _ext

    C = _ext.require()
    assert isinstance(C.with_cuda, bool)
    if C.with_cuda:  # built here by `make build` with the sm_90 compile-only default
        assert _ext.cuda_archs() and all(a for a in _ext.cuda_archs())
