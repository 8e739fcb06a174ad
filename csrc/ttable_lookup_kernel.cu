// CUDA kernel of the T-table lookup. Plain CUDA (no torch headers), so that it compiles with
// nvcc alone; csrc/ttable_lookup_cuda.cpp binds it to the custom op.
#include <cuda_runtime.h>

#include "ttable_lookup.h"

namespace duo_fast {

template <typename T>
__global__ void ttable_lookup_kernel(const T* __restrict__ gamma, T* __restrict__ alpha, T* __restrict__ dalpha,
                                     int64_t numel, const double* __restrict__ q, const double* __restrict__ dq,
                                     int64_t n, double gmin, double gmax, double scale) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    double a, d;
    ttable_point(static_cast<double>(gamma[i]), q, dq, n, gmin, gmax, scale, &a, &d);
    alpha[i] = static_cast<T>(a);
    dalpha[i] = static_cast<T>(d);
  }
}

// Returns the launch error (cudaSuccess when the launch was accepted).
cudaError_t ttable_lookup_cuda_launch(const void* gamma, void* alpha, void* dalpha, bool is_double, int64_t numel,
                                      const double* q, const double* dq, int64_t n, double gmin, double gmax,
                                      double scale, cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  const int threads = 256;
  int64_t blocks = (numel + threads - 1) / threads;
  if (blocks > 65535) blocks = 65535;
  if (is_double) {
    ttable_lookup_kernel<double><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
        static_cast<const double*>(gamma), static_cast<double*>(alpha), static_cast<double*>(dalpha), numel, q, dq, n,
        gmin, gmax, scale);
  } else {
    ttable_lookup_kernel<float><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
        static_cast<const float*>(gamma), static_cast<float*>(alpha), static_cast<float*>(dalpha), numel, q, dq, n,
        gmin, gmax, scale);
  }
  return cudaGetLastError();
}

}  // namespace duo_fast
