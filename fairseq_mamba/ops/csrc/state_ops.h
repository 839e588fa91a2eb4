// The selective scan's per-step sums over a channel's n states, each as a readable loop the
// compiler vectorises and, for float with n a multiple of 8 (the usual 16) in an AVX2 build,
// the same arithmetic in intrinsics. Why: the compiler reduces a `simd reduction` over a fully
// unrolled state loop lane by lane, in order (it may not reassociate), 16 instructions per
// sum; that was ~45% of the adjoint loop's instructions. Reducing with two hadds made the
// backward 11% and the forward 10% faster, measured here (BENCHMARKS.md, "CPU kernels").
// The AVX2 path is tested wherever the kernel tests run on an AVX2 machine (d_state 16), the
// loops at every other d_state and in fp64.
#pragma once

#include <cstdint>
#include <type_traits>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define FAIRSEQ_MAMBA_AVX2 1
#endif

namespace fairseq_mamba {

template <typename T, int N>
constexpr bool kAvx2States =
#ifdef FAIRSEQ_MAMBA_AVX2
    std::is_same_v<T, float> && N > 0 && N % 8 == 0;
#else
    false;
#endif

#ifdef FAIRSEQ_MAMBA_AVX2
// {sum of a's lanes, sum of b's lanes}.
inline void hsum2(__m256 a, __m256 b, float& sa, float& sb) {
  const __m256 h = _mm256_hadd_ps(a, b);  // a01 a23 b01 b23 | a45 a67 b45 b67
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  q = _mm_hadd_ps(q, q);  // a b a b
  sa = _mm_cvtss_f32(q);
  sb = _mm_cvtss_f32(_mm_movehdup_ps(q));
}
#endif

// <x, y> over the n states.
template <typename T, int N>
inline T state_dot(const T* __restrict__ x, const T* __restrict__ y, int64_t n) {
#ifdef FAIRSEQ_MAMBA_AVX2
  if constexpr (kAvx2States<T, N>) {
    __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(x), _mm256_loadu_ps(y));
    for (int k = 8; k < N; k += 8)
      acc = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), _mm256_loadu_ps(y + k), acc);
    float s, same;
    hsum2(acc, acc, s, same);
    return s;
  }
#endif
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t s = 0; s < n; ++s) acc += x[s] * y[s];
  return acc;
}

// One step of the adjoint recurrence over the states, given gy = dL/dy_t, dtu = dt_t u_t,
// the step's state H, decay Ad, previous state Hp, B, C and A: dh_t = dh_{t+1} + gy C (in
// place, then times the decay for the step before), dC += gy H, dB += dh_t dtu,
// dAc += q dt with q = dh_t Ad Hp = dL/d(dt A); returns d_dtu = <dh_t, B>, ddtA = <q, A>.
template <typename T, int N>
inline void adjoint_states(T gy, T dtu, T dtt, const T* __restrict__ H, const T* __restrict__ Ad,
                           const T* __restrict__ Hp, const T* __restrict__ B,
                           const T* __restrict__ C, const T* __restrict__ A, T* __restrict__ dh,
                           T* __restrict__ dAc, T* __restrict__ dB, T* __restrict__ dC,
                           int64_t n, T& d_dtu, T& ddtA) {
#ifdef FAIRSEQ_MAMBA_AVX2
  if constexpr (kAvx2States<T, N>) {
    const __m256 vgy = _mm256_set1_ps(gy), vdtu = _mm256_set1_ps(dtu), vdt = _mm256_set1_ps(dtt);
    __m256 su = _mm256_setzero_ps(), sa = _mm256_setzero_ps();
    for (int k = 0; k < N; k += 8) {
      const __m256 ad = _mm256_loadu_ps(Ad + k);
      const __m256 dhs = _mm256_fmadd_ps(vgy, _mm256_loadu_ps(C + k), _mm256_loadu_ps(dh + k));
      _mm256_storeu_ps(dC + k,
                       _mm256_fmadd_ps(vgy, _mm256_loadu_ps(H + k), _mm256_loadu_ps(dC + k)));
      _mm256_storeu_ps(dB + k, _mm256_fmadd_ps(dhs, vdtu, _mm256_loadu_ps(dB + k)));
      su = _mm256_fmadd_ps(dhs, _mm256_loadu_ps(B + k), su);
      const __m256 q = _mm256_mul_ps(_mm256_mul_ps(dhs, ad), _mm256_loadu_ps(Hp + k));
      sa = _mm256_fmadd_ps(q, _mm256_loadu_ps(A + k), sa);
      _mm256_storeu_ps(dAc + k, _mm256_fmadd_ps(q, vdt, _mm256_loadu_ps(dAc + k)));
      _mm256_storeu_ps(dh + k, _mm256_mul_ps(dhs, ad));
    }
    hsum2(su, sa, d_dtu, ddtA);
    return;
  }
#endif
  T su = 0, sa = 0;
#pragma omp simd reduction(+ : su, sa)
  for (int64_t s = 0; s < n; ++s) {
    const T dhs = dh[s] + gy * C[s];
    dC[s] += gy * H[s];
    dB[s] += dhs * dtu;
    su += dhs * B[s];
    const T q = dhs * Ad[s] * Hp[s];
    sa += q * A[s];
    dAc[s] += q * dtt;
    dh[s] = dhs * Ad[s];
  }
  d_dtu = su, ddtA = sa;
}

}  // namespace fairseq_mamba
