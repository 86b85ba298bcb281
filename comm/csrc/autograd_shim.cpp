// Differentiable all-to-all for moe-comm: a torch::autograd::Function whose forward and
// backward call back into Rust, where the communicator lives.
//
// Ownership: Rust hands over an opaque state pointer plus its drop function. The state is
// wrapped at once in a CustomClassHolder (RustState) kept in ctx->saved_data, so it lives
// exactly as long as the autograd node (or, without a graph, until apply returns) and is
// dropped by Rust whichever way the C++ side exits. Errors: the callback returns non-zero
// with a message; TORCH_CHECK turns it into a c10::Error, which the autograd engine
// reports to tch's f_backward (Err), and which the C entry points catch and return as
// non-zero + message. No C++ exception ever crosses into Rust.

#include <ATen/ATen.h>
#include <ATen/core/ivalue.h>
#include <c10/core/Stream.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/util/strides.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include <string>

#include "moe_shim_guard.h"

extern "C" {
// Runs the all-to-all. `direction` 0: forward splits, 1: reversed (backward). Takes
// ownership of `input` (a heap at::Tensor). On success writes the result into `*out`
// through moe_shim_tensor_assign and returns 0; otherwise writes a NUL-terminated message
// into err[0..err_len) and returns non-zero.
typedef int (*moe_a2a_callback)(void* state, int direction, at::Tensor* input,
                                at::Tensor* out, char* err, size_t err_len);
typedef void (*moe_drop_callback)(void* state);
}

namespace {

using moe_shim::guarded;
using moe_shim::write_err;

constexpr size_t kErrLen = 4096;

struct RustState : torch::CustomClassHolder {
  RustState(void* s, moe_a2a_callback cb, moe_drop_callback drop)
      : state(s), callback(cb), drop(drop) {}
  ~RustState() override {
    if (state != nullptr) drop(state);
  }
  RustState(const RustState&) = delete;
  RustState& operator=(const RustState&) = delete;

  at::Tensor run(int direction, const at::Tensor& x) {
    at::Tensor out;
    char err[kErrLen] = {0};
    int rc = callback(state, direction, new at::Tensor(x), &out, err, kErrLen);
    TORCH_CHECK(rc == 0, "moe-comm all_to_all (", direction == 0 ? "forward" : "backward",
                "): ", err);
    return out;
  }

  void* state;
  moe_a2a_callback callback;
  moe_drop_callback drop;
};

struct AllToAll : public torch::autograd::Function<AllToAll> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, at::Tensor x,
                               c10::intrusive_ptr<RustState> st) {
    at::Tensor y = st->run(0, x);
    ctx->saved_data["state"] = c10::IValue::make_capsule(st);
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto holder = ctx->saved_data["state"].toCapsule();
    auto* st = static_cast<RustState*>(holder.get());
    at::Tensor g = grads.at(0);
    at::Tensor dx = st->run(1, g.contiguous());
    return {dx, at::Tensor()};
  }
};

}  // namespace

extern "C" {

// `*dst = *src` (shares the tensor): how Rust hands a result to C++.
void moe_shim_tensor_assign(at::Tensor* dst, const at::Tensor* src) { *dst = *src; }

// Applies the differentiable all-to-all to `x`. Always takes ownership of `state`. On
// success stores a new heap tensor in `*out` (owned by the caller) and returns 0.
int moe_shim_all_to_all(const at::Tensor* x, void* state, moe_a2a_callback callback,
                        moe_drop_callback drop, at::Tensor** out, char* err,
                        size_t err_len) {
  c10::intrusive_ptr<RustState> st;
  if (guarded(err, err_len, [&] { st = c10::make_intrusive<RustState>(state, callback, drop); })) {
    drop(state);
    return 1;
  }
  return guarded(err, err_len, [&] { *out = new at::Tensor(AllToAll::apply(*x, st)); });
}

// Makes `index` the current CUDA device of this thread (for NCCL's communicator init).
int moe_shim_cuda_set_device(int index, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    const auto* impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
    impl->setDevice(c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(index)));
  });
}

