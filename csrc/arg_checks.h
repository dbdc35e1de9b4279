// Argument checking without torch headers: a tensor argument described by its
// metadata, a one-line error that names it, and the debug switch. The paged
// attention contract (paged_attention_checks.h) is written against these, so
// that the torch launchers, their Meta twins and the CPU emulation of the CUDA
// launcher (tests/cuda_emu) all run the very same checks.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <sstream>
#include <stdexcept>
#include <string>

namespace yarn {

// Size limits of every op's contract. Kernels index heads, channels and rows with int,
// and an expanded (stride-0) input can have any size, so each contract checks these in
// int64, before anything is multiplied or cast to int.
constexpr int64_t kMaxHeads = 4096;            // q / k heads of one tensor (models: <= 128)
constexpr int64_t kMaxIndex = (int64_t{1} << 31) - 1;  // what an int32 index can reach

enum class ArgDType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kInt32 = 3, kInt64 = 4,
                            kOther = 5 };

inline const char* dtype_name(ArgDType t) {
  static const char* names[] = {"float32", "float16", "bfloat16", "int32", "int64", "other"};
  return names[static_cast<int>(t)];
}

// One tensor argument. `device` is any string equal for equal devices; `data`
// points at the elements, and `host` says whether this process may read them.
struct ArgTensor {
  const char* name = "";
  bool present = false;
  ArgDType dtype = ArgDType::kOther;
  const char* dtype_label = nullptr;  // the caller's name for a dtype outside ArgDType
  std::string device;
  int dim = 0;  // up to 4 sizes and strides are kept; 5 stands for "more than 4"
  int64_t size[4] = {0, 0, 0, 0};
  int64_t stride[4] = {0, 0, 0, 0};
  const void* data = nullptr;
  bool host = false;

  int kept() const { return dim < 4 ? dim : 4; }
  bool contiguous() const {
    int64_t expected = 1;
    for (int i = kept() - 1; i >= 0; --i) {
      if (size[i] != 1 && stride[i] != expected) return false;
      // an expanded tensor's sizes can wrap the product: then no stride is expected
      if (__builtin_mul_overflow(expected, size[i], &expected)) return i == 0;
    }
    return true;
  }
  std::string shape() const {
    std::ostringstream s;
    s << "(";
    for (int i = 0; i < kept(); ++i) s << (i ? ", " : "") << size[i];
    s << (dim > 4 ? ", ...)" : dim == 1 ? ",)" : ")");
    return s.str();
  }
  const char* type() const { return dtype_label ? dtype_label : dtype_name(dtype); }
  template <typename T>
  const T* values() const { return static_cast<const T*>(data); }
};

// What every check throws; the torch adapters turn it into a RuntimeError.
struct ArgError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

template <typename... Parts>
[[noreturn]] void arg_fail(const Parts&... parts) {
  std::ostringstream s;
  (s << ... << parts);
  throw ArgError(s.str());
}

#define YARN_ARG_CHECK(cond, ...)                 \
  do {                                            \
    if (!(cond)) ::yarn::arg_fail(__VA_ARGS__);   \
  } while (0)

// YARN_VLLM_CHECK_ARGS=1: device launchers also check argument *values*
// (offsets, lengths, block ids, scale indices), at the cost of a host sync.
inline bool debug_checks_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("YARN_VLLM_CHECK_ARGS");
    return v != nullptr && std::string(v) == "1";
  }();
  return on;
}

}  // namespace yarn
