// The weighted combine of the token dispatcher on the CPU, forward and backward in one pass
// each (moe-model's dispatcher/permute.rs has the tensor-op form every other device runs):
//
//   y[n, :] = sum over rows m of token n of  p[m] * out[m, :]
//
// As tensor ops that is a multiply, a zero fill and an `index_add` forward, and an
// `index_select`, two multiplies and a row sum backward: five or six passes over the M x d
// rows. Here the forward reads the rows once (threads split the d columns, so no two write
// the same output), and the backward writes d_out and reads out once (threads split the
// rows). The forward adds the rounded products in row order, as `index_add` does, so it is
// bit-identical to the tensor ops; d_p sums its dot products in f32 like the ops, in another
// order.
//
// Entry points catch every C++ exception and return non-zero with a message.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>

#include "moe_shim_guard.h"


namespace {

// Columns per task of the forward, rows per task of the backward: enough work per task that
// at::parallel_for does not split below a few microseconds.
constexpr int64_t kColGrain = 16;
constexpr int64_t kRowGrain = 256;

// sum_c a[c] b[c] in f32, over kLanes independent partial sums (so the compiler can keep them
// in vector registers; one running sum is a chain of dependent adds), added in a fixed order:
// deterministic, and as accurate as torch's own f32 row sum.
constexpr int64_t kLanes = 16;
float dot(const float* a, const float* b, int64_t d) {
  float lane[kLanes] = {0.0f};
  int64_t c = 0;
  for (; c + kLanes <= d; c += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) lane[j] += a[c + j] * b[c + j];
  }
  for (; c < d; ++c) lane[c % kLanes] += a[c] * b[c];
  for (int64_t w = kLanes / 2; w > 0; w /= 2) {
    for (int64_t j = 0; j < w; ++j) lane[j] += lane[j + w];
  }
  return lane[0];
}

struct WeightedCombine : public torch::autograd::Function<WeightedCombine> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, at::Tensor out_md,
                            at::Tensor p_m, at::Tensor token_m, int64_t n) {
    out_md = out_md.contiguous();
    p_m = p_m.contiguous();
    token_m = token_m.contiguous();
    const int64_t m = out_md.size(0), d = out_md.size(1);
    at::Tensor y_nd = at::zeros({n, d}, out_md.options());
    const float* out = out_md.const_data_ptr<float>();
    const float* p = p_m.const_data_ptr<float>();
    const int64_t* tok = token_m.const_data_ptr<int64_t>();
    float* y = y_nd.mutable_data_ptr<float>();
    for (int64_t r = 0; r < m; ++r) {
      TORCH_CHECK(tok[r] >= 0 && tok[r] < n, "weighted combine: row ", r, " names token ",
                  tok[r], " of ", n);
    }
    at::parallel_for(0, d, kColGrain, [&](int64_t c0, int64_t c1) {
      for (int64_t r = 0; r < m; ++r) {
        const float w = p[r];
        const float* src = out + r * d;
        float* dst = y + tok[r] * d;
        for (int64_t c = c0; c < c1; ++c) {
          const float prod = w * src[c];
          dst[c] += prod;
        }
      }
    });
    ctx->save_for_backward({out_md, p_m, token_m});
    return y_nd;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor& out_md = saved[0];
    const at::Tensor& p_m = saved[1];
    const at::Tensor& token_m = saved[2];
    at::Tensor g_nd = grads.at(0).to(at::kFloat).contiguous();
    const bool want_out = ctx->needs_input_grad(0), want_p = ctx->needs_input_grad(1);
    const int64_t m = out_md.size(0), d = out_md.size(1);
    at::Tensor d_out = want_out ? at::empty({m, d}, out_md.options()) : at::Tensor();
    at::Tensor d_p = want_p ? at::empty({m}, p_m.options()) : at::Tensor();
    const float* out = out_md.const_data_ptr<float>();
    const float* p = p_m.const_data_ptr<float>();
    const int64_t* tok = token_m.const_data_ptr<int64_t>();
    const float* g = g_nd.const_data_ptr<float>();
    float* dout = want_out ? d_out.mutable_data_ptr<float>() : nullptr;
    float* dp = want_p ? d_p.mutable_data_ptr<float>() : nullptr;
    at::parallel_for(0, m, kRowGrain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const float* gt = g + tok[r] * d;
        if (dout != nullptr) {
          const float w = p[r];
          float* dst = dout + r * d;
          for (int64_t c = 0; c < d; ++c) dst[c] = w * gt[c];
        }
        if (dp != nullptr) dp[r] = dot(gt, out + r * d, d);
      }
    });
    return {d_out, d_p, at::Tensor(), at::Tensor()};
  }
};

}  // namespace

extern "C" {

// y_nd [n, d] = the weighted combine of out_md [M, d] (f32, CPU) with weights p_m [M] (f32)
// into the tokens token_m [M] (i64), differentiable wrt out_md and p_m. Stores a new heap
// tensor in *y_out (owned by the caller) and returns 0, or returns non-zero with a message.
int moe_shim_weighted_combine(const at::Tensor* out_md, const at::Tensor* p_m,
                              const at::Tensor* token_m, int64_t n, at::Tensor** y_out,
                              char* err, size_t err_len) {
  return moe_shim::guarded(err, err_len, [&] {
    TORCH_CHECK(out_md->dim() == 2 && p_m->dim() == 1 && token_m->dim() == 1 &&
                    p_m->size(0) == out_md->size(0) && token_m->size(0) == out_md->size(0),
                "weighted combine: out_md ", out_md->sizes(), ", p_m ", p_m->sizes(),
                " and token_m ", token_m->sizes(), " must be [M, d], [M], [M]");
    TORCH_CHECK(out_md->device().is_cpu() && out_md->scalar_type() == at::kFloat &&
                    p_m->device().is_cpu() && p_m->scalar_type() == at::kFloat &&
                    token_m->device().is_cpu() && token_m->scalar_type() == at::kLong,
                "weighted combine: needs f32 rows and weights and i64 tokens on the CPU");
    TORCH_CHECK(n >= 0, "weighted combine: negative token count ", n);
    *y_out = new at::Tensor(WeightedCombine::apply(*out_md, *p_m, *token_m, n));
  });
}

}  // extern "C"
