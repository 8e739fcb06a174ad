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

template <typename T>
cudaError_t launch_typed(const void* gamma, void* alpha, void* dalpha, int64_t numel, const double* q,
                         const double* dq, int64_t n, double gmin, double gmax, double scale, unsigned blocks,
                         unsigned threads, cudaStream_t stream) {
  const T* g = static_cast<const T*>(gamma);
  T* a = static_cast<T*>(alpha);
  T* d = static_cast<T*>(dalpha);
  void* args[] = {&g, &a, &d, &numel, &q, &dq, &n, &gmin, &gmax, &scale};
  // cudaLaunchKernel returns this launch's own error (a bad configuration, no kernel image for the
  // device), where cudaGetLastError after <<<...>>> would also report, and clear, an earlier one
  return cudaLaunchKernel(reinterpret_cast<const void*>(&ttable_lookup_kernel<T>), dim3(blocks), dim3(threads), args,
                          0, stream);
}

// Returns this launch's error (cudaSuccess when the launch was accepted).
cudaError_t ttable_lookup_cuda_launch(const void* gamma, void* alpha, void* dalpha, bool is_double, int64_t numel,
                                      const double* q, const double* dq, int64_t n, double gmin, double gmax,
                                      double scale, cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  const unsigned threads = 256;
  int64_t blocks = (numel + threads - 1) / threads;
  if (blocks > 65535) blocks = 65535;
  if (is_double) {
    return launch_typed<double>(gamma, alpha, dalpha, numel, q, dq, n, gmin, gmax, scale,
                                static_cast<unsigned>(blocks), threads, stream);
  }
  return launch_typed<float>(gamma, alpha, dalpha, numel, q, dq, n, gmin, gmax, scale, static_cast<unsigned>(blocks),
                             threads, stream);
}

}  // namespace duo_fast
