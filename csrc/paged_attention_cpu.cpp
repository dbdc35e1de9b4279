// CPU launcher of the pre-RoPE paged attention op: validates, cuts the batch into
// work items, runs them on ATen's OpenMP pool and merges split results.
//
// Work items: a sequence with few query rows (decode, short extends) is split
// along its keys, so one long sequence still keeps every core busy; its
// partial softmax states are merged afterwards. A long query (prefill) is cut
// into query tiles instead, each attending its whole causal prefix.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "paged_attention_cpu_kernel.h"

namespace yarn {
namespace {

constexpr int kSplitKeys = 2048;   // keys per split of a decode-like sequence
constexpr int kTileRows = 64;      // query rows (tokens x group) per prefill tile
constexpr int kDecodeRows = 64;    // at most this many rows: split along keys

struct WorkItem {
  int seq, kv_head, i0, i1, k0, k1;
  int64_t slot;  // index of its partial state, or -1: normalise straight into out
};

void check_int32(const at::Tensor& t, const char* name, int64_t dims) {
  TORCH_CHECK(t.scalar_type() == at::kInt, name, ": expected int32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dims, name, ": expected ", dims, " dims, got ", t.sizes());
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor");
}

void check_cache(const at::Tensor& c, const char* name, const at::Tensor& query) {
  TORCH_CHECK(c.dim() == 4, name, ": expected (num_blocks, H_kv, block_size, D), got ", c.sizes());
  TORCH_CHECK(c.scalar_type() == query.scalar_type(), name, ": dtype ", c.scalar_type(),
              " differs from query's ", query.scalar_type());
  TORCH_CHECK(c.size(3) == query.size(2), name, ": head size ", c.size(3), " != query's ",
              query.size(2));
  TORCH_CHECK(c.stride(3) == 1, name, ": the head dimension must be contiguous");
}

template <typename Scalar, typename Elem>
void run(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
         const at::Tensor& value_cache, const at::Tensor& block_table, const at::Tensor& seq_lens,
         const at::Tensor& query_start_loc, const at::Tensor& inv_freq,
         const at::Tensor& logit_scale, const std::optional<at::Tensor>& cos_sin,
         const std::optional<at::Tensor>& cos_sin_start, bool is_neox) {
  PagedShape sh;
  sh.num_q_heads = static_cast<int>(query.size(1));
  sh.num_kv_heads = static_cast<int>(key_cache.size(1));
  sh.head_size = static_cast<int>(query.size(2));
  sh.rotary_dim = static_cast<int>(2 * inv_freq.size(1));
  sh.block_size = static_cast<int>(key_cache.size(2));
  sh.is_neox = is_neox;
  sh.q_token_stride = query.stride(0);
  sh.q_head_stride = query.stride(1);
  sh.k_block_stride = key_cache.stride(0);
  sh.k_head_stride = key_cache.stride(1);
  sh.k_row_stride = key_cache.stride(2);
  sh.v_block_stride = value_cache.stride(0);
  sh.v_head_stride = value_cache.stride(1);
  sh.v_row_stride = value_cache.stride(2);
  const int group = sh.num_q_heads / sh.num_kv_heads;
  const int D = sh.head_size;

  const int64_t num_seqs = seq_lens.size(0);
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* starts = query_start_loc.data_ptr<int32_t>();
  const float* freq = inv_freq.data_ptr<float>();
  const float* scale = logit_scale.data_ptr<float>();
  const float* table = cos_sin ? cos_sin->data_ptr<float>() : nullptr;
  const int64_t* table_start = cos_sin_start ? cos_sin_start->data_ptr<int64_t>() : nullptr;

  std::vector<PagedSequence> seqs(num_seqs);
  std::vector<WorkItem> items;
  std::vector<std::pair<int64_t, int64_t>> merges;  // [first, last) slots of one split group
  std::vector<WorkItem> merge_heads;                 // the rows each merge writes
  int64_t slots = 0;
  for (int64_t b = 0; b < num_seqs; ++b) {
    const int q_len = starts[b + 1] - starts[b];
    const int seq_len = lens[b];
    TORCH_CHECK(q_len <= seq_len, "query_start_loc/seq_lens: sequence ", b, " has ", q_len,
                " queries but only ", seq_len, " tokens");
    TORCH_CHECK((seq_len + sh.block_size - 1) / sh.block_size <= block_table.size(1),
                "block_table: sequence ", b, " needs more blocks than the table's ",
                block_table.size(1), " columns");
    const int32_t* row = block_table.data_ptr<int32_t>() + b * block_table.stride(0);
    for (int i = 0; i < (seq_len + sh.block_size - 1) / sh.block_size; ++i)
      TORCH_CHECK(row[i] >= 0 && row[i] < key_cache.size(0), "block_table: sequence ", b,
                  " uses block ", row[i], " outside the cache's ", key_cache.size(0), " blocks");
    seqs[b] = PagedSequence{row,
                            seq_len, q_len, starts[b], scale[b],
                            table ? table + table_start[b] * sh.rotary_dim : nullptr,
                            freq + b * inv_freq.stride(0)};
    if (q_len == 0) continue;
    for (int h = 0; h < sh.num_kv_heads; ++h) {
      if (q_len * group <= kDecodeRows) {
        const int splits = std::max(1, (seq_len + kSplitKeys - 1) / kSplitKeys);
        if (splits == 1) {
          items.push_back({static_cast<int>(b), h, 0, q_len, 0, seq_len, -1});
          continue;
        }
        merges.emplace_back(slots, slots + splits);
        merge_heads.push_back({static_cast<int>(b), h, 0, q_len, 0, seq_len, -1});
        for (int s = 0; s < splits; ++s)
          items.push_back({static_cast<int>(b), h, 0, q_len, s * kSplitKeys,
                           std::min(seq_len, (s + 1) * kSplitKeys), slots++});
      } else {
        const int tile = std::max(1, kTileRows / group);
        for (int i0 = 0; i0 < q_len; i0 += tile)
          items.push_back({static_cast<int>(b), h, i0, std::min(q_len, i0 + tile), 0, seq_len,
                           -1});
      }
    }
  }

  const auto* q = reinterpret_cast<const Elem*>(query.data_ptr<Scalar>());
  const auto* kc = reinterpret_cast<const Elem*>(key_cache.data_ptr<Scalar>());
  const auto* vc = reinterpret_cast<const Elem*>(value_cache.data_ptr<Scalar>());
  auto* o = reinterpret_cast<Elem*>(out.data_ptr<Scalar>());
  const int64_t o_token = out.stride(0), o_head = out.stride(1);

  // Partial states of split items: m, l per row and acc per row, rows = q_len * group.
  std::vector<SoftmaxState> partials(slots);

  auto write_rows = [&](const WorkItem& it, const SoftmaxState& st) {
    const PagedSequence& seq = seqs[it.seq];
    for (int i = it.i0; i < it.i1; ++i)
      for (int g = 0; g < group; ++g) {
        const int r = (i - it.i0) * group + g;
        const float inv_l = st.l[r] > 0.f ? 1.f / st.l[r] : 0.f;
        Elem* dst = o + (seq.q_start + i) * o_token +
                    static_cast<int64_t>(it.kv_head * group + g) * o_head;
        const float* acc = st.acc.data() + static_cast<size_t>(r) * D;
        for (int d = 0; d < D; ++d) store(dst + d, acc[d] * inv_l);
      }
  };

  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    SoftmaxState local;
    for (int64_t n = begin; n < end; ++n) {
      const WorkItem& it = items[n];
      SoftmaxState& st = it.slot >= 0 ? partials[it.slot] : local;
      st.reset((it.i1 - it.i0) * group, D);
      paged_attend<Elem>(sh, seqs[it.seq], q, kc, vc, it.kv_head, it.i0, it.i1, it.k0, it.k1,
                         st);
      if (it.slot < 0) write_rows(it, st);
    }
  });

