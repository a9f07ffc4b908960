// SelfExtend decode attention read straight from vLLM's CPU paged KV cache (x86-64, AVX-512F).
//
// The maths. One query per request, at position p = S - 1 over S cached keys, window w, group size
// G (per request). The cache holds every key rotated to its *grouped* position j / G ("stored key"
// K~_j = R(j / G) k_j, R = RoPE rotation). SelfExtend scores
//
//   grouped keys    j <  f = max(0, S - w):  s_j = scale * < qg , K~_j >
//   neighbour keys  j >= f               :  s_j = scale * < qp , R(delta_j) K~_j >,  delta_j = j - j / G
//
// qp = R(p) q is the query at its own position (what vLLM's rotary layer hands the attention) and
// qg = R(p / G + w - w / G) q the query at its grouped position. R(delta_j) K~_j = R(j) k_j is the
// neighbour key moved back to its own position, so a neighbour pair scores at its true distance
// p - j and a grouped pair at (p / G + w - w / G) - j / G -- SelfExtend's two distances. Nothing is
// written to the cache: the neighbour rotation happens in registers, key by key. One softmax over
// the whole row; the output is sum_j softmax(s)_j V_j and the row's log-sum-exp log sum_j exp(s_j) is
// returned too, so a caller can merge this with attention over other keys.
// G == 1 is plain attention: every key is scored against qp (delta = 0).
//
// qg is either given (query_grouped) or made here from qp: qg = R(a) qp with
// a = qg(p) - p = (w - w / G) - (p - p / G).
//
// Cache layout (vLLM 0.32 CPU attention, ISA "vec" and "vec16"; not "amx"): key_cache / value_cache
// are [num_blocks, Hkv, B, D] views in which each (block, kv head) page is B * D contiguous elements.
// A key page is stored transposed, [D, B] (row d holds dim d of the B slots), so 16 consecutive
// slots of one dim are one vector load; a value page is plain [B, D].
//
// Rotation table (selfextend.vllm.rotations.RotationTable): cos_t / sin_t float32 [rd / 2, ncols],
// TRANSPOSED: row i holds cos / sin(delta * inv_freq[i]) for delta = 0 .. ncols - 1. Across 16
// consecutive slots delta_j grows by 0 or 1 per slot, so their 16 cosines lie within 16 consecutive
// columns: one unaligned load from column delta_{j0} and one in-register permute. The table must
// hold max(max S, w) + 16 columns (RotationTable pads 16). Rotary pairs are rotate-half
// (d, d + rd / 2); dims d >= rd (partial rotary) are not rotated.
//
// Work split: items (request, kv head, key range), largest first, taken from an atomic counter by
// at::get_num_threads() workers. Long rows are cut into block-aligned pieces so every thread has
// work; pieces of a row are merged by log-sum-exp at the end. All R = Hq / Hkv query heads of a kv
// head are scored together, so each key is loaded (and rotated) once per kv head.

#include "common.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

namespace {

using namespace selfextend;  // common.h

// ---------------------------------------------------------------------------------------------
// the problem
// ---------------------------------------------------------------------------------------------

template <typename T>
struct Problem : PagedRequests<T> {
  const T* qp;  // [N, Hq, D] query at p (last dim contiguous)
  const T* qg;  // [N, Hq, D] query at qg(p), or nullptr: rotated here from qp
  int64_t qp_stride_n, qp_stride_h, qg_stride_n, qg_stride_h;
  T* out;  // [N, Hq, D] (last dim contiguous)
  int64_t out_stride_n, out_stride_h;
  float* lse;  // [N, Hq] contiguous
  int64_t hq;
};

struct Item {
  int32_t n, h, k0, k1;  // request, kv head, keys k0 .. k1 - 1
  int32_t part;          // index of its partial result; -1 when it covers the whole row
};

// ---------------------------------------------------------------------------------------------
// scores of R query heads (q: R rows of D floats, already scaled) over NC chunks of 16 slots;
// dim d of chunk c is the row at kp[c] + d * ldk
// ---------------------------------------------------------------------------------------------

template <int R, int D, int NC, typename T>
inline void scores_grouped(const float* q, const T* const* kp, int64_t ldk, __m512 (&s)[R][NC]) {
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < NC; ++c) s[i][c] = _mm512_setzero_ps();
  for (int d = 0; d < D; ++d) {
    __m512 k[NC];
    for (int c = 0; c < NC; ++c) k[c] = load16(kp[c] + d * ldk);
    for (int i = 0; i < R; ++i) {
      __m512 qd = _mm512_set1_ps(q[i * D + d]);
      for (int c = 0; c < NC; ++c) s[i][c] = _mm512_fmadd_ps(qd, k[c], s[i][c]);
    }
  }
}

