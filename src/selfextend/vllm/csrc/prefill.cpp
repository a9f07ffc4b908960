// SelfExtend attention of n >= 1 queries per request (prefill, chunked prefill, recompute) read
// straight from vLLM's CPU paged KV cache (x86-64, AVX-512F). Cache layout, rotation table and
// vector helpers: common.h.
//
// The maths. vLLM's flat token layout: request r owns tokens query_start_loc[r] .. [r + 1] - 1, the
// newest n_r of its S_r cached keys (the new keys are already written), so its token t sits at
// position p = S_r - n_r + t. Keys are stored rotated to their grouped position j / G (G per
// request). For the query at p (window w):
//
//   grouped keys    j <= p - w      :  s_j = scale * < qg(p) , K~_j >
//   neighbour keys  p - w < j <= p  :  s_j = scale * < qp    , R(delta_j) K~_j >,  delta_j = j - j / G
//   keys j > p                      :  not seen (causal)
//
// qp = R(p) q as vLLM's rotary layer hands it over, qg(p) = R(p / G + w - w / G) q made here from qp
// (one table rotation by (w - w / G) - (p - p / G)). One softmax over the row; the output is written
// into vLLM's output rows and the row's log-sum-exp is returned. G == 1 is plain causal attention
// (every key against qp as stored). Nothing is written to the cache.
//
// Tiles. A work item is (request, kv head, a tile of query tokens, a key range). Its rows are the
// (token, query head) pairs of the tile -- the R = Hq / Hkv query heads of the kv head for each
// token, up to 384 rows, so that every key and value loaded feeds many rows -- and it walks its keys
// in tiles of KT = 128 slots (8 chunks of 16 slots, a chunk never crossing a block). Per key tile:
//   1. if some row has a neighbour key in it, the tile's keys are rotated back by their own delta_j
//      into a float scratch tile [D, KT] (delta is per key, so one rotated tile serves every row);
//   2. scores, in micro-tiles of 12 rows x 32 keys (24 accumulators; every key vector loaded feeds
//      12 FMAs): a micro-tile wholly grouped reads the stored keys against qg, wholly neighbour the
//      rotated keys against qp, and only a micro-tile that straddles some row's boundary p - w runs
//      both and blends them per (row, key);
//   3. online softmax per row, causal by each row's own key count in the tile, with lazy rescaling
//      (the running max moves only when it grows by more than 8, as in vLLM's kernel);
//   4. values: acc = alpha acc + P V in micro-tiles of 6 rows x 64 dims (24 accumulators) for
//      D >= 64, 12 rows x 32 dims for D = 32.
// Row-groups that see no key of a tile skip it (the causal triangle).
//
// Work split: items are taken largest first from an atomic counter by at::get_num_threads()
// workers. When there are too few items to keep every thread busy (few tokens), items are cut
// along their keys; the pieces' (acc, max, sum) are merged by log-sum-exp at the end.

#include "common.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <vector>

