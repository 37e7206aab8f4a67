// VLMK_HD marks per-element helpers compiled for both the host (C++ CPU kernels) and the device
// (CUDA kernels), so that the CPU tests cover the arithmetic the GPU runs. No torch headers here.
#pragma once

#if defined(__CUDACC__)
#define VLMK_HD __host__ __device__ __forceinline__
#else
#define VLMK_HD inline
#endif