// The current CUDA stream (cudaStream_t) of device `index`, as torch uses it; null with
// a message when CUDA is not usable.
void* moe_shim_cuda_current_stream(int index, char* err, size_t err_len) {
  void* stream = nullptr;
  guarded(err, err_len, [&] {
    const auto* impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
    c10::Stream s =
        impl->getStream(c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(index)));
    stream = s.native_handle();
  });
  return stream;
}

}  // extern "C"

extern "C" {

// Completion markers for the NCCL watchdog (comm/src/watchdog.rs): a CUDA event recorded on
// torch's current stream of device `index`, after the collective just enqueued there. Returns
// the event (a cudaEvent_t), or null with a message.
void* moe_shim_cuda_event_record(int index, char* err, size_t err_len) {
  void* event = nullptr;
  const int rc = guarded(err, err_len, [&] {
    const auto* impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
    const c10::Device dev(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(index));
    impl->record(&event, impl->getStream(dev), dev.index(), c10::EventFlag::PYTORCH_DEFAULT);
  });
  if (rc == 0 && event == nullptr) write_err(err, err_len, "no CUDA event was created");
  return rc == 0 ? event : nullptr;
}

// 1 when everything before `event` on its stream has run, 0 while it is pending, -1 with a
// message on a CUDA error. Called from the watchdog thread: makes device `index` current
// first, so the query does not create a context on device 0.
int moe_shim_cuda_event_query(void* event, int index, char* err, size_t err_len) {
  int done = -1;
  guarded(err, err_len, [&] {
    const auto* impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
    impl->setDevice(c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(index)));
    done = impl->queryEvent(event) ? 1 : 0;
  });
  return done;
}

// Destroys an event from moe_shim_cuda_event_record (never throws).
void moe_shim_cuda_event_destroy(void* event, int index) {
  try {
    const auto* impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
    impl->destroyEvent(event, static_cast<c10::DeviceIndex>(index));
  } catch (...) {
  }
}

// A page-locked copy of host tensor `t` (or `t` itself when it already is), stored in *out
// (owned by the caller). `Tensor::pin_memory()` without a device: passing one, as tch's
// binding must, is deprecated and warns on every call.
int moe_shim_pin_memory(const at::Tensor* t, at::Tensor** out, char* err, size_t err_len) {
  return guarded(err, err_len,
                 [&] { *out = new at::Tensor(t->is_pinned() ? *t : t->pin_memory()); });
}

// A new contiguous tensor of `sizes` (ndim of them) over the start of `pool`'s storage, when
// nothing but `pool` references that storage and it holds enough bytes; *out stays null
// otherwise. The result has its own TensorImpl (no autograd history of `pool`'s, not a view),
// so once it and every tensor made from it are gone, the storage is `pool`'s alone again.
int moe_shim_reuse_storage(const at::Tensor* pool, const int64_t* sizes, size_t ndim,
                           at::Tensor** out, char* err, size_t err_len) {
  *out = nullptr;
  return guarded(err, err_len, [&] {
    const c10::Storage& storage = pool->storage();
    if (pool->use_count() != 1 || storage.use_count() != 1) return;
    c10::IntArrayRef shape(sizes, ndim);
    const size_t need = static_cast<size_t>(c10::multiply_integers(shape)) * pool->element_size();
    if (need > storage.nbytes()) return;
    at::Tensor t = at::empty({0}, pool->options());
    t.set_(storage, 0, shape, c10::contiguous_strides(shape));
    *out = new at::Tensor(std::move(t));
  });
}

// Backpropagates from the non-scalar `t` with the incoming gradient `grad` (Python's
// `t.backward(grad)`; tch only backpropagates from scalars).
int moe_shim_backward_with(const at::Tensor* t, const at::Tensor* grad, char* err,
                           size_t err_len) {
  return guarded(err, err_len, [&] { torch::autograd::backward({*t}, {*grad}); });
}

}  // extern "C"
