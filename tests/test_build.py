"""Installability: a CPU-only pip install (VLMKERNELS_NO_CUDA=1) and the CMake build of the same sources.

Both build from a copy of the tracked tree in a temporary folder, so they never disturb the
in-place build the rest of the suite uses. ccache (when present) keeps reruns quick.
"""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def _copy_tree(dst):
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        if f.startswith(("bench/results/",)) or not os.path.isfile(os.path.join(ROOT, f)):
            continue
        os.makedirs(os.path.join(dst, os.path.dirname(f)), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, f), os.path.join(dst, f))
    return dst


def _env(src):
    env = dict(os.environ, MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    env.pop("TRITON_INTERPRET", None)
    env.pop("CXX", None)
    if os.path.isdir("/usr/lib/ccache"):
        # ccache's compiler symlinks first on PATH; relative paths and no cwd in the hash let the
        # temporary copy hit the cache entries of earlier runs
        env.update(PATH="/usr/lib/ccache:" + env["PATH"], CCACHE_BASEDIR=str(src), CCACHE_NOHASHDIR="1")
    return env


def test_cpu_only_pip_install_works_and_reports_itself(tmp_path):
    src = _copy_tree(tmp_path / "src")
    target = tmp_path / "site"
    env = _env(src)
    env["VLMKERNELS_NO_CUDA"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "--no-index",
         "--target", str(target), str(src)],
        env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_env = dict(env, PYTHONPATH=str(target))
    out = subprocess.run([sys.executable, "-m", "vlmkernels"], cwd=tmp_path, env=run_env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "CUDA archs: none (CPU-only build)" in out.stdout
    assert str(target) in subprocess.run(
        [sys.executable, "-c", "import vlmkernels._C as c; print(c.__file__)"], cwd=tmp_path, env=run_env,
        capture_output=True, text=True, check=True).stdout


def test_setup_explains_a_cpu_only_build(tmp_path):
    """The build prints one line saying why CUDA is skipped."""
    src = _copy_tree(tmp_path / "src")
    env = dict(_env(src), VLMKERNELS_NO_CUDA="1")
    proc = subprocess.run([sys.executable, "setup.py", "--name"], cwd=src, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("vlmkernels")
    assert "[vlmkernels build] building the CPU kernels only: VLMKERNELS_NO_CUDA=1 is set" in proc.stderr


def test_force_cuda_fails_loudly_when_cuda_cannot_be_built(tmp_path):
    src = _copy_tree(tmp_path / "src")
    env = dict(_env(src), VLMKERNELS_NO_CUDA="1", VLMKERNELS_FORCE_CUDA="1")
    proc = subprocess.run([sys.executable, "setup.py", "--name"], cwd=src, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0
    assert "VLMKERNELS_FORCE_CUDA=1 but CUDA cannot be built" in proc.stderr + proc.stdout


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_builds_the_cpu_kernels(tmp_path):
    import torch

    src = _copy_tree(tmp_path / "src")
    build = tmp_path / "build"
    env = _env(src)
    cfg = ["cmake", "-S", str(src), "-B", str(build), "-DVLMK_CUDA=OFF",
           f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", f"-DPython_EXECUTABLE={sys.executable}"]
    proc = subprocess.run(cfg, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    proc = subprocess.run(["cmake", "--build", str(build), "-j", env["MAX_JOBS"]], env=env, capture_output=True,
                          text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the CMake-built module loads and carries the same bindings as the setup.py build
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import torch; import _C; "
            "print(sorted(n for n in dir(_C) if not n.startswith('__')))")
    out = subprocess.run([sys.executable, "-c", code, str(build / "vlmkernels")], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    from vlmkernels import _ext

    expected = sorted(n for n in dir(_ext.require()) if not n.startswith("__"))
    got = eval(out.stdout.strip().splitlines()[-1])
    assert "with_cuda" in got
    cpu_only = [n for n in expected if "cuda" not in n]
    assert set(cpu_only) <= set(got), set(cpu_only) - set(got)
