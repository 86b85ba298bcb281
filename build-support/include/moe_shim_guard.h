// What every moe C++ shim shares (compiled in by moe_build::compile_shim): no C++ exception
// may cross into Rust, so each extern "C" entry point runs its body through `guarded`, which
// returns 0, or 1 with the exception's message NUL-terminated in err[0..err_len) (read on the
// Rust side by `moe_comm::shim_message`).

#pragma once

#include <c10/util/Exception.h>

#include <cstddef>
#include <cstring>
#include <exception>

namespace moe_shim {

inline void write_err(char* err, size_t err_len, const char* msg) {
  if (err == nullptr || err_len == 0) return;
  std::strncpy(err, msg, err_len - 1);
  err[err_len - 1] = '\0';
}

template <typename F>
int guarded(char* err, size_t err_len, F&& f) {
  try {
    f();
    return 0;
  } catch (const c10::Error& e) {
    write_err(err, err_len, e.what_without_backtrace());
  } catch (const std::exception& e) {
    write_err(err, err_len, e.what());
  } catch (...) {
    write_err(err, err_len, "unknown C++ exception");
  }
  return 1;
}

}  // namespace moe_shim
