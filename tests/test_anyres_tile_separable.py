"""The CUDA anyres_tile kernel's device code, run on the host, against Pillow (bit-exact).

csrc/cuda/anyres_tile.cu (everything above its host launcher) is compiled with the system C++
compiler against a small shim: one std::thread per CUDA thread, a std::barrier for __syncthreads,
a heap buffer of exactly the dynamic shared-memory size (so the block plans are the device's). The
tap tables are built as cuda/anyres_tile_host.cpp builds them. The reference op is Pillow-exact and
the C++ CPU kernel matches it (tests/test_anyres_tile.py), so this ties the GPU arithmetic (both
pass orders, staged and global-memory blocks, chunking, dp4a weight planes, padding, layouts) to
the CPU kernel's on machines without a GPU.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KERNEL = ROOT / "csrc" / "cuda" / "anyres_tile.cu"
MARKER = "// ---- host launcher"
CXX = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")

pytestmark = [
    pytest.mark.skipif(int(PIL.__version__.split(".")[0]) < 13, reason="Pillow >= 13 picks the pass order"),
    pytest.mark.skipif(CXX is None or sys.platform == "win32", reason="needs a C++20 compiler"),
]

SHIM = r"""
#pragma once
#include <algorithm>
#include <barrier>
#include <cstdint>
#include <cstdlib>
#define __device__
#define __global__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__
struct dim3 { unsigned x = 0, y = 0, z = 0; };
inline thread_local dim3 threadIdx, blockIdx;
inline std::barrier<>* g_bar = nullptr;
inline void __syncthreads() { g_bar->arrive_and_wait(); }
inline uint8_t* g_smem = nullptr;
struct uint4 { unsigned x, y, z, w; };
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
using std::max;
using std::min;
"""

HARNESS = r"""
#include "shim.h"
#include <fstream>
#include <string>
#include <thread>
#include <vector>
#include "common/anyres_resample.h"
#include "common/anyres_tile_desc.h"
#include "kernel.inc"

using namespace vlmk::anyres;

template <typename T>
void run(const std::vector<ImageDesc>& d, const std::vector<TileDesc>& t, const std::vector<int32_t>& taps, int S,
         int smem, Norm norm, std::vector<T>& out) {
  const int stripes = (S + kTileX - 1) / kTileX, bands = (S + kTileY - 1) / kTileY;
  const int64_t blocks = int64_t(t.size()) * stripes * bands;
  std::barrier<> bar(kThreads);
  g_bar = &bar;
  std::vector<std::thread> th;
  for (int i = 0; i < kThreads; ++i)
    th.emplace_back([&, i] {
      threadIdx.x = unsigned(i);
      for (int64_t b = 0; b < blocks; ++b) {
        blockIdx.x = unsigned(b);
        anyres_tile_kernel<T>(d.data(), t.data(), taps.data(), S, stripes, bands, smem, norm, out.data());
        bar.arrive_and_wait();
      }
    });
  for (auto& x : th) x.join();
}