// The same with every key first rotated by its own delta_j (chunk c: base[c], idx[c]):
//   lo' = lo cos - hi sin,  hi' = hi cos + lo sin   for the pair (d, d + half).
template <int R, int D, int NC, typename T>
inline void scores_neighbour(const float* q, const T* const* kp, int64_t ldk, const float* cos_t,
                             const float* sin_t, int64_t ncols, int64_t half, const int32_t* base,
                             const __m512i* idx, __m512 (&s)[R][NC]) {
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < NC; ++c) s[i][c] = _mm512_setzero_ps();
  for (int64_t d = 0; d < half; ++d) {
    const float* crow = cos_t + d * ncols;
    const float* srow = sin_t + d * ncols;
    for (int c = 0; c < NC; ++c) {
      __m512 cs = _mm512_permutexvar_ps(idx[c], _mm512_loadu_ps(crow + base[c]));
      __m512 sn = _mm512_permutexvar_ps(idx[c], _mm512_loadu_ps(srow + base[c]));
      __m512 lo = load16(kp[c] + d * ldk);
      __m512 hi = load16(kp[c] + (d + half) * ldk);
      __m512 rlo = _mm512_fmsub_ps(lo, cs, _mm512_mul_ps(hi, sn));
      __m512 rhi = _mm512_fmadd_ps(hi, cs, _mm512_mul_ps(lo, sn));
      for (int i = 0; i < R; ++i) {
        s[i][c] = _mm512_fmadd_ps(_mm512_set1_ps(q[i * D + d]), rlo, s[i][c]);
        s[i][c] = _mm512_fmadd_ps(_mm512_set1_ps(q[i * D + d + half]), rhi, s[i][c]);
      }
    }
  }
  for (int64_t d = 2 * half; d < D; ++d) {  // partial rotary: the rest passes through
    for (int c = 0; c < NC; ++c) {
      __m512 k = load16(kp[c] + d * ldk);
      for (int i = 0; i < R; ++i) s[i][c] = _mm512_fmadd_ps(_mm512_set1_ps(q[i * D + d]), k, s[i][c]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// one work item: online softmax over its key range
// ---------------------------------------------------------------------------------------------

// qp and qg of the R query heads of kv head it.h, in float32, times scale.
template <int R, int D, typename T>
void load_queries(const Problem<T>& x, const Item& it, int64_t S, int64_t g, float* qg, float* qp) {
  for (int i = 0; i < R; ++i) {
    const int64_t head = it.h * R + i;
    const T* src = x.qp + it.n * x.qp_stride_n + head * x.qp_stride_h;
    for (int d = 0; d < D; ++d) qp[i * D + d] = to_float(src[d]) * x.scale;
    if (g == 1) {  // plain attention: qg(p) = p
      std::copy(qp + i * D, qp + (i + 1) * D, qg + i * D);
    } else if (x.qg != nullptr) {
      const T* gsrc = x.qg + it.n * x.qg_stride_n + head * x.qg_stride_h;
      for (int d = 0; d < D; ++d) qg[i * D + d] = to_float(gsrc[d]) * x.scale;
    } else {
      // qg(p) - p = (w - w / G) - (p - p / G); rotate the unscaled query, then scale
      const int64_t p = S - 1;
      const int64_t a = (x.window - x.window / g) - (p - p / g);
      const int64_t col = a >= 0 ? a : -a;
      const float sign = a >= 0 ? 1.0f : -1.0f;  // sin(-x) = -sin(x)
      for (int64_t d = 0; d < x.half; ++d) {
        const float c = x.cos_t[d * x.ncols + col], sn = sign * x.sin_t[d * x.ncols + col];
        const float lo = to_float(src[d]), hi = to_float(src[d + x.half]);
        qg[i * D + d] = (lo * c - hi * sn) * x.scale;
        qg[i * D + d + x.half] = (hi * c + lo * sn) * x.scale;
      }
      for (int64_t d = 2 * x.half; d < D; ++d) qg[i * D + d] = to_float(src[d]) * x.scale;
    }
  }
}

// acc[i][:] += sum over the valid slots t of chunk c of prob[i][16 c + t] * V_t,
// with V_t the row of D values at vp[c] + t * D.
template <int R, int D, int NC, typename T>
inline void accumulate_values(float* acc, const float* prob, const T* const* vp, const int* nvalid) {
  constexpr int DV = D / 16;
  constexpr int TILE = 16 * NC;
  __m512 a[R][DV];
  for (int i = 0; i < R; ++i)
    for (int u = 0; u < DV; ++u) a[i][u] = _mm512_load_ps(acc + i * D + 16 * u);
  for (int c = 0; c < NC; ++c) {
    const T* vr = vp[c];
    for (int t = 0; t < nvalid[c]; ++t, vr += D) {
      __m512 v[DV];
      for (int u = 0; u < DV; ++u) v[u] = load16(vr + 16 * u);
      for (int i = 0; i < R; ++i) {
        const __m512 pb = _mm512_set1_ps(prob[i * TILE + 16 * c + t]);
        for (int u = 0; u < DV; ++u) a[i][u] = _mm512_fmadd_ps(pb, v[u], a[i][u]);
      }
    }
  }
  for (int i = 0; i < R; ++i)
    for (int u = 0; u < DV; ++u) _mm512_store_ps(acc + i * D + 16 * u, a[i][u]);
}

// Keys it.k0 .. it.k1 - 1 of request it.n, kv head it.h, in tiles of NC chunks of 16 slots (a
// chunk never crosses a block: B is a multiple of 16 and items start on a block boundary).
// Whole rows write out / lse; pieces of a split row write (acc, m, l) to part_*.
template <int R, int D, int NC, typename T>
void run_item(const Problem<T>& x, const Item& it, float* part_acc, float* part_m, float* part_l) {
  constexpr int DV = D / 16;
  constexpr int TILE = 16 * NC;
  const int64_t S = x.seq_lens[it.n];
  const int64_t g = x.group_size[it.n];
  const int64_t f = g == 1 ? S : std::max<int64_t>(0, S - x.window);  // first neighbour key
  const int64_t B = x.block_size;
  const int32_t* bt = x.block_table + it.n * x.bt_stride;

  alignas(64) float qg[R * D];
  alignas(64) float qp[R * D];
  load_queries<R, D>(x, it, S, g, qg, qp);

  alignas(64) float acc[R * D];  // unnormalised output (in registers inside the value loop)
  float m[R], l[R];              // running max and sum of exp(s - m)
  for (int i = 0; i < R; ++i) {
    m[i] = kNegInf;
    l[i] = 0.0f;
  }
  std::fill(acc, acc + R * D, 0.0f);
  alignas(64) float prob[R][TILE];

  const int64_t k_head = it.h * x.k_stride_head, v_head = it.h * x.v_stride_head;
  int64_t blk = it.k0 / B, off = it.k0 % B;  // block index and slot of the next chunk
  for (int64_t j = it.k0; j < it.k1; j += TILE) {
    const T* kp[NC];
    const T* vp[NC];
    int nvalid[NC];
    for (int c = 0; c < NC; ++c) {
      const int64_t jc = j + 16 * c;
      if (jc < it.k1) {
        const int64_t block = bt[blk];
        kp[c] = x.key + block * x.k_stride_block + k_head + off;  // slot `off`, dim 0 of a [D, B] page
        vp[c] = x.value + block * x.v_stride_block + v_head + off * D;  // row `off` of a [B, D] page
        nvalid[c] = static_cast<int>(std::min<int64_t>(16, it.k1 - jc));
        off += 16;
        if (off == B) {
          off = 0;
          ++blk;
        }
      } else {  // past the range: scores masked below, values not read
        kp[c] = kp[0];
        vp[c] = vp[0];
        nvalid[c] = 0;
      }
    }
    const int64_t tile_end = std::min<int64_t>(j + TILE, it.k1);
    __m512 s[R][NC];
    if (tile_end <= f) {
      scores_grouped<R, D, NC>(qg, kp, B, s);
    } else {
      int32_t base[NC];
      __m512i idx[NC];
      for (int c = 0; c < NC; ++c) chunk_deltas(nvalid[c] ? j + 16 * c : j, g, &base[c], &idx[c]);
      scores_neighbour<R, D, NC>(qp, kp, B, x.cos_t, x.sin_t, x.ncols, x.half, base, idx, s);
      if (j < f) {  // the tile where the grouped keys end: slots before f take the grouped score
        __m512 sg[R][NC];
        scores_grouped<R, D, NC>(qg, kp, B, sg);
        for (int c = 0; c < NC; ++c) {
          const int64_t ngrouped = std::clamp<int64_t>(f - (j + 16 * c), 0, 16);
          const __mmask16 grouped = static_cast<__mmask16>((1u << ngrouped) - 1u);
          for (int i = 0; i < R; ++i) s[i][c] = _mm512_mask_mov_ps(s[i][c], grouped, sg[i][c]);
        }
      }
    }
    // slots past the range (beyond seq_len, or past k1) score -inf: their exp is exactly 0
    for (int c = 0; c < NC; ++c) {
      if (nvalid[c] < 16) {
        const __mmask16 valid = static_cast<__mmask16>((1u << nvalid[c]) - 1u);
        for (int i = 0; i < R; ++i) s[i][c] = _mm512_mask_mov_ps(_mm512_set1_ps(kNegInf), valid, s[i][c]);
      }
    }
    // online softmax: rescale what is accumulated when the running max grows
    for (int i = 0; i < R; ++i) {
      __m512 mx = s[i][0];
      for (int c = 1; c < NC; ++c) mx = _mm512_max_ps(mx, s[i][c]);
      const float tile_max = _mm512_reduce_max_ps(mx);
      if (tile_max > m[i]) {
        const float alpha = std::exp(m[i] - tile_max);  // 0 on the first tile
        l[i] *= alpha;
        const __m512 av = _mm512_set1_ps(alpha);
        for (int v = 0; v < DV; ++v)
          _mm512_store_ps(acc + i * D + 16 * v, _mm512_mul_ps(_mm512_load_ps(acc + i * D + 16 * v), av));
        m[i] = tile_max;
      }
      const __m512 mv = _mm512_set1_ps(m[i]);
      __m512 sum = _mm512_setzero_ps();
      for (int c = 0; c < NC; ++c) {
        __m512 pr = exp512(_mm512_sub_ps(s[i][c], mv));
        sum = _mm512_add_ps(sum, pr);
        _mm512_store_ps(&prob[i][16 * c], pr);
      }
      l[i] += _mm512_reduce_add_ps(sum);
    }
    accumulate_values<R, D, NC>(acc, &prob[0][0], vp, nvalid);
  }

  if (it.part < 0) {  // the whole row: final output and log-sum-exp
    for (int i = 0; i < R; ++i) {
      const int64_t head = it.h * R + i;
      T* dst = x.out + it.n * x.out_stride_n + head * x.out_stride_h;
      const float inv = 1.0f / l[i];
      for (int d = 0; d < D; ++d) dst[d] = from_float<T>(acc[i * D + d] * inv);
      x.lse[it.n * x.hq + head] = m[i] + std::log(l[i]);
    }
  } else {
    for (int i = 0; i < R; ++i) {
      std::copy(acc + i * D, acc + (i + 1) * D, part_acc + i * D);
      part_m[i] = m[i];
      part_l[i] = l[i];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// driver: split into items, run them on all threads, merge the split rows
// ---------------------------------------------------------------------------------------------

template <int R, int D, typename T>
void run_all(const Problem<T>& x, int64_t n_req, int64_t hkv) {
  constexpr int NC = R <= 4 ? 4 : 2;  // chunks per tile: R * NC score vectors stay in registers
  const int64_t B = x.block_size;
  const int threads = at::get_num_threads();
  int64_t total = 0;
  for (int64_t n = 0; n < n_req; ++n) total += x.seq_lens[n];
  total *= hkv;
  // pieces of at least `piece` keys (block aligned), so that there are about 4 items per thread
  int64_t piece = std::max<int64_t>(512, (total + 4 * threads - 1) / (4 * threads));
  piece = (piece + B - 1) / B * B;

  std::vector<Item> items;
  struct Row {
    int32_t n, h, first_part, parts;
  };
  std::vector<Row> split_rows;
  int32_t n_parts = 0;
  for (int64_t n = 0; n < n_req; ++n) {
    const int64_t S = x.seq_lens[n];
    for (int64_t h = 0; h < hkv; ++h) {
      if (S == 0) {  // no key: output 0, log-sum-exp -inf
        for (int i = 0; i < R; ++i) {
          T* dst = x.out + n * x.out_stride_n + (h * R + i) * x.out_stride_h;
          for (int d = 0; d < D; ++d) dst[d] = from_float<T>(0.0f);
          x.lse[n * x.hq + h * R + i] = kNegInf;
        }
        continue;
      }
      const int64_t k = (S + piece - 1) / piece;
      if (k == 1) {
        items.push_back({(int32_t)n, (int32_t)h, 0, (int32_t)S, -1});
        continue;
      }
      split_rows.push_back({(int32_t)n, (int32_t)h, n_parts, 0});
      const int64_t step = ((S + k - 1) / k + B - 1) / B * B;
      for (int64_t k0 = 0; k0 < S; k0 += step)
        items.push_back({(int32_t)n, (int32_t)h, (int32_t)k0, (int32_t)std::min(S, k0 + step), n_parts++});
      split_rows.back().parts = n_parts - split_rows.back().first_part;
    }
  }
  std::stable_sort(items.begin(), items.end(),
                   [](const Item& a, const Item& b) { return a.k1 - a.k0 > b.k1 - b.k0; });
  std::vector<float> part_acc((size_t)n_parts * R * D), part_m((size_t)n_parts * R), part_l((size_t)n_parts * R);

  std::atomic<int64_t> next{0};
  const int64_t n_items = static_cast<int64_t>(items.size());
  const int workers = static_cast<int>(std::min<int64_t>(threads, n_items));
  auto work = [&]() {
    for (int64_t k; (k = next.fetch_add(1)) < n_items;) {
      const Item& it = items[k];
      const int64_t p = it.part < 0 ? 0 : it.part;
      run_item<R, D, NC>(x, it, part_acc.data() + p * R * D, part_m.data() + p * R, part_l.data() + p * R);
    }
  };
  if (workers <= 1) {
    work();
  } else {
    at::parallel_for(0, workers, 1, [&](int64_t, int64_t) { work(); });
  }

  // split rows: o = sum_q exp(m_q - M) acc_q / sum_q exp(m_q - M) l_q, lse = M + log(that sum)
  for (const Row& row : split_rows) {
    for (int i = 0; i < R; ++i) {
      float mx = kNegInf;
      for (int q = 0; q < row.parts; ++q) mx = std::max(mx, part_m[(row.first_part + q) * R + i]);
      alignas(64) float o[D] = {0};
      float l = 0.0f;
      for (int q = 0; q < row.parts; ++q) {
        const int64_t p = row.first_part + q;
        const float w = std::exp(part_m[p * R + i] - mx);
        l += w * part_l[p * R + i];
        for (int d = 0; d < D; ++d) o[d] += w * part_acc[(p * R + i) * D + d];
      }
      const int64_t head = row.h * R + i;
      T* dst = x.out + row.n * x.out_stride_n + head * x.out_stride_h;
      for (int d = 0; d < D; ++d) dst[d] = from_float<T>(o[d] / l);
      x.lse[row.n * x.hq + head] = mx + std::log(l);
    }
  }
}

// compiled (queries per kv head R, head size D): R = 1 .. 8, D = 32, 64, 128, 256
template <typename T>
void dispatch(const Problem<T>& x, int64_t n_req, int64_t hkv, int64_t r, int64_t d) {
#define SE_CASE(RR, DD) \
  if (r == RR && d == DD) return run_all<RR, DD, T>(x, n_req, hkv);
#define SE_ALL_R(DD) \
  SE_CASE(1, DD) SE_CASE(2, DD) SE_CASE(3, DD) SE_CASE(4, DD) SE_CASE(5, DD) SE_CASE(6, DD) SE_CASE(7, DD) SE_CASE(8, DD)
  SE_ALL_R(32)
  SE_ALL_R(64)
  SE_ALL_R(128)
  SE_ALL_R(256)
#undef SE_ALL_R
#undef SE_CASE
  TORCH_CHECK(false, "selfextend decode kernel: unsupported (query heads per kv head, head size) = (", r, ", ", d,
              "); built for 1..8 and 32 / 64 / 128 / 256");
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// entry point
// ---------------------------------------------------------------------------------------------

// Returns the log-sum-exp [N, Hq] float32; the output rows go to `out` ([N, Hq, D], query dtype).
torch::Tensor selfextend_decode(torch::Tensor query_plain, c10::optional<torch::Tensor> query_grouped,
                                torch::Tensor key_cache, torch::Tensor value_cache, torch::Tensor block_table,
                                torch::Tensor seq_lens, torch::Tensor group_size, int64_t window, double scale,
                                torch::Tensor cos_t, torch::Tensor sin_t, torch::Tensor out) {
  const int64_t n_req = query_plain.dim() == 3 ? query_plain.size(0) : 0;
  const Geometry g = check_arguments("decode kernel", "query_plain", query_plain, key_cache, value_cache, block_table,
                                     seq_lens, group_size, n_req, cos_t, sin_t, window, out, n_req);
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  int64_t max_s = 0;
  for (int64_t n = 0; n < n_req; ++n) {
    check_request(g, block_table, lens, group_size.data_ptr<int32_t>(), n, 0, true);  // a row may have no keys
    max_s = std::max<int64_t>(max_s, lens[n]);
  }
  check_table_length(g, max_s, window);
  if (query_grouped.has_value()) {
    TORCH_CHECK(query_grouped->sizes() == query_plain.sizes() && query_grouped->stride(2) == 1 &&
                    query_grouped->scalar_type() == query_plain.scalar_type(),
                "query_grouped must match query_plain (shape, dtype, contiguous last dim)");
  }

  auto lse = torch::empty({n_req, g.hq}, query_plain.options().dtype(at::kFloat));

  dispatch_dtype("decode kernel", query_plain.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    Problem<T> x;
    fill_paged<T>(x, g, key_cache, value_cache, block_table, seq_lens, group_size, window, scale, cos_t, sin_t);
    x.qp = reinterpret_cast<const T*>(query_plain.data_ptr());
    x.qp_stride_n = query_plain.stride(0);
    x.qp_stride_h = query_plain.stride(1);
    x.qg = query_grouped.has_value() ? reinterpret_cast<const T*>(query_grouped->data_ptr()) : nullptr;
    x.qg_stride_n = query_grouped.has_value() ? query_grouped->stride(0) : 0;
    x.qg_stride_h = query_grouped.has_value() ? query_grouped->stride(1) : 0;
    x.out = reinterpret_cast<T*>(out.data_ptr());
    x.out_stride_n = out.stride(0);
    x.out_stride_h = out.stride(1);
    x.lse = lse.data_ptr<float>();
    x.hq = g.hq;
    dispatch<T>(x, n_req, g.hkv, g.hq / g.hkv, g.d);
  });
  return lse;
}
