// CPU kernel of abs_histogram_: the counting pass of the exact global k-th-magnitude selection.
//
// The selection itself (calm_fast/selection.py) is two calls of this op: level 0 counts the high 15
// bits of every |tau| key per task, the bucket holding the k-th key is found by a prefix sum over the
// 32768 counts, and level 1 counts the low 16 bits of the keys inside that bucket only.  The result is
// the exact k-th smallest |tau| (bit-identical to torch.kthvalue on the concatenation) without ever
// concatenating, sorting or copying the model; histograms add, so the same op serves resident,
// streaming (tensor by tensor) and distributed (all-reduce) selection.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <mutex>
#include <type_traits>

#include "cpu/cpu_common.h"
#include "cpu/simd_avx2.h"

namespace calm_fast {
namespace cpu {
namespace {

// A work item of the histogram: elements [begin, end) of task t's tensor l.
struct HistUnit {
  int64_t t, l, begin, end;
};

template <typename scalar_t>
void histogram_impl(at::Tensor& hist, at::TensorList inputs, at::TensorList base, const TaskList& tl,
                    const int64_t* prefix, const DareParams& dare, const int64_t* keys) {
  const int64_t bins = prefix == nullptr ? kHistHighBins : kHistLowBins;
  const auto in_ptr = data_ptrs<scalar_t>(inputs);
  const auto base_ptr = data_ptrs<scalar_t>(base);
  std::vector<HistUnit> units;
  for (int64_t t = 0; t < tl.T; ++t) {
    if (prefix != nullptr && prefix[t] < 0) continue;  // task needs no refinement
    for (int64_t l = 0; l < tl.L; ++l)
      for (int64_t b = 0; b < tl.numel[l]; b += kUnit) units.push_back({t, l, b, std::min(tl.numel[l], b + kUnit)});
  }
  int64_t* global = hist.data_ptr<int64_t>();
  std::mutex flush_mutex;
  const bool simd = simd_enabled();

  at::parallel_for(0, static_cast<int64_t>(units.size()), 1, [&](int64_t u0, int64_t u1) {
    // uint32 counts per thread (half the cache footprint of int64), flushed before they could overflow.
    std::vector<uint32_t> local(static_cast<size_t>(tl.T * bins), 0u);
    int64_t since_flush = 0;
    auto flush = [&] {
      std::lock_guard<std::mutex> lock(flush_mutex);
      for (size_t i = 0; i < local.size(); ++i) global[i] += local[i];
      std::fill(local.begin(), local.end(), 0u);
      since_flush = 0;
    };
    alignas(64) float tile[kTile];
    alignas(64) uint32_t key[kTile];
    for (int64_t u = u0; u < u1; ++u) {
      const HistUnit& w = units[u];
      const scalar_t* in = in_ptr[w.t * tl.L + w.l];
      const scalar_t* bs = tl.has_base ? base_ptr[w.l] : nullptr;
      const uint64_t dkey = keys != nullptr ? static_cast<uint64_t>(keys[w.t * tl.L + w.l]) : 0u;
      uint32_t* h = local.data() + w.t * bins;
      for (int64_t i0 = w.begin; i0 < w.end; i0 += kTile) {
        const int64_t n = std::min(kTile, w.end - i0);
        load_tau_tile(in, bs, i0, n, dare, dkey, tile, simd);
        for (int64_t j = 0; j < n; ++j) key[j] = abs_key(tile[j]);
        if (prefix == nullptr) {
          for (int64_t j = 0; j < n; ++j) h[key[j] >> 16] += 1u;
        } else {
          const uint32_t want = static_cast<uint32_t>(prefix[w.t]);
          for (int64_t j = 0; j < n; ++j)
            if ((key[j] >> 16) == want) h[key[j] & 0xffffu] += 1u;
        }
      }
      since_flush += w.end - w.begin;
      if (since_flush > (int64_t{1} << 31)) flush();
    }
    flush();
  });
}

void abs_histogram_cpu(at::Tensor& hist, at::TensorList inputs, at::TensorList base, int64_t num_tasks,
                       const c10::optional<at::Tensor>& prefix, double dare_p,
                       const c10::optional<at::Tensor>& dare_keys, bool dare_rescale) {
  constexpr const char* op = "calm_fast.abs_histogram_";
  const TaskList tl = check_task_list(op, inputs, base, num_tasks);
  check_histogram(op, hist, tl, num_tasks, prefix.has_value());
  check_dare(op, dare_p, dare_keys, tl);
  if (tl.L == 0) return;
  at::Tensor pre;
  if (prefix.has_value()) {
    pre = check_vector(op, "prefix", *prefix, num_tasks, at::kLong, tl);
    const int64_t* p = pre.data_ptr<int64_t>();
    for (int64_t t = 0; t < num_tasks; ++t)
      TORCH_CHECK(p[t] < kHistHighBins, op, ": prefix[", t, "]=", p[t], " is not a level-0 bucket (< 32768)");
  }
  at::Tensor keys = dare_keys.has_value() ? dare_keys->contiguous() : at::Tensor();
  const DareParams dare = make_dare(dare_p, dare_rescale);
  CF_DISPATCH_FLOAT(tl.dtype, [&] {
    histogram_impl<scalar_t>(hist, inputs, base, tl, pre.defined() ? pre.data_ptr<int64_t>() : nullptr, dare,
                             keys.defined() ? keys.data_ptr<int64_t>() : nullptr);
  });
}

// --------------------------------------------------------------------------------------------------
// abs_bracket: one pass that pins the k-th |tau| between two sampled bounds (see schemas.h).  Only
// vectorised compares and counts on the hot path; the few elements strictly inside the bracket are
// packed out for an exact selection among them.
// --------------------------------------------------------------------------------------------------
struct BracketState {
  std::mutex mutex;
  std::vector<int64_t> counts;  // [T, 4]
  float* cand = nullptr;        // [T, capacity]; rows filled in any order (the op leaves order unspecified)
  std::unique_ptr<std::atomic<int64_t>[]> used;  // per task: slots claimed so far (may pass capacity)
  int64_t capacity = 0;