// argv: spec out. spec: n S global_view f32 num_tiles smem / mean x3 / std x3 / per image:
// path offset h w c stride_h stride_w stride_c res_h res_w pad_t pad_l rows cols first
int main(int, char** argv) {
  std::ifstream in(argv[1]);
  int n, S, gv, f32, num_tiles, smem;
  in >> n >> S >> gv >> f32 >> num_tiles >> smem;
  Norm norm;
  for (float& m : norm.mean) in >> m;
  for (float& s : norm.stdv) in >> s;
  std::vector<ImageDesc> descs(n);
  std::vector<TileDesc> tiles(num_tiles, TileDesc{-1, 0, 0, 0});
  std::vector<int32_t> taps;
  std::vector<std::vector<uint8_t>> bufs(n);
  for (int i = 0; i < n; ++i) {
    std::string path;
    int64_t off, h, w, c, sh, sw, sc, rh, rw, pt, pl, rows, cols, first;
    in >> path >> off >> h >> w >> c >> sh >> sw >> sc >> rh >> rw >> pt >> pl >> rows >> cols >> first;
    std::ifstream f(path, std::ios::binary);
    bufs[i].assign(std::istreambuf_iterator<char>(f), {});
    ImageDesc& d = descs[i];
    d = ImageDesc{};
    d.src = reinterpret_cast<int64_t>(bufs[i].data() + off);
    d.stride_h = sh, d.stride_w = sw, d.stride_c = sc;
    d.h = int32_t(h), d.w = int32_t(w), d.c = int32_t(c);
    d.pad_t = int32_t(pt), d.pad_l = int32_t(pl), d.rows = int32_t(rows), d.cols = int32_t(cols);
    d.grid = make_resize(taps, d.h, d.w, int(rh), int(rw));
    int64_t slot = first;
    if (gv) {
      d.whole = make_resize(taps, d.h, d.w, S, S);
      tiles[slot++] = TileDesc{int32_t(i), 0, 0, 0};
    }
    for (int32_t r = 0; r < d.rows; ++r)
      for (int32_t col = 0; col < d.cols; ++col) tiles[slot++] = TileDesc{int32_t(i), 1, r, col};
  }
  g_smem = static_cast<uint8_t*>(std::aligned_alloc(16, (size_t(smem) + 15) / 16 * 16));
  std::ofstream o(argv[2], std::ios::binary);
  const size_t total = size_t(num_tiles) * 3 * S * S;
  if (f32) {
    std::vector<float> out(total, -1000.f);
    run(descs, tiles, taps, S, smem, norm, out);
    o.write(reinterpret_cast<const char*>(out.data()), std::streamsize(total * 4));
  } else {
    std::vector<uint8_t> out(total, 77);  // slots without an image must stay untouched
    run(descs, tiles, taps, S, smem, norm, out);
    o.write(reinterpret_cast<const char*>(out.data()), std::streamsize(total));
  }
  std::free(g_smem);
}
"""

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
SMEM = 96 * 1024  # the kernel's kSmemMax (what an H100 gets)


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    d = tmp_path_factory.mktemp("anyres_tile_host_emulation")
    src = KERNEL.read_text()
    start, end = src.index("namespace vlmk {"), src.index(MARKER)
    kernel = src[start:end].replace("extern __shared__ __align__(16) uint8_t smem[];", "uint8_t* smem = g_smem;")
    assert "uint8_t* smem = g_smem;" in kernel, "the kernel's shared-memory declaration changed"
    (d / "kernel.inc").write_text(kernel + "}  // namespace anyres\n}  // namespace vlmk\n")
    (d / "shim.h").write_text(SHIM)
    (d / "harness.cpp").write_text(HARNESS)
    exe = d / "harness"
    cmd = [CXX, "-std=c++20", "-O2", "-pthread", "-Wno-unknown-pragmas", f"-I{ROOT / 'csrc'}", f"-I{d}",
           str(d / "harness.cpp"), "-o", str(exe)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0 and ("barrier" in r.stderr or "c++20" in r.stderr):
        pytest.skip(f"{CXX} lacks C++20 <barrier>")
    assert r.returncode == 0, r.stderr[-4000:]
    return d, exe


def _to_rgb(a):
    if a.shape[2] == 1:
        return np.repeat(a, 3, axis=2)
    if a.shape[2] == 3:
        return a
    alpha = a[..., 3:4].astype(np.float64) / 255.0  # HF's numpy composite onto white
    return np.round(alpha * a[..., :3].astype(np.float64) + (1.0 - alpha) * 255.0).astype(np.uint8)


def _resize(rgb, h, w):
    return np.asarray(Image.fromarray(rgb).resize((w, h), Image.BICUBIC))


def _tiles(rgb, plan, S, global_view):
    rh, rw, pt, pl, rows, cols = plan
    canvas = np.zeros((rows * S, cols * S, 3), np.uint8)
    canvas[pt:pt + rh, pl:pl + rw] = _resize(rgb, rh, rw)
    t = canvas.reshape(rows, S, cols, S, 3).transpose(0, 2, 4, 1, 3).reshape(rows * cols, 3, S, S)
    if global_view:
        t = np.concatenate([_resize(rgb, S, S).transpose(2, 0, 1)[None], t])
    return t


def _layout(a, kind, rng):
    """(bytes, offset, strides) of an [H, W, C] view of `a` in memory laid out as `kind`."""
    h, w, c = a.shape
    if kind == "hwc":
        return a.tobytes(), 0, (w * c, c, 1)
    if kind == "chw":
        return a.transpose(2, 0, 1).tobytes(), 0, (w, 1, h * w)
    if kind == "crop":  # a window of a larger image
        big = rng.integers(0, 256, (h + 5, w + 7, c), dtype=np.uint8)
        big[3:3 + h, 2:2 + w] = a
        return big.tobytes(), (3 * (w + 7) + 2) * c, ((w + 7) * c, c, 1)
    if kind == "every2":  # every other pixel of wider rows
        big = rng.integers(0, 256, (h, 2 * w, c), dtype=np.uint8)
        big[:, ::2] = a
        return big.tobytes(), 0, (2 * w * c, 2 * c, 1)
    if kind == "row_planar":  # [H, C, W] rows
        return np.ascontiguousarray(a.transpose(0, 2, 1)).tobytes(), 0, (c * w, 1, w)
    raise ValueError(kind)


def _image(rng, h, w, c, smooth=False):
    if not smooth:
        return rng.integers(0, 256, (h, w, c), dtype=np.uint8)
    y, x = np.mgrid[0:h, 0:w]
    planes = [x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), ((x + y) * 7) % 256, (x * y) % 256]
    return np.stack(planes, -1)[..., :c].astype(np.uint8)


def _run(harness, images, S, global_view, *, f32=False, spare_tiles=0, smem=SMEM, seed=0):
    """images: [(array [H, W, C], layout, (res_h, res_w, pad_t, pad_l, rows, cols))]."""
    d, exe = harness
    rng = np.random.default_rng(seed)
    lines, want, first = [], [], 0
    for i, (a, kind, plan) in enumerate(images):
        buf, off, st = _layout(a, kind, rng)
        (d / f"img{i}.bin").write_bytes(buf)
        h, w, c = a.shape
        fields = [d / f"img{i}.bin", off, h, w, c, *st, *plan, first]
        lines.append(" ".join(map(str, fields)))
        t = _tiles(_to_rgb(a), plan, S, global_view)
        want.append(t)
        first += len(t)
    want.append(np.full((spare_tiles, 3, S, S), 77, np.uint8))
    want = np.concatenate(want)
    n = len(want)
    spec = [f"{len(images)} {S} {int(global_view)} {int(f32)} {n} {smem}", " ".join(map(str, MEAN)),
            " ".join(map(str, STD))] + lines
    (d / "spec.txt").write_text("\n".join(spec) + "\n")
    subprocess.run([str(exe), str(d / "spec.txt"), str(d / "out.bin")], check=True, timeout=300)
    if not f32:
        got = np.fromfile(d / "out.bin", np.uint8).reshape(n, 3, S, S)
        np.testing.assert_array_equal(got, want)
        return
    got = np.fromfile(d / "out.bin", np.float32).reshape(n, 3, S, S)
    x = (want.astype(np.float64) * (1.0 / 255.0)).astype(np.float32)  # HF: rescale in fp64, then fp32
    m, s = np.array(MEAN, np.float32)[:, None, None], np.array(STD, np.float32)[:, None, None]
    np.testing.assert_array_equal(got, (x - m) / s)


def test_grid_and_global_view(harness):
    rng = np.random.default_rng(1)
    _run(harness, [(_image(rng, 150, 200, 3), "hwc", (96, 128, 16, 32, 2, 3))], 64, True)


def test_partial_blocks_and_untouched_slots(harness):
    rng = np.random.default_rng(2)  # S = 48: a 48-wide stripe, a 16-row band; two slots without an image
    _run(harness, [(_image(rng, 120, 90, 3), "chw", (80, 60, 10, 20, 2, 2))], 48, False, spare_tiles=2)


def test_vertical_first(harness):
    rng = np.random.default_rng(3)  # tall and narrow: Pillow >= 13 resizes vertically first
    _run(harness, [(_image(rng, 400, 60, 3), "hwc", (90, 14, 3, 17, 2, 1))], 48, True)


def test_upscale_gray_rgba(harness):
    rng = np.random.default_rng(4)
    _run(harness, [(_image(rng, 20, 30, 1), "hwc", (50, 75, 7, 0, 1, 2)),
                   (_image(rng, 25, 17, 4), "crop", (64, 44, 0, 10, 1, 1))], 64, True)


def test_one_axis_kept(harness):
    rng = np.random.default_rng(5)
    _run(harness, [(_image(rng, 64, 100, 3), "hwc", (64, 50, 0, 0, 1, 1)),
                   (_image(rng, 77, 64, 3), "row_planar", (30, 64, 0, 0, 1, 1))], 64, False)


def test_strided_layouts(harness):
    rng = np.random.default_rng(6)
    _run(harness, [(_image(rng, 70, 50, 1), "every2", (40, 30, 0, 0, 1, 1)),
                   (_image(rng, 66, 80, 4), "chw", (33, 40, 0, 0, 1, 1)),
                   (_image(rng, 61, 83, 3), "every2", (61, 83, 0, 0, 2, 2))], 48, True)


@pytest.mark.parametrize("smem", [SMEM, 64 * 1024, 20000])
def test_chunks_and_global_memory_blocks(harness, smem):
    # many chunks per block; 60-80x downscales do not fit shared memory (read from global memory)
    rng = np.random.default_rng(7)
    _run(harness, [(_image(rng, 1000, 1000, 3, smooth=True), "hwc", (128, 128, 0, 0, 2, 2))], 64, True, smem=smem)
    _run(harness, [(_image(rng, 200, 4000, 3), "hwc", (20, 96, 4, 0, 1, 2)),
                   (_image(rng, 4000, 100, 4), "chw", (96, 20, 0, 5, 2, 1))], 48, True, smem=smem)


def test_float_output(harness):
    rng = np.random.default_rng(8)
    _run(harness, [(_image(rng, 150, 200, 3), "hwc", (96, 128, 16, 32, 2, 3)),
                   (_image(rng, 40, 30, 1), "hwc", (40, 30, 0, 0, 1, 1))], 64, True, f32=True)


@pytest.mark.parametrize("seed", [11, 12])
def test_random_batches(harness, seed):
    rng = np.random.default_rng(seed)
    for _ in range(8):
        S, global_view, images = int(rng.integers(8, 100)), bool(rng.integers(0, 2)), []
        for _ in range(int(rng.integers(1, 3))):
            h, w = int(rng.integers(1, 600)), int(rng.integers(1, 600))
            if rng.random() < 0.3:  # tall and narrow: vertical first
                h, w = int(rng.integers(300, 1500)), int(rng.integers(1, 80))
            rows, cols = int(rng.integers(1, 4)), int(rng.integers(1, 4))
            rh, rw = int(rng.integers(1, rows * S + 1)), int(rng.integers(1, cols * S + 1))
            if rng.random() < 0.2:
                rh = min(h, rows * S)
            if rng.random() < 0.2:
                rw = min(w, cols * S)
            pad_t, pad_l = int(rng.integers(0, rows * S - rh + 1)), int(rng.integers(0, cols * S - rw + 1))
            plan = (rh, rw, pad_t, pad_l, rows, cols)
            kind = str(rng.choice(["hwc", "chw", "crop", "every2", "row_planar"]))
            images.append((_image(rng, h, w, int(rng.choice([1, 3, 4])), bool(rng.integers(0, 2))), kind, plan))
        _run(harness, images, S, global_view, spare_tiles=int(rng.integers(0, 2)),
             smem=int(rng.choice([SMEM, 24000])), seed=seed)
