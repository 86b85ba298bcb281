// Multi-tensor optimizer kernels for moe-trainer: torch's fused AdamW and foreach norms, which
// tch does not bind (its generator skips `_fused_*` and `_foreach_*`). Each entry point takes
// arrays of at::Tensor pointers (tch's C_tensor), catches every C++ exception and returns
// non-zero with a NUL-terminated message, so no exception crosses into Rust.

#include <ATen/ATen.h>
#include <ATen/ops/_foreach_mul.h>
#include <ATen/ops/_foreach_norm.h>
#include <ATen/ops/_fused_adamw.h>

#include <optional>
#include <vector>

#include "moe_shim_guard.h"

namespace {

using moe_shim::guarded;

std::vector<at::Tensor> list(at::Tensor* const* ts, size_t n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) out.push_back(*ts[i]);
  return out;
}

}  // namespace

extern "C" {

// torch.optim.AdamW(fused=True)'s update of n parameters, in place: `step` (a float scalar
// on the parameters' device, already incremented) serves every parameter. `grad_scale`, when
// not null (a float scalar there), divides every gradient inside the kernel (torch's AMP
// unscale, used here for the clipping coefficient); the kernel leaves the divided values in
// the gradients.
int moe_shim_fused_adamw(at::Tensor* const* params, at::Tensor* const* grads,
                         at::Tensor* const* exp_avgs, at::Tensor* const* exp_avg_sqs,
                         const at::Tensor* step, const at::Tensor* grad_scale, size_t n,
                         double lr, double beta1, double beta2, double weight_decay, double eps,
                         char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    std::vector<at::Tensor> steps(n, *step);
    std::optional<at::Tensor> scale;
    if (grad_scale != nullptr) scale = *grad_scale;
    at::_fused_adamw_(list(params, n), list(grads, n), list(exp_avgs, n), list(exp_avg_sqs, n),
                      /*max_exp_avg_sqs=*/{}, steps, lr, beta1, beta2, weight_decay, eps,
                      /*amsgrad=*/false, /*maximize=*/false, scale, /*found_inf=*/std::nullopt);
  });
}

// Drops the gradient of n tensors (`param.grad = None`): the next backward writes fresh
// gradients instead of adding into zeroed ones, which saves a pass over memory to zero them
// and another to accumulate.
int moe_shim_set_grads_to_none(at::Tensor* const* ts, size_t n, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    for (size_t i = 0; i < n; ++i) ts[i]->mutable_grad().reset();
  });
}

// sum_i ||t_i||_2^2 over n tensors as a new float64 scalar on their device (one foreach norm
// kernel, then one small reduction), stored in *out (owned by the caller).
int moe_shim_foreach_sq_norm(at::Tensor* const* ts, size_t n, at::Tensor** out, char* err,
                             size_t err_len) {
  return guarded(err, err_len, [&] {
    std::vector<at::Tensor> norms = at::_foreach_norm(list(ts, n), 2);
    at::Tensor total = at::stack(norms).to(at::kDouble).square().sum();
    *out = new at::Tensor(std::move(total));
  });
}

// t_i *= c for n tensors, in place, in one foreach kernel.
int moe_shim_foreach_mul_scalar_(at::Tensor* const* ts, size_t n, double c, char* err,
                                 size_t err_len) {
  return guarded(err, err_len, [&] { at::_foreach_mul_(list(ts, n), c); });
}

}  // extern "C"
