// CUDA registration of duo_fast::ttable_lookup (built only against a CUDA build of torch).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

namespace duo_fast {

void check_ttable_inputs(const at::Tensor& gamma, const at::Tensor& q, const at::Tensor& dq, double gmin, double gmax,
                         int64_t vocab_size);
cudaError_t ttable_lookup_cuda_launch(const void* gamma, void* alpha, void* dalpha, bool is_double, int64_t numel,
                                      const double* q, const double* dq, int64_t n, double gmin, double gmax,
                                      double scale, cudaStream_t stream);

std::tuple<at::Tensor, at::Tensor> ttable_lookup_cuda(const at::Tensor& gamma, const at::Tensor& q,
                                                      const at::Tensor& dq, double gmin, double gmax,
                                                      int64_t vocab_size) {
  check_ttable_inputs(gamma, q, dq, gmin, gmax, vocab_size);
  const c10::cuda::CUDAGuard guard(gamma.device());
  const at::Tensor g = gamma.contiguous();
  const at::Tensor qc = q.contiguous(), dqc = dq.contiguous();
  at::Tensor alpha = at::empty(g.sizes(), g.options());
  at::Tensor dalpha = at::empty(g.sizes(), g.options());
  const double scale = static_cast<double>(vocab_size) / static_cast<double>(vocab_size - 1);
  const cudaError_t err = ttable_lookup_cuda_launch(
      g.data_ptr(), alpha.data_ptr(), dalpha.data_ptr(), g.scalar_type() == at::kDouble, g.numel(),
      qc.data_ptr<double>(), dqc.data_ptr<double>(), qc.size(0), gmin, gmax, scale,
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "ttable_lookup: CUDA launch failed: ", cudaGetErrorString(err));
  return {alpha, dalpha};
}

}  // namespace duo_fast

TORCH_LIBRARY_IMPL(duo_fast, CUDA, m) { m.impl("ttable_lookup", &duo_fast::ttable_lookup_cuda); }
