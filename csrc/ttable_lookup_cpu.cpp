// duo_fast::ttable_lookup: the T-table lookup as a PyTorch custom op (schema, checks, CPU).
// The CUDA implementation is registered by ttable_lookup_cuda.cpp when built with CUDA.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <Python.h>
#include <torch/library.h>

#include "ttable_lookup.h"

namespace duo_fast {

void check_ttable_inputs(const at::Tensor& gamma, const at::Tensor& q, const at::Tensor& dq, double gmin, double gmax,
                         int64_t vocab_size) {
  TORCH_CHECK(gamma.scalar_type() == at::kFloat || gamma.scalar_type() == at::kDouble,
              "ttable_lookup: gamma must be float32 or float64, got ", gamma.scalar_type());
  TORCH_CHECK(q.dim() == 1 && dq.dim() == 1 && q.size(0) == dq.size(0) && q.size(0) >= 2,
              "ttable_lookup: q and dq must be 1-d tables of equal length >= 2, got ", q.sizes(), " and ", dq.sizes());
  TORCH_CHECK(q.scalar_type() == at::kDouble && dq.scalar_type() == at::kDouble,
              "ttable_lookup: the tables must be float64");
  TORCH_CHECK(q.device() == gamma.device() && dq.device() == gamma.device(),
              "ttable_lookup: gamma is on ", gamma.device(), " but the tables are on ", q.device());
  TORCH_CHECK(gmin < gmax, "ttable_lookup: need gamma_min < gamma_max, got ", gmin, " and ", gmax);
  TORCH_CHECK(vocab_size >= 2, "ttable_lookup: vocab_size must be >= 2, got ", vocab_size);
}

std::tuple<at::Tensor, at::Tensor> ttable_lookup_cpu(const at::Tensor& gamma, const at::Tensor& q,
                                                     const at::Tensor& dq, double gmin, double gmax,
                                                     int64_t vocab_size) {
  check_ttable_inputs(gamma, q, dq, gmin, gmax, vocab_size);
  const at::Tensor g = gamma.contiguous();
  const at::Tensor qc = q.contiguous(), dqc = dq.contiguous();
  at::Tensor alpha = at::empty(g.sizes(), g.options());
  at::Tensor dalpha = at::empty(g.sizes(), g.options());
  const int64_t numel = g.numel(), n = qc.size(0);
  const double scale = static_cast<double>(vocab_size) / static_cast<double>(vocab_size - 1);
  const double* qp = qc.data_ptr<double>();
  const double* dqp = dqc.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "ttable_lookup_cpu", [&] {
    const scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* ap = alpha.data_ptr<scalar_t>();
    scalar_t* dp = dalpha.data_ptr<scalar_t>();
    at::parallel_for(0, numel, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        double a, d;
        ttable_point(static_cast<double>(gp[i]), qp, dqp, n, gmin, gmax, scale, &a, &d);
        ap[i] = static_cast<scalar_t>(a);
        dp[i] = static_cast<scalar_t>(d);
      }
    });
  });
  return {alpha, dalpha};
}

}  // namespace duo_fast

TORCH_LIBRARY(duo_fast, m) {
  m.def(
      "ttable_lookup(Tensor gamma, Tensor q, Tensor dq, float gamma_min, float gamma_max, int vocab_size)"
      " -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(duo_fast, CPU, m) { m.impl("ttable_lookup", &duo_fast::ttable_lookup_cpu); }

// An empty Python module: importing duo_fast._C loads this library, which registers the ops.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "duo_fast custom ops (torch.ops.duo_fast)",
                                          -1, nullptr};
  return PyModule_Create(&module_def);
}
