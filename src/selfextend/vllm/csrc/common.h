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