namespace {

using namespace selfextend;  // common.h

constexpr int KT = 128;              // keys per key tile (a multiple of 32)
constexpr int NCH = KT / 16;         // chunks of 16 slots per key tile
constexpr int QK_ROWS = 12;          // rows of a score micro-tile (x 32 keys)
// query rows (tokens x query heads of one kv head) per work item: many, so that every key and value
// loaded from memory feeds many rows (384 for D <= 64); fewer for big heads, so that an item's
// buffers stay in L2
constexpr int64_t target_rows(int64_t d) { return std::clamp<int64_t>(24576 / d, 96, 384); }
constexpr float kRescale = 8.0f;     // the running max moves only when a tile's max exceeds it by more
constexpr int64_t kFar = int64_t(1) << 40;  // "no neighbour keys" (G = 1)

template <typename T>
struct Problem : PagedRequests<T> {
  const T* q;  // [T, Hq, D], last dim contiguous: the query at its own position p
  int64_t q_stride_t, q_stride_h;
  const int32_t* query_start_loc;  // [R + 1]
  T* out;  // [T, Hq, D], last dim contiguous
  int64_t out_stride_t, out_stride_h;
  float* lse;  // [T, Hq] contiguous
  int64_t hq, r;
};

struct Item {
  int32_t req, head;  // request, kv head
  int32_t t0, t1;     // its query tokens t0 .. t1 - 1 (counted inside the request)
  int32_t k0, k1;     // its keys k0 .. k1 - 1 (k1 <= the last token's position + 1)
  int32_t part;       // index of its partial result; -1 when it covers every key its rows see
  int64_t cost;       // about rows x keys
};

// 64-byte aligned float buffer
struct Buffer {
  float* data = nullptr;
  explicit Buffer(size_t n) {
    data = static_cast<float*>(std::aligned_alloc(64, ((n * sizeof(float) + 63) / 64) * 64));
    TORCH_CHECK(data != nullptr, "selfextend prefill kernel: out of memory");
  }
  ~Buffer() { std::free(data); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
};

// One thread's working memory for an item of up to `rows` rows.
struct Scratch {
  Buffer qp, qg, acc, scores, kr, l;  // l: 16 partial sums per row
  std::vector<float> m, alpha;
  std::vector<int64_t> lim, gend;
  Scratch(int64_t rows, int64_t d)
      : qp(rows * d), qg(rows * d), acc(rows * d), scores(rows * KT), kr(d * KT), l(rows * 16), m(rows),
        alpha(rows), lim(rows), gend(rows) {}
  float sum(int i) const { return _mm512_reduce_add_ps(_mm512_loadu_ps(l.data + 16 * i)); }
};

// ---------------------------------------------------------------------------------------------
// micro-kernels
// ---------------------------------------------------------------------------------------------

// s[i][c] = scores of row i (q + i * D, scaled floats) against the 16 keys of chunk c (k[c]: dim d
// of its 16 slots at k[c] + d * ldk), c = 0, 1.
template <int M, int D, typename K>
inline void qk_micro(const float* q, const K* k0, const K* k1, int64_t ldk, __m512 (&s)[M][2]) {
#pragma GCC unroll 16
  for (int i = 0; i < M; ++i) s[i][0] = s[i][1] = _mm512_setzero_ps();
#pragma GCC unroll 4
  for (int d = 0; d < D; ++d) {
    const __m512 a = load16(k0 + d * ldk);
    const __m512 b = load16(k1 + d * ldk);
#pragma GCC unroll 16
    for (int i = 0; i < M; ++i) {
      const __m512 qd = _mm512_set1_ps(q[i * D + d]);
      s[i][0] = _mm512_fmadd_ps(qd, a, s[i][0]);
      s[i][1] = _mm512_fmadd_ps(qd, b, s[i][1]);
    }
  }
}

// acc[i][dofs .. dofs + 16 DV) = alpha[i] acc[i][...] + sum_{t < nk} prob[i][t] V_t[dofs ...], with
// V_t the row of D values at vc[t / 16] + (t % 16) * D.
template <int M, int DV, int D, typename T>
inline void pv_micro(float* acc, const float* prob, const T* const* vc, int nk, const float* alpha, int dofs) {
  __m512 a[M][DV];
#pragma GCC unroll 16
  for (int i = 0; i < M; ++i) {
    const __m512 al = _mm512_set1_ps(alpha[i]);
#pragma GCC unroll 4
    for (int u = 0; u < DV; ++u) a[i][u] = _mm512_mul_ps(_mm512_loadu_ps(acc + i * D + dofs + 16 * u), al);
  }
  for (int c = 0; 16 * c < nk; ++c) {
    const T* vr = vc[c] + dofs;
    const float* pc = prob + 16 * c;
    const int tn = std::min(16, nk - 16 * c);
    for (int t = 0; t < tn; ++t, vr += D) {
      __m512 v[DV];
#pragma GCC unroll 4
      for (int u = 0; u < DV; ++u) v[u] = load16(vr + 16 * u);
#pragma GCC unroll 16
      for (int i = 0; i < M; ++i) {
        const __m512 pb = _mm512_set1_ps(pc[i * KT + t]);
#pragma GCC unroll 4
        for (int u = 0; u < DV; ++u) a[i][u] = _mm512_fmadd_ps(pb, v[u], a[i][u]);
      }
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < M; ++i)
#pragma GCC unroll 4
    for (int u = 0; u < DV; ++u) _mm512_storeu_ps(acc + i * D + dofs + 16 * u, a[i][u]);
}

// ---------------------------------------------------------------------------------------------
// one key tile
// ---------------------------------------------------------------------------------------------

// The nch chunks of a key tile starting at key j0, rotated back by delta_j = j - j / G into kr
// ([D, KT] floats, chunk c at column 16 c).
template <int D, typename T>
void rotate_tile(const Problem<T>& x, const T* const* kc, int nch, int64_t j0, int64_t g, float* kr) {
  const int64_t B = x.block_size;
  for (int c = 0; c < nch; ++c) {
    int32_t base;
    __m512i idx;
    chunk_deltas(j0 + 16 * c, g, &base, &idx);
    const T* kp = kc[c];
    float* o = kr + 16 * c;
    for (int64_t d = 0; d < x.half; ++d) {
      const __m512 cs = _mm512_permutexvar_ps(idx, _mm512_loadu_ps(x.cos_t + d * x.ncols + base));
      const __m512 sn = _mm512_permutexvar_ps(idx, _mm512_loadu_ps(x.sin_t + d * x.ncols + base));
      const __m512 lo = load16(kp + d * B);
      const __m512 hi = load16(kp + (d + x.half) * B);
      _mm512_storeu_ps(o + d * KT, _mm512_fmsub_ps(lo, cs, _mm512_mul_ps(hi, sn)));
      _mm512_storeu_ps(o + (d + x.half) * KT, _mm512_fmadd_ps(hi, cs, _mm512_mul_ps(lo, sn)));
    }
    for (int64_t d = 2 * x.half; d < D; ++d) _mm512_storeu_ps(o + d * KT, load16(kp + d * B));
  }
}

// Scores of rows i0 .. i0 + M - 1 against keys j0 + js .. j0 + js + 31 of the tile (chunks js / 16
// and js / 16 + 1; the second may lie past the tile: then its lanes are garbage that the softmax
// never reads). Grouped keys (j < gend[i]) against qg as stored, neighbour keys against qp rotated.
template <int M, int D, typename T>
void qk_group(const Problem<T>& x, const Scratch& s, float* scores, int i0, int64_t j0, int js,
              const T* const* kc, int nch) {
  const int c0 = js / 16, c1 = std::min(c0 + 1, nch - 1);
  const int64_t j = j0 + js;
  const bool need_grouped = j < s.gend[i0 + M - 1];    // some row has a grouped key here
  const bool need_neighbour = j + 32 > s.gend[i0];     // some row has a neighbour key here
  float* out = scores + i0 * KT + js;
  __m512 sc[M][2];
  if (need_grouped) {
    qk_micro<M, D>(s.qg.data + i0 * D, kc[c0], kc[c1], x.block_size, sc);
#pragma GCC unroll 16
    for (int i = 0; i < M; ++i) {
      _mm512_storeu_ps(out + i * KT, sc[i][0]);
      _mm512_storeu_ps(out + i * KT + 16, sc[i][1]);
    }
  }
  if (need_neighbour) {
    qk_micro<M, D>(s.qp.data + i0 * D, s.kr.data + 16 * c0, s.kr.data + 16 * c1, KT, sc);
#pragma GCC unroll 16
    for (int i = 0; i < M; ++i) {
      if (!need_grouped) {
        _mm512_storeu_ps(out + i * KT, sc[i][0]);
        _mm512_storeu_ps(out + i * KT + 16, sc[i][1]);
        continue;
      }
      // lanes at keys >= gend[i] take the neighbour score
      for (int c = 0; c < 2; ++c) {
        const int64_t grouped = std::clamp<int64_t>(s.gend[i0 + i] - (j + 16 * c), 0, 16);
        const __mmask16 mask = static_cast<__mmask16>(~((1u << grouped) - 1u));
        _mm512_mask_storeu_ps(out + i * KT + 16 * c, mask, sc[i][c]);
      }
    }
  }
}

template <int D, typename T>
void qk_rows(const Problem<T>& x, const Scratch& s, int i0, int m, int64_t j0, int js, const T* const* kc,
             int nch) {
  float* scores = s.scores.data;
  switch (m) {
#define SE_QK(MM) \
  case MM:        \
    return qk_group<MM, D>(x, s, scores, i0, j0, js, kc, nch);
    SE_QK(1) SE_QK(2) SE_QK(3) SE_QK(4) SE_QK(5) SE_QK(6) SE_QK(7) SE_QK(8) SE_QK(9) SE_QK(10) SE_QK(11) SE_QK(12)
#undef SE_QK
  }
}

template <int D, typename T>
void pv_rows(Scratch& s, int i0, int m, const T* const* vc, int nk) {
  constexpr int DV = D >= 64 ? 4 : 2;  // vectors of 16 dims per pass
  constexpr int MAXM = 24 / DV;        // rows per pass: 24 accumulators
  float* acc = s.acc.data + i0 * D;
  const float* prob = s.scores.data + i0 * KT;
  const float* alpha = s.alpha.data() + i0;
  for (int dofs = 0; dofs < D; dofs += 16 * DV) {
    switch (m) {
#define SE_PV(MM)                                                           \
  case MM:                                                                  \
    if constexpr (MM <= MAXM) pv_micro<MM, DV, D>(acc, prob, vc, nk, alpha, dofs); \
    break;
      SE_PV(1) SE_PV(2) SE_PV(3) SE_PV(4) SE_PV(5) SE_PV(6) SE_PV(7) SE_PV(8) SE_PV(9) SE_PV(10) SE_PV(11)
      SE_PV(12)
#undef SE_PV
    }
  }
}

// Online softmax of row i over the tile's keys: its first `n` scores count (n = its causal key
// count in the tile), the rest up to `width` (the item's widest row) become probability 0. Lazy
// rescaling (as vLLM's CPU kernel and FlashAttention 4 do): the running max m moves only when the
// tile's max exceeds it by more than kRescale, so most tiles need no exp(m_old - m_new) and no
// rescaling of the row's output; probabilities exp(s - m) <= e^8 are exact enough in float32.
inline void softmax_row(Scratch& s, int i, int n, int width) {
  float* row = s.scores.data + i * KT;
  const int chunks = (width + 15) / 16;
  s.alpha[i] = 1.0f;
  if (n <= 0) {
    for (int c = 0; c < chunks; ++c) _mm512_storeu_ps(row + 16 * c, _mm512_setzero_ps());
    return;
  }
  const int full = n / 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (n % 16)) - 1u);
  __m512 mx = _mm512_set1_ps(kNegInf);
  for (int c = 0; c < full; ++c) mx = _mm512_max_ps(mx, _mm512_loadu_ps(row + 16 * c));
  if (tail) mx = _mm512_mask_max_ps(mx, tail, mx, _mm512_loadu_ps(row + 16 * full));
  const float tile_max = _mm512_reduce_max_ps(mx);
  float* l = s.l.data + 16 * i;
  if (tile_max > s.m[i] + kRescale) {  // (always on the row's first keys: m = -inf)
    const float alpha = std::exp(s.m[i] - tile_max);  // 0 on the first keys
    _mm512_storeu_ps(l, _mm512_mul_ps(_mm512_loadu_ps(l), _mm512_set1_ps(alpha)));
    s.alpha[i] = alpha;
    s.m[i] = tile_max;
  }
  const __m512 mv = _mm512_set1_ps(s.m[i]);
  __m512 sum = _mm512_loadu_ps(l);
  for (int c = 0; c < full; ++c) {
    const __m512 p = exp512(_mm512_sub_ps(_mm512_loadu_ps(row + 16 * c), mv));
    sum = _mm512_add_ps(sum, p);
    _mm512_storeu_ps(row + 16 * c, p);
  }
  int c = full;
  if (tail) {
    const __m512 p = _mm512_maskz_mov_ps(tail, exp512(_mm512_sub_ps(_mm512_loadu_ps(row + 16 * c), mv)));
    sum = _mm512_add_ps(sum, p);
    _mm512_storeu_ps(row + 16 * c, p);
    ++c;
  }
  for (; c < chunks; ++c) _mm512_storeu_ps(row + 16 * c, _mm512_setzero_ps());
  _mm512_storeu_ps(l, sum);
}

// ---------------------------------------------------------------------------------------------
// one work item
// ---------------------------------------------------------------------------------------------

// qp (scaled) and qg = qp rotated by (w - w / G) - (p - p / G) (scaled) of every row; the rows'
// causal ends and first neighbour keys. Rows are token-major: row i is token i / R, query head i % R.
template <int D, typename T>
void load_queries(const Problem<T>& x, const Item& it, int64_t first_pos, int64_t g, Scratch& s) {
  const int64_t tok0 = x.query_start_loc[it.req] + it.t0;
  const __m512 scale = _mm512_set1_ps(x.scale);
  alignas(64) float cs[D / 2], sn[D / 2];
  for (int64_t t = 0; t < it.t1 - it.t0; ++t) {
    const int64_t p = first_pos + t;
    const int64_t gend = g == 1 ? kFar : p - x.window + 1;
    const bool grouped = g > 1 && gend > it.k0;  // some key of the item is grouped for this token
    if (grouped) {  // the rotation of this token's query, shared by its R heads
      const int64_t a = (x.window - x.window / g) - (p - p / g);
      const int64_t col = a >= 0 ? a : -a;
      const float sign = a >= 0 ? 1.0f : -1.0f;  // sin(-x) = -sin(x)
      for (int64_t d = 0; d < x.half; ++d) {
        cs[d] = x.cos_t[d * x.ncols + col];
        sn[d] = sign * x.sin_t[d * x.ncols + col];
      }
    }
    for (int64_t h = 0; h < x.r; ++h) {
      const int64_t i = t * x.r + h;
      s.lim[i] = std::min<int64_t>(p + 1, it.k1);
      s.gend[i] = gend;
      const T* src = x.q + (tok0 + t) * x.q_stride_t + (it.head * x.r + h) * x.q_stride_h;
      float* qp = s.qp.data + i * D;
      float* qg = s.qg.data + i * D;
      for (int u = 0; u < D; u += 16) {
        const __m512 v = _mm512_mul_ps(load16(src + u), scale);
        _mm512_storeu_ps(qp + u, v);
        _mm512_storeu_ps(qg + u, v);  // dims past rotary_dim, and every dim when qg is unused
      }
      if (!grouped) continue;
      for (int64_t d = 0; d < x.half; d += 16) {
        const __mmask16 m = static_cast<__mmask16>(x.half - d >= 16 ? 0xffff : (1u << (x.half - d)) - 1u);
        const __m512 c = _mm512_maskz_loadu_ps(m, cs + d), sv = _mm512_maskz_loadu_ps(m, sn + d);
        const __m512 lo = _mm512_maskz_loadu_ps(m, qp + d), hi = _mm512_maskz_loadu_ps(m, qp + x.half + d);
        _mm512_mask_storeu_ps(qg + d, m, _mm512_fmsub_ps(lo, c, _mm512_mul_ps(hi, sv)));
        _mm512_mask_storeu_ps(qg + x.half + d, m, _mm512_fmadd_ps(hi, c, _mm512_mul_ps(lo, sv)));
      }
    }
  }
}

template <int D, typename T>
void run_item(const Problem<T>& x, const Item& it, Scratch& s, float* part_acc, float* part_m, float* part_l) {
  constexpr int PV_ROWS = D >= 64 ? 6 : 12;
  const int64_t n = x.query_start_loc[it.req + 1] - x.query_start_loc[it.req];
  const int64_t S = x.seq_lens[it.req];
  const int64_t g = x.group_size[it.req];
  const int64_t first_pos = S - n + it.t0;
  const int rows = static_cast<int>((it.t1 - it.t0) * x.r);
  const int64_t B = x.block_size;
  const int32_t* bt = x.block_table + it.req * x.bt_stride;

  load_queries<D>(x, it, first_pos, g, s);
  std::fill(s.m.begin(), s.m.begin() + rows, kNegInf);
  std::fill(s.l.data, s.l.data + rows * 16, 0.0f);
  std::fill(s.acc.data, s.acc.data + rows * D, 0.0f);

  const int64_t k_head = it.head * x.k_stride_head, v_head = it.head * x.v_stride_head;
  for (int64_t j0 = it.k0; j0 < it.k1; j0 += KT) {
    const int nt = static_cast<int>(std::min<int64_t>(KT, it.k1 - j0));
    const int nch = (nt + 15) / 16;
    const T* kc[NCH];
    const T* vc[NCH];
    for (int c = 0; c < nch; ++c) {
      const int64_t jc = j0 + 16 * c;
      const int64_t block = bt[jc / B], off = jc % B;
      kc[c] = x.key + block * x.k_stride_block + k_head + off;       // slot `off`, dim 0 of a [D, B] page
      vc[c] = x.value + block * x.v_stride_block + v_head + off * D;  // row `off` of a [B, D] page
    }
    if (g > 1 && j0 + nt > s.gend[0]) rotate_tile<D>(x, kc, nch, j0, g, s.kr.data);
    // scores, row groups that see some key of the tile
    for (int i0 = 0; i0 < rows; i0 += QK_ROWS) {
      const int m = std::min(QK_ROWS, rows - i0);
      const int64_t seen = std::min<int64_t>(nt, s.lim[i0 + m - 1] - j0);
      for (int js = 0; js < seen; js += 32) qk_rows<D>(x, s, i0, m, j0, js, kc, nch);
    }
    const int width = static_cast<int>(std::clamp<int64_t>(s.lim[rows - 1] - j0, 0, nt));
    for (int i = 0; i < rows; ++i)
      softmax_row(s, i, static_cast<int>(std::clamp<int64_t>(s.lim[i] - j0, 0, nt)), width);
    for (int i0 = 0; i0 < rows; i0 += PV_ROWS) {
      const int m = std::min(PV_ROWS, rows - i0);
      const int64_t seen = std::min<int64_t>(nt, s.lim[i0 + m - 1] - j0);
      if (seen > 0) pv_rows<D>(s, i0, m, vc, static_cast<int>(seen));
    }
  }

  if (it.part < 0) {  // every key the rows see: final output and log-sum-exp
    const int64_t tok0 = x.query_start_loc[it.req] + it.t0;
    for (int i = 0; i < rows; ++i) {
      const int64_t t = tok0 + i / x.r, head = it.head * x.r + i % x.r;
      T* dst = x.out + t * x.out_stride_t + head * x.out_stride_h;
      const float l = s.sum(i), inv = 1.0f / l;
      for (int d = 0; d < D; ++d) dst[d] = from_float<T>(s.acc.data[i * D + d] * inv);
      x.lse[t * x.hq + head] = s.m[i] + std::log(l);
    }
  } else {
    std::copy(s.acc.data, s.acc.data + rows * D, part_acc);
    std::copy(s.m.begin(), s.m.begin() + rows, part_m);
    for (int i = 0; i < rows; ++i) part_l[i] = s.sum(i);
  }
}

// ---------------------------------------------------------------------------------------------
// driver: items, threads, merges
// ---------------------------------------------------------------------------------------------

struct SplitTile {  // a query tile whose keys were cut into pieces
  int32_t req, head, t0, t1, first_part, parts;
  int64_t part_offset;  // of its first piece in the partial buffers (in rows)
};

template <int D, typename T>
void run_all(const Problem<T>& x, int64_t n_req, int64_t hkv) {
  const int threads = at::get_num_threads();
  const int64_t R = x.r;
  const int64_t tile_tokens = std::max<int64_t>(1, target_rows(D) / R);
  std::vector<Item> tiles;
  int64_t total = 0;
  for (int64_t r = 0; r < n_req; ++r) {
    const int64_t n = x.query_start_loc[r + 1] - x.query_start_loc[r];
    const int64_t first = x.seq_lens[r] - n;  // position of the request's first token
    for (int64_t h = 0; h < hkv; ++h)
      for (int64_t t0 = 0; t0 < n; t0 += tile_tokens) {
        const int64_t t1 = std::min(n, t0 + tile_tokens);
        const int64_t cost = (t1 - t0) * R * (first + (t0 + t1) / 2 + 1);
        tiles.push_back({(int32_t)r, (int32_t)h, (int32_t)t0, (int32_t)t1, 0, (int32_t)(first + t1), -1, cost});
        total += cost;
      }
  }
  // too few tiles for the threads: cut the big ones along their keys (pieces of >= 4 key tiles)
  const int64_t target = std::max<int64_t>(1, total / (4 * threads));
  std::vector<Item> items;
  std::vector<SplitTile> splits;
  int32_t n_parts = 0;
  int64_t part_rows = 0;
  for (const Item& tile : tiles) {
    const int64_t keys = tile.k1;
    const int64_t k = std::min<int64_t>((tile.cost + target - 1) / target, keys / (4 * KT));
    if (k <= 1) {
      items.push_back(tile);
      continue;
    }
    const int64_t rows = (tile.t1 - tile.t0) * R;
    const int64_t step = ((keys + k - 1) / k + KT - 1) / KT * KT;
    SplitTile split{tile.req, tile.head, tile.t0, tile.t1, n_parts, 0, part_rows};
    for (int64_t k0 = 0; k0 < keys; k0 += step) {
      Item piece = tile;
      piece.k0 = (int32_t)k0;
      piece.k1 = (int32_t)std::min(keys, k0 + step);
      piece.part = n_parts++;
      piece.cost = tile.cost * (piece.k1 - piece.k0) / keys;
      items.push_back(piece);
      ++split.parts;
    }
    part_rows += rows * split.parts;
    splits.push_back(split);
  }
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.cost > b.cost; });

  // partial results of split tiles: piece q of a split tile at rows part_offset + q * rows
  std::vector<int64_t> part_at(n_parts);
  for (const SplitTile& split : splits) {
    const int64_t rows = (split.t1 - split.t0) * R;
    for (int q = 0; q < split.parts; ++q) part_at[split.first_part + q] = split.part_offset + q * rows;
  }
  std::vector<float> part_acc(part_rows * D), part_m(part_rows), part_l(part_rows);

  std::atomic<int64_t> next{0};
  const int64_t n_items = static_cast<int64_t>(items.size());
  const int workers = static_cast<int>(std::min<int64_t>(threads, n_items));
  auto work = [&]() {
    Scratch scratch(tile_tokens * R, D);
    for (int64_t k; (k = next.fetch_add(1)) < n_items;) {
      const Item& it = items[k];
      const int64_t at = it.part < 0 ? 0 : part_at[it.part];
      run_item<D>(x, it, scratch, part_acc.data() + at * D, part_m.data() + at, part_l.data() + at);
    }
  };
  if (workers <= 1) {
    work();
  } else {
    at::parallel_for(0, workers, 1, [&](int64_t, int64_t) { work(); });
  }

  // merge: o = sum_q exp(m_q - M) acc_q / sum_q exp(m_q - M) l_q, lse = M + log(that sum)
  for (const SplitTile& split : splits) {
    const int64_t rows = (split.t1 - split.t0) * R;
    const int64_t tok0 = x.query_start_loc[split.req] + split.t0;
    for (int64_t i = 0; i < rows; ++i) {
      float mx = kNegInf;
      for (int q = 0; q < split.parts; ++q) mx = std::max(mx, part_m[split.part_offset + q * rows + i]);
      float o[D] = {0};
      float l = 0.0f;
      for (int q = 0; q < split.parts; ++q) {
        const int64_t p = split.part_offset + q * rows + i;
        const float w = std::exp(part_m[p] - mx);  // 0 for a piece the row sees no key of
        l += w * part_l[p];
        for (int d = 0; d < D; ++d) o[d] += w * part_acc[p * D + d];
      }
      const int64_t t = tok0 + i / R, head = split.head * R + i % R;
      T* dst = x.out + t * x.out_stride_t + head * x.out_stride_h;
      for (int d = 0; d < D; ++d) dst[d] = from_float<T>(o[d] / l);
      x.lse[t * x.hq + head] = mx + std::log(l);
    }
  }
}

