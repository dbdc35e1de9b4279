// CPU launcher of the pre-RoPE paged attention op: checks the op's contract
// (paged_attention_checks.h, values included), cuts the batch into work items,
// runs them on ATen's OpenMP pool and merges split results (merge_states).
//
// Work items: a sequence with few query rows (decode, short extends) is split
// along its keys, so one long sequence still keeps every core busy; its
// partial softmax states are merged afterwards. A long query (prefill) is cut
// into query tiles instead, each attending its whole causal prefix.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "paged_attention_cpu_kernel.h"
#include "torch_args.h"

namespace yarn {
namespace {

constexpr int kSplitKeys = 2048;   // keys per split of a decode-like sequence
// Query rows (tokens x group) per prefill tile. Each tile streams and rotates its causal
// prefix once, so taller tiles do less of that per row; 384 (128 tokens of a group of 3,
// no padding to the vector width) beat 128 by 7% at a 2k prompt and 11% on a 2k chunk of
// a 16k one, and 512 (L2 then holds less of the tile's state) lost 5% again.
constexpr int kTileRows = 384;
constexpr int kDecodeRows = 64;    // at most this many rows: split along keys

struct WorkItem {
  int seq, kv_head, i0, i1, k0, k1;
  int64_t slot;  // index of its partial state, or -1: normalise straight into out
};

// Orders work items so that at::parallel_for, which hands each of `threads` threads one
// contiguous run of them, gives every thread about the same work: a prefill's query tiles
// cost in proportion to their causal prefixes (the last tile of a 16k prompt 256 times the
// first), so in batch order the first thread would get the cheap half. Largest first, dealt
// out in a snake (0, 1, .., T-1, T-1, .., 0), each thread's items then laid end to end.
void balance(std::vector<WorkItem>& items, const std::vector<PagedSequence>& seqs, int threads) {
  if (threads <= 1 || items.size() <= 1) return;
  const auto cost = [&](const WorkItem& it) {
    const PagedSequence& s = seqs[it.seq];
    const int64_t last_key = std::min<int64_t>(it.k1, int64_t{s.seq_len} - s.q_len + it.i1);
    return int64_t{it.i1 - it.i0} * std::max<int64_t>(1, last_key - it.k0);
  };
  std::vector<WorkItem> sorted = items;
  std::stable_sort(sorted.begin(), sorted.end(),
                   [&](const WorkItem& a, const WorkItem& b) { return cost(a) > cost(b); });
  std::vector<std::vector<WorkItem>> dealt(threads);
  for (size_t n = 0; n < sorted.size(); ++n) {
    const size_t round = n / threads, k = n % threads;
    dealt[round % 2 ? threads - 1 - k : k].push_back(sorted[n]);
  }
  items.clear();
  for (const auto& run : dealt) items.insert(items.end(), run.begin(), run.end());
}

template <typename Scalar, typename Elem>
void run(const PagedOp& op) {
  const PagedProblem& p = op.checked.problem;
  const at::Tensor &query = op.query, &key_cache = op.key_cache, &value_cache = op.value_cache;
  const at::Tensor &block_table = op.block_table, &inv_freq = op.inv_freq;
  const auto& cos_sin = op.cos_sin;
  const auto& cos_sin_start = op.cos_sin_start;
  at::Tensor& out = op.out;
  // The contract bounds heads, head size and block size (and T x H_q) below 2^31.
  PagedShape sh;
  sh.num_q_heads = static_cast<int>(p.num_q_heads);
  sh.num_kv_heads = static_cast<int>(p.num_kv_heads);
  sh.head_size = static_cast<int>(p.head_size);
  sh.rotary_dim = static_cast<int>(p.rotary_dim);
  sh.block_size = static_cast<int>(p.block_size);
  sh.is_neox = op.is_neox;
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

  const int64_t num_seqs = p.num_seqs;
  const int32_t* lens = op.seq_lens.data_ptr<int32_t>();
  const int32_t* starts = op.query_start_loc.data_ptr<int32_t>();
  const float* freq = inv_freq.data_ptr<float>();
  const float* scale = op.logit_scale.data_ptr<float>();
  const float* table = cos_sin ? cos_sin->data_ptr<float>() : nullptr;
  const int64_t* table_start = cos_sin_start ? cos_sin_start->data_ptr<int64_t>() : nullptr;

  std::vector<PagedSequence> seqs(num_seqs);
  std::vector<WorkItem> items;
  std::vector<std::pair<int64_t, int64_t>> merges;  // [first, last) slots of one split group
  std::vector<WorkItem> merge_heads;                 // the rows each merge writes
  int64_t slots = 0;
  for (int64_t b = 0; b < num_seqs; ++b) {
    // The contract (checked) bounds these: 0 <= q_len <= seq_len <= kMaxContext < 2^31,
    // with room for the int arithmetic below.
    const int q_len = starts[b + 1] - starts[b];
    const int seq_len = lens[b];
    const int32_t* row = block_table.data_ptr<int32_t>() + b * block_table.stride(0);
    seqs[b] = PagedSequence{row,
                            seq_len, q_len, starts[b], scale[b],
                            table ? table + table_start[b] * sh.rotary_dim : nullptr,
                            freq + b * inv_freq.stride(0)};
    if (q_len == 0) continue;
    for (int h = 0; h < sh.num_kv_heads; ++h) {
      if (int64_t{q_len} * group <= kDecodeRows) {
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

  balance(items, seqs, at::get_num_threads());

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
        // 0 for a row that saw no key; NaN stays NaN
        const float inv_l = st.l[r] != 0.f ? 1.f / st.l[r] : 0.f;
        Elem* dst = o + (seq.q_start + i) * o_token +
                    static_cast<int64_t>(it.kv_head * group + g) * o_head;
        const float* acc = st.acc.data() + static_cast<size_t>(r) * D;
        for (int d = 0; d < D; ++d) store(dst + d, acc[d] * inv_l);
      }
  };

  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    // kept by each thread across calls: a decode layer's call then allocates none of them
    thread_local SoftmaxState local;
    thread_local Scratch scratch;
    for (int64_t n = begin; n < end; ++n) {
      const WorkItem& it = items[n];
      SoftmaxState& st = it.slot >= 0 ? partials[it.slot] : local;
      st.reset((it.i1 - it.i0) * group, D);
      paged_attend<Elem>(sh, seqs[it.seq], q, kc, vc, it.kv_head, it.i0, it.i1, it.k0, it.k1,
                         st, scratch);
      if (it.slot < 0) write_rows(it, st);
    }
  });

  at::parallel_for(0, static_cast<int64_t>(merges.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const auto [first, last] = merges[n];
      SoftmaxState merged = partials[first];
      for (int64_t s = first + 1; s < last; ++s) merge_states(merged, partials[s], D);
      write_rows(merge_heads[n], merged);
    }
  });
}

void paged_attention_cpu(const PagedOp& op) {
  switch (op.query.scalar_type()) {
    case at::kFloat: return run<float, float>(op);
    case at::kHalf: return run<at::Half, _Float16>(op);
    case at::kBFloat16: return run<at::BFloat16, bf16>(op);
    default: return;  // the contract admits no other dtype
  }
}

constexpr PagedValueChecks kEveryValue{always, nullptr};  // on the host: no sync to avoid

}  // namespace

TORCH_LIBRARY_IMPL(yarn_vllm, CPU, m) {
  m.impl("paged_attention", &paged_attention_op<paged_attention_cpu, kEveryValue>);
}

}  // namespace yarn
