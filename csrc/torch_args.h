// torch -> arg_checks.h adapter: describes at::Tensors for the torch-free
// contracts and turns their ArgError into the RuntimeError torch users expect.
#pragma once

#include <ATen/ATen.h>

#include "paged_attention_checks.h"

namespace yarn {

inline ArgTensor describe(const at::Tensor& t, const char* name) {
  ArgTensor a;
  a.name = name;
  a.present = t.defined();
  if (!a.present) return a;
  switch (t.scalar_type()) {
    case at::kFloat: a.dtype = ArgDType::kFloat32; break;
    case at::kHalf: a.dtype = ArgDType::kFloat16; break;
    case at::kBFloat16: a.dtype = ArgDType::kBFloat16; break;
    case at::kInt: a.dtype = ArgDType::kInt32; break;
    case at::kLong: a.dtype = ArgDType::kInt64; break;
    default: a.dtype = ArgDType::kOther; a.dtype_label = c10::toString(t.scalar_type());
  }
  a.device = t.device().str();
  a.dim = static_cast<int>(t.dim());
  for (int i = 0; i < std::min(a.dim, 4); ++i) {
    a.size[i] = t.size(i);
    a.stride[i] = t.stride(i);
  }
  if (a.dim > 4) a.dim = 5;  // no contract takes more than 4 dims; the checks refuse it
  // Meta and fake tensors (torch.compile) have no elements to point at.
  if (t.device().is_cpu() || t.device().is_cuda()) a.data = t.data_ptr();
  a.host = t.device().is_cpu();
  return a;
}

inline ArgTensor describe(const std::optional<at::Tensor>& t, const char* name) {
  return t.has_value() ? describe(*t, name) : ArgTensor{name};
}

// Runs f, turning an ArgError into the c10::Error (Python RuntimeError) of TORCH_CHECK.
template <typename F>
auto as_torch_error(F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const ArgError& e) {
    TORCH_CHECK(false, e.what());
  }
}

struct PagedCall {
  PagedArgs args;  // describing the tensors as given (device data pointers)
  PagedProblem problem;
};

// The paged_attention contract on torch tensors: shapes always; values when
// `values` (tensors off the host are copied to it first: a sync, so device
// launchers ask for it only under YARN_VLLM_CHECK_ARGS=1), then `more_values`
// (an implementation's own limits) on the same host copies.
inline PagedCall check_paged(const at::Tensor& out, const at::Tensor& query,
                             const at::Tensor& key_cache, const at::Tensor& value_cache,
                             const at::Tensor& block_table, const at::Tensor& seq_lens,
                             const at::Tensor& query_start_loc, const at::Tensor& inv_freq,
                             const at::Tensor& logit_scale,
                             const std::optional<at::Tensor>& cos_sin,
                             const std::optional<at::Tensor>& cos_sin_start, bool values,
                             void (*more_values)(const PagedArgs&, const PagedProblem&) = nullptr) {
  PagedCall call{{describe(out, "out"), describe(query, "query"), describe(key_cache, "key_cache"),
                  describe(value_cache, "value_cache"), describe(block_table, "block_table"),
                  describe(seq_lens, "seq_lens"), describe(query_start_loc, "query_start_loc"),
                  describe(inv_freq, "inv_freq"), describe(logit_scale, "logit_scale"),
                  describe(cos_sin, "cos_sin"), describe(cos_sin_start, "cos_sin_start")},
                 {}};
  as_torch_error([&] {
    call.problem = check_paged_shapes(call.args);
    if (!values) return;
    // the host copies live until the checks are done
    const auto host = [](const at::Tensor& t) { return t.device().is_cpu() ? t : t.cpu(); };
    const at::Tensor bt = host(block_table), lens = host(seq_lens), qsl = host(query_start_loc),
                     scale = host(logit_scale);
    const at::Tensor first = cos_sin_start.has_value() ? host(*cos_sin_start) : at::Tensor();
    PagedArgs h = call.args;
    h.block_table = describe(bt, "block_table");
    h.seq_lens = describe(lens, "seq_lens");
    h.query_start_loc = describe(qsl, "query_start_loc");
    h.logit_scale = describe(scale, "logit_scale");
    if (first.defined()) h.cos_sin_start = describe(first, "cos_sin_start");
    check_paged_values(h, call.problem);
    if (more_values != nullptr) more_values(h, call.problem);
  });
  return call;
}

// paged_attention's arguments in schema order, and what the contract found in them.
struct PagedOp {
  at::Tensor& out;
  const at::Tensor& query;
  const at::Tensor& key_cache;
  const at::Tensor& value_cache;
  const at::Tensor& block_table;
  const at::Tensor& seq_lens;
  const at::Tensor& query_start_loc;
  const at::Tensor& inv_freq;
  const at::Tensor& logit_scale;
  const std::optional<at::Tensor>& cos_sin;
  const std::optional<at::Tensor>& cos_sin_start;
  bool is_neox;
  PagedCall checked;
};

// Which values an implementation has checked before it runs: given the query, whether to
// check the contract's values (a host sync off the CPU), and its own limits (or nullptr).
struct PagedValueChecks {
  bool (*values)(const at::Tensor& query);
  void (*more)(const PagedArgs&, const PagedProblem&);
};

inline bool never(const at::Tensor&) { return false; }
inline bool always(const at::Tensor&) { return true; }
inline bool on_request(const at::Tensor&) { return debug_checks_enabled(); }
inline bool on_host_or_request(const at::Tensor& query) {
  return query.device().is_cpu() || debug_checks_enabled();
}

// The op as registered for one dispatch key (the schema's signature, written once): checks
// the contract with `Checks`, then runs `Impl` (a launcher; nothing for the Meta twin).
template <void (*Impl)(const PagedOp&), const PagedValueChecks& Checks>
void paged_attention_op(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                        const at::Tensor& value_cache, const at::Tensor& block_table,
                        const at::Tensor& seq_lens, const at::Tensor& query_start_loc,
                        const at::Tensor& inv_freq, const at::Tensor& logit_scale,
                        const std::optional<at::Tensor>& cos_sin,
                        const std::optional<at::Tensor>& cos_sin_start, bool is_neox) {
  Impl(PagedOp{out, query, key_cache, value_cache, block_table, seq_lens, query_start_loc,
               inv_freq, logit_scale, cos_sin, cos_sin_start, is_neox,
               check_paged(out, query, key_cache, value_cache, block_table, seq_lens,
                           query_start_loc, inv_freq, logit_scale, cos_sin, cos_sin_start,
                           Checks.values(query), Checks.more)});
}

}  // namespace yarn
