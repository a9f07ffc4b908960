// What the SelfExtend kernels over vLLM's CPU paged KV cache share (x86-64, AVX-512F): vector loads
// of float32 / bfloat16, exp, the per-slot neighbour rotation deltas, and the two entry points that
// module.cpp binds (decode.cpp: one query per request; prefill.cpp: n >= 1 queries per request).
//
// Shared conventions (see decode.cpp and prefill.cpp for the maths):
//  - key_cache / value_cache are [num_blocks, Hkv, B, D] views of vLLM's CPU cache ("vec" / "vec16"
//    ISA layout): a key page is stored transposed [D, B] (16 consecutive slots of one dim are one
//    vector load), a value page is plain [B, D]. Keys of a request with G > 1 are stored rotated to
//    their grouped position j / G.
//  - cos_t / sin_t: float32 [rotary_dim / 2, ncols], row i = cos / sin(delta * inv_freq[i]) for
//    delta = 0 .. ncols - 1 (selfextend.vllm.rotations.RotationTable), ncols >= max(max S, w) + 16.
//    Rotary pairs are rotate-half (d, d + rotary_dim / 2); dims past rotary_dim pass through.

#pragma once

#include <torch/extension.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <limits>

namespace selfextend {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

template <typename T>
inline __m512 load16(const T* p);

template <>
inline __m512 load16<float>(const float* p) { return _mm512_loadu_ps(p); }

template <>
inline __m512 load16<c10::BFloat16>(const c10::BFloat16* p) {  // bf16 -> f32 is a 16-bit shift
  __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

template <typename T>
inline float to_float(T x) { return static_cast<float>(x); }

template <typename T>
inline T from_float(float x) { return static_cast<T>(x); }

// exp(x), Cephes single-precision polynomial (about 1 ulp); exactly 0 for x <= -150 (and -inf).
inline __m512 exp512(__m512 x) {
  const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
  const __m512 c1 = _mm512_set1_ps(0.693359375f);
  const __m512 c2 = _mm512_set1_ps(-2.12194440e-4f);
  x = _mm512_max_ps(x, _mm512_set1_ps(-150.0f));
  x = _mm512_min_ps(x, _mm512_set1_ps(88.7f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, c1, x);  // x - n ln 2 in two parts (Cody-Waite)
  r = _mm512_fnmadd_ps(n, c2, r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(y, n);  // y * 2^n
}

// delta_j = j - j / G for j = j0 .. j0 + 15, as a base delta (the column to load from) and the
// permute indices delta_j - base (each in 0 .. 15): across 16 consecutive slots delta grows by 0 or
// 1 per slot, so their 16 cosines lie within 16 consecutive table columns.
inline void chunk_deltas(int64_t j0, int64_t g, int32_t* base, __m512i* idx) {
  alignas(64) int32_t d[16];
  int64_t q = j0 / g, r = j0 % g;
  for (int t = 0; t < 16; ++t) {
    d[t] = static_cast<int32_t>(j0 + t - q);
    if (++r == g) {
      r = 0;
      ++q;
    }
  }
  *base = d[0];
  *idx = _mm512_sub_epi32(_mm512_load_si512(d), _mm512_set1_epi32(d[0]));
}

// ---------------------------------------------------------------------------------------------
// what both entry points read, and the checks of their arguments
// ---------------------------------------------------------------------------------------------

// The paged cache, each request's length, G and blocks, the rotation table: a base of each kernel's
// Problem (the kernel adds its queries and outputs).
template <typename T>
struct PagedRequests {
  const T* key;    // pages [D, B] (transposed)
  const T* value;  // pages [B, D]
  int64_t k_stride_block, k_stride_head, v_stride_block, v_stride_head;
  const int32_t* block_table;  // [R, max_blocks]
  int64_t bt_stride;
  const int32_t* seq_lens;    // [R]
  const int32_t* group_size;  // [R]
  int64_t block_size, window;
  int64_t half;        // rotary_dim / 2
  const float* cos_t;  // [half, ncols]
  const float* sin_t;
  int64_t ncols;
  float scale;
};

// Sizes read off checked arguments.
struct Geometry {
  int64_t hq, d, num_blocks, hkv, block_size, half, ncols;
};

// Checks what both kernels take: the query [*, Hq, D] (`name` in messages) against the cache, one
// entry of seq_lens / group_size and one block-table row per request (n_req), the rotation table, w
// and `out` ([rows, Hq, D] in the query's dtype). Per-request values are checked by check_request.
inline Geometry check_arguments(const char* kernel, const char* name, const torch::Tensor& query,
                                const torch::Tensor& key_cache, const torch::Tensor& value_cache,
                                const torch::Tensor& block_table, const torch::Tensor& seq_lens,
                                const torch::Tensor& group_size, int64_t n_req, const torch::Tensor& cos_t,
                                const torch::Tensor& sin_t, int64_t window, const torch::Tensor& out,
                                int64_t rows) {
  TORCH_CHECK(query.device().is_cpu() && key_cache.device().is_cpu(), kernel, ": CPU tensors only");
  TORCH_CHECK(query.dim() == 3, name, " must be [rows, Hq, D]");
  Geometry g;
  g.hq = query.size(1);
  g.d = query.size(2);
  TORCH_CHECK(key_cache.dim() == 4 && value_cache.sizes() == key_cache.sizes(),
              "key_cache / value_cache must be [num_blocks, Hkv, B, D] of one shape");
  g.num_blocks = key_cache.size(0);
  g.hkv = key_cache.size(1);
  g.block_size = key_cache.size(2);
  TORCH_CHECK(key_cache.size(3) == g.d, "head size of the cache (", key_cache.size(3), ") and the query (", g.d,
              ") differ");
  TORCH_CHECK(g.hkv > 0 && g.hq % g.hkv == 0, "query heads (", g.hq, ") must be a multiple of kv heads (", g.hkv,
              ")");
  TORCH_CHECK(g.block_size % 16 == 0, "block size must be a multiple of 16, got ", g.block_size);
  TORCH_CHECK(key_cache.stride(3) == 1 && key_cache.stride(2) == g.d && value_cache.stride(3) == 1 &&
                  value_cache.stride(2) == g.d,
              "cache pages ([B, D] per block and kv head) must be contiguous");
  TORCH_CHECK(query.stride(2) == 1, name, ": last dim must be contiguous");
  TORCH_CHECK(key_cache.scalar_type() == query.scalar_type() && value_cache.scalar_type() == query.scalar_type(),
              "cache and query dtypes differ");
  TORCH_CHECK(block_table.dim() == 2 && block_table.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt &&
                  group_size.scalar_type() == at::kInt,
              "block_table [R, max_blocks], seq_lens [R] and group_size [R] must be int32");
  TORCH_CHECK(block_table.stride(1) == 1 && seq_lens.is_contiguous() && group_size.is_contiguous(),
              "block_table rows, seq_lens and group_size must be contiguous");
  TORCH_CHECK(seq_lens.numel() == n_req && group_size.numel() == n_req && block_table.size(0) == n_req,
              "one entry of seq_lens / group_size and one row of block_table per request (R = ", n_req, ")");
  TORCH_CHECK(cos_t.scalar_type() == at::kFloat && cos_t.dim() == 2 && cos_t.is_contiguous() &&
                  sin_t.sizes() == cos_t.sizes() && sin_t.scalar_type() == at::kFloat && sin_t.is_contiguous(),
              "cos_t / sin_t must be contiguous float32 [rotary_dim / 2, ncols]");
  g.half = cos_t.size(0);
  g.ncols = cos_t.size(1);
  TORCH_CHECK(2 * g.half <= g.d, "rotary_dim (", 2 * g.half, ") larger than the head size (", g.d, ")");
  TORCH_CHECK(window >= 1, "window must be >= 1, got ", window);
  TORCH_CHECK(out.dim() == 3 && out.size(0) == rows && out.size(1) == g.hq && out.size(2) == g.d &&
                  out.stride(2) == 1 && out.scalar_type() == query.scalar_type(),
              "out must be [", rows, ", Hq, D] in the query's dtype with a contiguous last dim");
  return g;
}

// Checks request r (n_new new tokens; reads_keys: the kernel reads its seq_lens[r] keys): its length
// covers the new tokens and fits its block-table row, G >= 1, and every block it reads is a block of
// the cache.
inline void check_request(const Geometry& g, const torch::Tensor& block_table, const int32_t* lens,
                          const int32_t* groups, int64_t r, int64_t n_new, bool reads_keys) {
  TORCH_CHECK(lens[r] >= n_new && lens[r] <= block_table.size(1) * g.block_size, "seq_lens[", r, "] = ", lens[r],
              " must cover its ", n_new, " new token(s) and fit its block table");
  TORCH_CHECK(groups[r] >= 1, "group_size[", r, "] must be >= 1, got ", groups[r]);
  const int32_t* row = block_table.data_ptr<int32_t>() + r * block_table.stride(0);
  const int64_t used = reads_keys ? (lens[r] + g.block_size - 1) / g.block_size : 0;
  for (int64_t b = 0; b < used; ++b)
    TORCH_CHECK(row[b] >= 0 && row[b] < g.num_blocks, "block_table[", r, ", ", b, "] = ", row[b],
                " is not a block of the cache");
}

// Checks the rotation table reaches the longest context (max_s) and w.
inline void check_table_length(const Geometry& g, int64_t max_s, int64_t window) {
  const int64_t need = std::max(max_s, window) + 16;
  TORCH_CHECK(g.ncols >= need, "rotation table too short: needs ", need, " columns, has ", g.ncols,
              "; grow it to the longest context");
}

// Fills the PagedRequests part of a kernel's problem from checked arguments.
template <typename T>
void fill_paged(PagedRequests<T>& x, const Geometry& g, const torch::Tensor& key_cache,
                const torch::Tensor& value_cache, const torch::Tensor& block_table, const torch::Tensor& seq_lens,
                const torch::Tensor& group_size, int64_t window, double scale, const torch::Tensor& cos_t,
                const torch::Tensor& sin_t) {
  x.key = reinterpret_cast<const T*>(key_cache.data_ptr());
  x.value = reinterpret_cast<const T*>(value_cache.data_ptr());
  x.k_stride_block = key_cache.stride(0);
  x.k_stride_head = key_cache.stride(1);
  x.v_stride_block = value_cache.stride(0);
  x.v_stride_head = value_cache.stride(1);
  x.block_table = block_table.data_ptr<int32_t>();
  x.bt_stride = block_table.stride(0);
  x.seq_lens = seq_lens.data_ptr<int32_t>();
  x.group_size = group_size.data_ptr<int32_t>();
  x.block_size = g.block_size;
  x.window = window;
  x.half = g.half;
  x.cos_t = cos_t.data_ptr<float>();
  x.sin_t = sin_t.data_ptr<float>();
  x.ncols = g.ncols;
  x.scale = static_cast<float>(scale);
}

// Calls run(tag) with a null T* of the query's dtype (float32 or bfloat16).
template <typename F>
void dispatch_dtype(const char* kernel, at::ScalarType dtype, F&& run) {
  if (dtype == at::kFloat) {
    run(static_cast<float*>(nullptr));
  } else if (dtype == at::kBFloat16) {
    run(static_cast<c10::BFloat16*>(nullptr));
  } else {
    TORCH_CHECK(false, kernel, ": float32 or bfloat16 only, got ", dtype);
  }
}

}  // namespace selfextend

// decode.cpp: one query per request (see there). Returns the log-sum-exp [N, Hq].
torch::Tensor selfextend_decode(torch::Tensor query_plain, c10::optional<torch::Tensor> query_grouped,
                                torch::Tensor key_cache, torch::Tensor value_cache, torch::Tensor block_table,
                                torch::Tensor seq_lens, torch::Tensor group_size, int64_t window, double scale,
                                torch::Tensor cos_t, torch::Tensor sin_t, torch::Tensor out);

// prefill.cpp: n_r >= 1 queries per request in vLLM's flat token layout (see there). Returns the
// log-sum-exp [T, Hq].
torch::Tensor selfextend_prefill(torch::Tensor query, torch::Tensor key_cache, torch::Tensor value_cache,
                                 torch::Tensor query_start_loc, torch::Tensor seq_lens, torch::Tensor block_table,
                                 torch::Tensor group_size, int64_t window, double scale, torch::Tensor cos_t,
                                 torch::Tensor sin_t, torch::Tensor out);