  // Appends up to the remaining room of task t's row.
  void append(int64_t t, const float* v, int64_t m) {
    if (m == 0 || used[t].load(std::memory_order_relaxed) >= capacity) return;
    const int64_t start = used[t].fetch_add(m, std::memory_order_relaxed);
    const int64_t take = std::min(m, capacity - start);
    if (take > 0) std::memcpy(cand + t * capacity + start, v, sizeof(float) * take);
  }
};

// Generic (auto-vectorised) counts of one row; packs the keys strictly inside into `compact` (n slots).
inline int64_t bracket_row_generic(const float* row, int64_t n, uint32_t klo, uint32_t khi, bool distinct,
                                   int64_t* c, float* compact) {
  int32_t below = 0, at_lo = 0, at_hi = 0, inside = 0;
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t k = abs_key(row[j]);
    below += k < klo;
    at_lo += k == klo;
    at_hi += (k == khi) & distinct;
    inside += (k > klo) & (k < khi);
  }
  c[0] += below;
  c[1] += at_lo;
  c[2] += inside;
  c[3] += at_hi;
  if (inside == 0) return 0;
  // Branch-free compaction: every element is written, the cursor advances only for those inside.
  int64_t m = 0;
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t k = abs_key(row[j]);
    compact[m] = bits_float(k);
    m += static_cast<int64_t>((k > klo) & (k < khi));
  }
  return m;
}

template <typename scalar_t>
void bracket_impl(at::TensorList inputs, at::TensorList base, const TaskList& tl, const float* lo, const float* hi,
                  const DareParams& dare, const int64_t* keys, BracketState& st) {
  const auto in_ptr = data_ptrs<scalar_t>(inputs);
  const auto base_ptr = data_ptrs<scalar_t>(base);
  std::vector<HistUnit> units;
  for (int64_t t = 0; t < tl.T; ++t)
    for (int64_t l = 0; l < tl.L; ++l)
      for (int64_t b = 0; b < tl.numel[l]; b += kUnit) units.push_back({t, l, b, std::min(tl.numel[l], b + kUnit)});
  const bool simd = simd_enabled();

  at::parallel_for(0, static_cast<int64_t>(units.size()), 1, [&](int64_t u0, int64_t u1) {
    std::vector<int64_t> counts(static_cast<size_t>(tl.T * 4), 0);
    std::vector<float> unit_cand(static_cast<size_t>(kUnit + 8));  // one unit's candidates (+ packing slack)
    alignas(64) float tile[kTile];
    for (int64_t u = u0; u < u1; ++u) {
      const HistUnit& w = units[u];
      const uint32_t klo = abs_key(lo[w.t]), khi = abs_key(hi[w.t]);
      const bool distinct = khi > klo;
      // The AVX2 core compares int32 keys against k and k + 1: both bounds must be below the top key.
      const bool fast = simd && khi < 0x7fffffffu && klo < 0x7fffffffu;
      const scalar_t* in = in_ptr[w.t * tl.L + w.l];
      const scalar_t* bs = tl.has_base ? base_ptr[w.l] : nullptr;
      const bool direct = std::is_same<scalar_t, float>::value && bs == nullptr && dare.p <= 0.f;
      const uint64_t dkey = keys != nullptr ? static_cast<uint64_t>(keys[w.t * tl.L + w.l]) : 0u;
      int64_t* c = counts.data() + w.t * 4;
      int64_t m = 0;
      for (int64_t i0 = w.begin; i0 < w.end; i0 += kTile) {
        const int64_t n = std::min(kTile, w.end - i0);
        const float* row = tile;
        if (direct) {
          row = reinterpret_cast<const float*>(in) + i0;
        } else {
          load_tau_tile(in, bs, i0, n, dare, dkey, tile, simd);
        }
        int64_t done = 0;
#if defined(CALM_FAST_HAVE_AVX2)
        if (fast) {
          done = n & ~int64_t{7};
          avx2::BracketCounts bc;
          m += avx2::bracket_row(row, done, static_cast<int32_t>(klo), static_cast<int32_t>(khi), distinct, bc,
                                 unit_cand.data() + m);
          c[0] += bc.below;
          c[1] += bc.at_lo;
          c[2] += bc.inside;
          c[3] += bc.at_hi;
        }
#endif
        m += bracket_row_generic(row + done, n - done, klo, khi, distinct, c, unit_cand.data() + m);
      }
      st.append(w.t, unit_cand.data(), m);
    }
    std::lock_guard<std::mutex> lock(st.mutex);
    for (size_t i = 0; i < counts.size(); ++i) st.counts[i] += counts[i];
  });
}

std::tuple<at::Tensor, at::Tensor> abs_bracket_cpu(at::TensorList inputs, at::TensorList base, int64_t num_tasks,
                                                   const at::Tensor& lo, const at::Tensor& hi, int64_t capacity,
                                                   double dare_p, const c10::optional<at::Tensor>& dare_keys,
                                                   bool dare_rescale) {
  constexpr const char* op = "calm_fast.abs_bracket";
  const TaskList tl = check_task_list(op, inputs, base, num_tasks);
  const std::pair<at::Tensor, at::Tensor> bounds = check_bracket(op, lo, hi, capacity, num_tasks, tl);
  const at::Tensor& lo_c = bounds.first;
  const at::Tensor& hi_c = bounds.second;
  check_dare(op, dare_p, dare_keys, tl);
  at::Tensor cand = at::empty({num_tasks, capacity}, at::kFloat);
  advise_huge_pages(cand);
  BracketState st;
  st.counts.assign(static_cast<size_t>(num_tasks * 4), 0);
  st.cand = cand.data_ptr<float>();
  st.capacity = capacity;
  st.used.reset(new std::atomic<int64_t>[static_cast<size_t>(std::max<int64_t>(num_tasks, 1))]);
  for (int64_t t = 0; t < num_tasks; ++t) st.used[t].store(0);
  if (tl.L > 0) {
    const at::Tensor keys = dare_keys.has_value() ? dare_keys->contiguous() : at::Tensor();
    const DareParams dare = make_dare(dare_p, dare_rescale);
    CF_DISPATCH_FLOAT(tl.dtype, [&] {
      bracket_impl<scalar_t>(inputs, base, tl, lo_c.data_ptr<float>(), hi_c.data_ptr<float>(), dare,
                             keys.defined() ? keys.data_ptr<int64_t>() : nullptr, st);
    });
  }
  at::Tensor counts = at::empty({num_tasks, 4}, at::kLong);
  std::memcpy(counts.data_ptr<int64_t>(), st.counts.data(), sizeof(int64_t) * st.counts.size());
  return {counts, cand};
}

// --------------------------------------------------------------------------------------------------
// abs_kth_per_tensor: the exact ks[t, l]-th smallest |tau| key of every (task, tensor) pair in one call
// (per-tensor TIES / DARE-TIES thresholds), instead of one selection call per tensor from Python.
// Each pair is one work item, handed to the threads largest first (dynamic: a few large tensors and many
// small ones balance).  An item is selected exactly on its fp32 magnitude keys (the order of
// abs_histogram_: bit patterns with the sign cleared), so the result is the one of the histogram and
// bracket selects:
//   n <= kKthDirect        all keys into a buffer, std::nth_element;
//   otherwise              one pass counts the high 15 bits of the keys (and keeps the keys in a
//                          buffer when n <= kKthBuffered), then the keys of the bucket holding the k-th
//                          are collected (from the buffer, or by a second pass over the inputs) and
//                          std::nth_element picks the exact key among them.
// --------------------------------------------------------------------------------------------------
constexpr int64_t kKthDirect = int64_t{1} << 14;
constexpr int64_t kKthBuffered = int64_t{1} << 22;  // 16 MiB of keys per thread at most

struct KthItem {
  int64_t t, l;
};

template <typename scalar_t>
void kth_per_tensor_impl(at::TensorList inputs, at::TensorList base, const TaskList& tl, const int64_t* ks,
                         const DareParams& dare, const int64_t* keys, float* out) {
  const auto in_ptr = data_ptrs<scalar_t>(inputs);
  const auto base_ptr = data_ptrs<scalar_t>(base);
  std::vector<KthItem> items;
  for (int64_t t = 0; t < tl.T; ++t) {
    for (int64_t l = 0; l < tl.L; ++l) {
      out[t * tl.L + l] = 0.f;  // k == 0: keep everything (selection.KEEP_ALL)
      if (ks[t * tl.L + l] > 0) items.push_back({t, l});
    }
  }
  std::stable_sort(items.begin(), items.end(),
                   [&](const KthItem& a, const KthItem& b) { return tl.numel[a.l] > tl.numel[b.l]; });
  const int64_t count = static_cast<int64_t>(items.size());
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), count);
  if (workers == 0) return;
  const bool simd = simd_enabled();
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    std::vector<uint32_t> buf, bucket;
    std::vector<int64_t> hist;
    alignas(64) float tile[kTile];
    for (int64_t i = next.fetch_add(1); i < count; i = next.fetch_add(1)) {
      const KthItem& it = items[i];
      const int64_t ti = it.t * tl.L + it.l;
      const int64_t n = tl.numel[it.l], k = ks[ti];
      const scalar_t* in = in_ptr[ti];
      const scalar_t* bs = tl.has_base ? base_ptr[it.l] : nullptr;
      const uint64_t dkey = keys != nullptr ? static_cast<uint64_t>(keys[ti]) : 0u;
      // f(i0, m, key) for every tile of the item's |tau| keys (DARE applied, as abs_histogram_).
      auto for_each_tile = [&](auto&& f) {
        alignas(64) uint32_t key[kTile];
        for (int64_t i0 = 0; i0 < n; i0 += kTile) {
          const int64_t m = std::min(kTile, n - i0);
          load_tau_tile(in, bs, i0, m, dare, dkey, tile, simd);
          for (int64_t j = 0; j < m; ++j) key[j] = abs_key(tile[j]);
          f(i0, m, key);
        }
      };
      if (n <= kKthDirect) {
        buf.resize(static_cast<size_t>(n));
        for_each_tile([&](int64_t i0, int64_t m, const uint32_t* key) {
          std::memcpy(buf.data() + i0, key, sizeof(uint32_t) * m);
        });
        std::nth_element(buf.begin(), buf.begin() + (k - 1), buf.end());
        out[ti] = bits_float(buf[k - 1]);
        continue;
      }
      const bool buffered = n <= kKthBuffered;
      if (buffered) buf.resize(static_cast<size_t>(n));
      hist.assign(kHistHighBins, 0);
      for_each_tile([&](int64_t i0, int64_t m, const uint32_t* key) {
        if (buffered) std::memcpy(buf.data() + i0, key, sizeof(uint32_t) * m);
        for (int64_t j = 0; j < m; ++j) hist[key[j] >> 16] += 1;
      });
      int64_t below = 0;
      uint32_t b = 0;
      while (below + hist[b] < k) below += hist[b++];  // k <= n: stops at a bucket holding the k-th
      bucket.clear();
      bucket.reserve(static_cast<size_t>(hist[b]));
      if (buffered) {
        for (int64_t j = 0; j < n; ++j)
          if ((buf[j] >> 16) == b) bucket.push_back(buf[j]);
      } else {
        for_each_tile([&](int64_t, int64_t m, const uint32_t* key) {
          for (int64_t j = 0; j < m; ++j)
            if ((key[j] >> 16) == b) bucket.push_back(key[j]);
        });
      }
      const int64_t r = k - below;  // 1-indexed rank inside the bucket
      std::nth_element(bucket.begin(), bucket.begin() + (r - 1), bucket.end());
      out[ti] = bits_float(bucket[r - 1]);
    }
  });
}