  at::parallel_for(0, static_cast<int64_t>(merges.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const auto [first, last] = merges[n];
      SoftmaxState merged = partials[first];
      const int rows = static_cast<int>(merged.m.size());
      for (int64_t s = first + 1; s < last; ++s) {
        const SoftmaxState& p = partials[s];
        for (int r = 0; r < rows; ++r) {
          if (p.m[r] == -std::numeric_limits<float>::infinity()) continue;
          const float m = std::max(merged.m[r], p.m[r]);
          const float a = std::exp(merged.m[r] - m), c = std::exp(p.m[r] - m);
          merged.l[r] = merged.l[r] * a + p.l[r] * c;
          merged.m[r] = m;
          float* acc = merged.acc.data() + static_cast<size_t>(r) * D;
          const float* pa = p.acc.data() + static_cast<size_t>(r) * D;
          for (int d = 0; d < D; ++d) acc[d] = acc[d] * a + pa[d] * c;
        }
      }
      write_rows(merge_heads[n], merged);
    }
  });
}

void paged_attention_cpu(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                         const at::Tensor& value_cache, const at::Tensor& block_table,
                         const at::Tensor& seq_lens, const at::Tensor& query_start_loc,
                         const at::Tensor& inv_freq, const at::Tensor& logit_scale,
                         const std::optional<at::Tensor>& cos_sin,
                         const std::optional<at::Tensor>& cos_sin_start, bool is_neox) {
  TORCH_CHECK(query.dim() == 3 && query.stride(2) == 1,
              "query: expected (T, H_q, D) with a contiguous last dim, got ", query.sizes());
  TORCH_CHECK(out.sizes() == query.sizes() && out.scalar_type() == query.scalar_type() &&
                  out.stride(2) == 1,
              "out: expected the shape and dtype of query, got ", out.sizes(), " ",
              out.scalar_type());
  check_cache(key_cache, "key_cache", query);
  check_cache(value_cache, "value_cache", query);
  TORCH_CHECK(value_cache.sizes() == key_cache.sizes(),
              "value_cache: shape ", value_cache.sizes(), " differs from key_cache's ",
              key_cache.sizes());
  TORCH_CHECK(query.size(1) % key_cache.size(1) == 0, "query: ", query.size(1),
              " heads is not a multiple of the cache's ", key_cache.size(1), " kv heads");
  check_int32(block_table, "block_table", 2);
  check_int32(seq_lens, "seq_lens", 1);
  check_int32(query_start_loc, "query_start_loc", 1);
  const int64_t num_seqs = seq_lens.size(0);
  TORCH_CHECK(query_start_loc.size(0) == num_seqs + 1 && block_table.size(0) >= num_seqs,
              "query_start_loc/block_table: need B + 1 / B rows for B = ", num_seqs);
  TORCH_CHECK(seq_lens.is_contiguous() && query_start_loc.is_contiguous() &&
                  block_table.stride(1) == 1,
              "seq_lens, query_start_loc and block_table rows must be contiguous");
  TORCH_CHECK(inv_freq.scalar_type() == at::kFloat && inv_freq.dim() == 2 &&
                  inv_freq.size(0) >= num_seqs && inv_freq.stride(1) == 1,
              "inv_freq: expected fp32 (B, rotary_dim / 2), got ", inv_freq.sizes());
  TORCH_CHECK(2 * inv_freq.size(1) <= query.size(2) && inv_freq.size(1) > 0,
              "inv_freq: rotary_dim ", 2 * inv_freq.size(1), " exceeds head size ", query.size(2));
  TORCH_CHECK(logit_scale.scalar_type() == at::kFloat && logit_scale.is_contiguous() &&
                  logit_scale.numel() >= num_seqs,
              "logit_scale: expected fp32 (B,)");
  TORCH_CHECK(cos_sin.has_value() == cos_sin_start.has_value(),
              "cos_sin and cos_sin_start come together");
  if (cos_sin) {
    TORCH_CHECK(cos_sin->scalar_type() == at::kFloat && cos_sin->is_contiguous() &&
                    cos_sin->dim() == 2 && cos_sin->size(1) == 2 * inv_freq.size(1),
                "cos_sin: expected contiguous fp32 (rows, rotary_dim), got ", cos_sin->sizes());
    TORCH_CHECK(cos_sin_start->scalar_type() == at::kLong && cos_sin_start->is_contiguous() &&
                    cos_sin_start->numel() >= num_seqs,
                "cos_sin_start: expected int64 (B,)");
    const int64_t* st = cos_sin_start->data_ptr<int64_t>();
    const int32_t* lens = seq_lens.data_ptr<int32_t>();
    for (int64_t b = 0; b < num_seqs; ++b) {
      const int64_t rows = kAngleStride + (lens[b] + kAngleStride - 1) / kAngleStride;
      TORCH_CHECK(st[b] >= 0 && st[b] + rows <= cos_sin->size(0), "cos_sin: sequence ", b,
                  " rows [", st[b], ", ", st[b] + rows, ") fall outside the table");
    }
  }
  switch (query.scalar_type()) {
    case at::kFloat:
      run<float, float>(out, query, key_cache, value_cache, block_table, seq_lens,
                        query_start_loc, inv_freq, logit_scale, cos_sin, cos_sin_start, is_neox);
      break;
    case at::kHalf:
      run<at::Half, _Float16>(out, query, key_cache, value_cache, block_table, seq_lens,
                              query_start_loc, inv_freq, logit_scale, cos_sin, cos_sin_start,
                              is_neox);
      break;
    case at::kBFloat16:
      run<at::BFloat16, bf16>(out, query, key_cache, value_cache, block_table, seq_lens,
                              query_start_loc, inv_freq, logit_scale, cos_sin, cos_sin_start,
                              is_neox);
      break;
    default:
      TORCH_CHECK(false, "query: dtype ", query.scalar_type(), " is not fp32, fp16 or bf16");
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(yarn_vllm, CPU, m) { m.impl("paged_attention", &paged_attention_cpu); }

}  // namespace yarn
