// Branch-free float math the compiler vectorises (no libm calls), for the CPU kernels;
// the double overloads call libm (fp64 runs are for checking, not speed).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace fairseq_mamba {

// 2^x for float, |x| <= 2^30 (the callers bound it: kExp2Arg), vectorisable (no libm
// call): round-to-nearest split x = k + f, |f| <= 1/2, a degree-6 polynomial for 2^f (fitted
// to the relative error on [-1/2, 1/2]: < 1e-7, under one fp32 ulp, in fp32 arithmetic) and
// k, clamped to [-127, 128], added to the exponent bits: below 2^-126.5 the result is 0 (a
// flushed denormal), above 2^127.5 inf; NaN stays NaN. The clamp is on the integer k, not
// on x: the compiler emits a float clamp as compares and blends (x86's maxps differs from
// C++'s ?: on NaN), and without them the forward scan ran 12-14% faster, measured here.
constexpr float kExp2Arg = 1073741824.0f;  // 2^30
inline float exp2_fast(float x) {
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float kf = (x + magic) - magic;
  const float f = x - kf;
  float p = 1.5345805e-4f;
  p = p * f + 1.3399931e-3f;
  p = p * f + 9.6184891e-3f;
  p = p * f + 5.5503286e-2f;
  p = p * f + 0.24022646f;
  p = p * f + 0.69314718f;
  p = p * f + 1.0f;
  int32_t k = static_cast<int32_t>(kf);
  k = k < -127 ? -127 : k;
  k = k > 128 ? 128 : k;
  const int32_t bits = (k + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
inline double exp2_fast(double x) { return std::exp2(x); }

// log(1 + y) for y in [0, 1], vectorisable: 2 atanh(s) with s = y / (2 + y) <= 1/3, its
// odd series to s^13 (the next term is < 2e-9 of the result). No cancellation for small y.
inline float log1p_unit(float y) {
  const float s = y / (2.0f + y), s2 = s * s;
  float p = 1.0f / 13;
  p = p * s2 + 1.0f / 11;
  p = p * s2 + 1.0f / 9;
  p = p * s2 + 1.0f / 7;
  p = p * s2 + 1.0f / 5;
  p = p * s2 + 1.0f / 3;
  p = p * s2 + 1.0f;
  return 2.0f * s * p;
}
inline double log1p_unit(double y) { return std::log1p(y); }

// e^-|x|, for any x (+-inf gives 0, NaN stays NaN): |x| log2 e capped at 200 for exp2_fast.
template <typename T>
inline T exp_neg_abs(T x) {
  const T a = std::fabs(x) * static_cast<T>(1.4426950408889634);
  return exp2_fast(-(a > T(200) ? T(200) : a));
}

// softplus(x) = max(x, 0) + log(1 + e^-|x|) and sigmoid(x), from one exponential.
template <typename T>
inline void softplus_sigmoid(T x, T& sp, T& sig) {
  const T y = exp_neg_abs(x);
  sp = (x > T(0) ? x : T(0)) + log1p_unit(y);
  const T r = T(1) / (T(1) + y);
  sig = x >= T(0) ? r : y * r;
}

// sigmoid(x) from e^-|x| (no overflow for either sign).
template <typename T>
inline T sigmoid_fast(T x) {
  const T y = exp_neg_abs(x);
  const T r = T(1) / (T(1) + y);
  return x >= T(0) ? r : y * r;
}

}  // namespace fairseq_mamba