at::Tensor abs_kth_per_tensor_cpu(at::TensorList inputs, at::TensorList base, int64_t num_tasks, const at::Tensor& ks,
                                  double dare_p, const c10::optional<at::Tensor>& dare_keys, bool dare_rescale) {
  constexpr const char* op = "calm_fast.abs_kth_per_tensor";
  const TaskList tl = check_task_list(op, inputs, base, num_tasks);
  check_dare(op, dare_p, dare_keys, tl);
  at::Tensor out = at::empty({num_tasks, tl.L}, at::kFloat);
  if (tl.L == 0) return out;
  const at::Tensor k = check_table(op, "ks", ks, tl, at::kLong);
  const int64_t* kp = k.data_ptr<int64_t>();
  for (int64_t t = 0; t < tl.T; ++t)
    for (int64_t l = 0; l < tl.L; ++l)
      TORCH_CHECK(kp[t * tl.L + l] >= 0 && kp[t * tl.L + l] <= tl.numel[l], op, ": ks[", t, ", ", l, "]=",
                  kp[t * tl.L + l], " is not in [0, ", tl.numel[l], "] (the tensor's size)");
  const at::Tensor keys = dare_keys.has_value() ? dare_keys->contiguous() : at::Tensor();
  const DareParams dare = make_dare(dare_p, dare_rescale);
  CF_DISPATCH_FLOAT(tl.dtype, [&] {
    kth_per_tensor_impl<scalar_t>(inputs, base, tl, kp, dare, keys.defined() ? keys.data_ptr<int64_t>() : nullptr,
                                  out.data_ptr<float>());
  });
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace calm_fast

TORCH_LIBRARY_IMPL(calm_fast, CPU, m) {
  m.impl("abs_histogram_", &calm_fast::cpu::abs_histogram_cpu);
  m.impl("abs_bracket", &calm_fast::cpu::abs_bracket_cpu);
  m.impl("abs_kth_per_tensor", &calm_fast::cpu::abs_kth_per_tensor_cpu);
}