template <typename T>
void dispatch(const Problem<T>& x, int64_t n_req, int64_t hkv, int64_t d) {
  switch (d) {
    case 32:
      return run_all<32, T>(x, n_req, hkv);
    case 64:
      return run_all<64, T>(x, n_req, hkv);
    case 128:
      return run_all<128, T>(x, n_req, hkv);
    case 256:
      return run_all<256, T>(x, n_req, hkv);
  }
  TORCH_CHECK(false, "selfextend prefill kernel: head size ", d, " (built for 32 / 64 / 128 / 256)");
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// entry point
// ---------------------------------------------------------------------------------------------

// Writes rows query_start_loc[0] .. query_start_loc[R] - 1 of `out` ([T, Hq, D], query dtype);
// returns the log-sum-exp [T, Hq] float32 (-inf for tokens of no request).
torch::Tensor selfextend_prefill(torch::Tensor query, torch::Tensor key_cache, torch::Tensor value_cache,
                                 torch::Tensor query_start_loc, torch::Tensor seq_lens, torch::Tensor block_table,
                                 torch::Tensor group_size, int64_t window, double scale, torch::Tensor cos_t,
                                 torch::Tensor sin_t, torch::Tensor out) {
  TORCH_CHECK(query_start_loc.dim() == 1 && query_start_loc.scalar_type() == at::kInt &&
                  query_start_loc.is_contiguous(),
              "query_start_loc must be a contiguous int32 [R + 1]");
  const int64_t n_req = query_start_loc.numel() - 1;
  TORCH_CHECK(n_req >= 0, "query_start_loc must have R + 1 entries");
  const int64_t n_tok = query.dim() == 3 ? query.size(0) : 0;
  const Geometry g = check_arguments("prefill kernel", "query", query, key_cache, value_cache, block_table, seq_lens,
                                     group_size, n_req, cos_t, sin_t, window, out, n_tok);
  const int32_t* starts = query_start_loc.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  TORCH_CHECK(n_req == 0 || starts[0] >= 0, "query_start_loc[0] must be >= 0");
  int64_t max_s = 0;
  for (int64_t r = 0; r < n_req; ++r) {
    const int64_t n = starts[r + 1] - starts[r];
    TORCH_CHECK(n >= 0 && starts[r + 1] <= n_tok, "query_start_loc must be non-decreasing and within the ", n_tok,
                " query tokens; request ", r, " has tokens ", starts[r], " .. ", starts[r + 1] - 1);
    check_request(g, block_table, lens, group_size.data_ptr<int32_t>(), r, n, n > 0);
    max_s = std::max<int64_t>(max_s, lens[r]);
  }
  check_table_length(g, max_s, window);

  auto lse = torch::full({n_tok, g.hq}, -std::numeric_limits<float>::infinity(), query.options().dtype(at::kFloat));

  dispatch_dtype("prefill kernel", query.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    Problem<T> x;
    fill_paged<T>(x, g, key_cache, value_cache, block_table, seq_lens, group_size, window, scale, cos_t, sin_t);
    x.q = reinterpret_cast<const T*>(query.data_ptr());
    x.q_stride_t = query.stride(0);
    x.q_stride_h = query.stride(1);
    x.query_start_loc = starts;
    x.out = reinterpret_cast<T*>(out.data_ptr());
    x.out_stride_t = out.stride(0);
    x.out_stride_h = out.stride(1);
    x.lse = lse.data_ptr<float>();
    x.hq = g.hq;
    x.r = g.hq / g.hkv;
    dispatch<T>(x, n_req, g.hkv, g.d);
  });
  return lse;
}
