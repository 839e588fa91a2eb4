// Fused CPU selective scan: forward and backward of Mamba's S6 recurrence.
//
// The math is that of fairseq_mamba/ops/selective_scan.py. The Python wrapper
// (ops/scan_kernel.py) casts to the compute type T (float or double), applies delta_bias
// and softplus (dt) and silu(z) (gate) with torch's vectorised ops, their derivatives in
// backward likewise, and lays the tensors out as below. b = batch, d = dim, l = length, n = d_state,
// g = groups, e = d / g channels per group, K = number of state chunks of `chunk` steps.
//   u, dt, gate, out, du, ddt, dgate  (b, d, l)   contiguous: one channel's steps in a row
//   Bt, Ct, dBt, dCt                   (b, g, l, n) time-major: one step's n values in a row
//   A, A2 (= A log2 e), dA             (d, n);  D, dD (d)
//   h0, last, dh0                      (b, d, n)
//   bounds                             (b, d, K, n): the state before each chunk
// Per channel and step: h = exp2(dt A2) h + dt u B;  out = (<h, C> + D u) gate.
// Each channel's n states live in registers (n is a template constant for the usual
// sizes); the (b, d, l, n) state is never stored: backward recomputes one chunk's states
// (at most chunk x n values, in L1) from the saved chunk-boundary state.
// ATen and torch's pybind casters only, not torch/extension.h: a 30% faster cold build.
#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int kMaxState = 256;

// 2^x for float, vectorisable (no libm call, no branch): round-to-nearest split
// x = k + f, |f| <= 1/2, a degree-6 polynomial for 2^f (fitted to the relative error on
// [-1/2, 1/2]: < 1e-7, under one fp32 ulp, in fp32 arithmetic) and k added to the exponent
// bits. Below 2^-127 it returns 0 (a flushed denormal). Vectorising the selects needs
// -fno-trapping-math (scan_kernel.CFLAGS).
inline float exp2_fast(float x) {
  const float xc = x < -127.0f ? -127.0f : (x > 127.0f ? 127.0f : x);
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float kf = (xc + magic) - magic;
  const float f = xc - kf;
  float p = 1.5345805e-4f;
  p = p * f + 1.3399931e-3f;
  p = p * f + 9.6184891e-3f;
  p = p * f + 5.5503286e-2f;
  p = p * f + 0.24022646f;
  p = p * f + 0.69314718f;
  p = p * f + 1.0f;
  int32_t bits = (static_cast<int32_t>(kf) + 127) << 23;
  bits = x > -127.0f ? bits : 0;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
inline double exp2_fast(double x) { return std::exp2(x); }

template <typename T>
struct Args {
  const T *u, *dt, *gate, *A, *A2, *Bt, *Ct, *D, *h0;
  int64_t b, d, l, n, g, chunk, K;
};

// Forward of one channel (bi, di). N > 0: n known at compile time (registers).
template <typename T, int N>
void forward_channel(const Args<T>& a, int64_t bi, int64_t di, T* __restrict__ out,
                     T* __restrict__ last, T* __restrict__ bounds) {
  const int64_t n = N > 0 ? N : a.n;
  const int64_t ch = bi * a.d + di, row = ch * a.l, gi = di / (a.d / a.g);
  const T* __restrict__ u = a.u + row;
  const T* __restrict__ dt = a.dt + row;
  const T* __restrict__ gate = a.gate ? a.gate + row : nullptr;
  const T* __restrict__ Bt = a.Bt + (bi * a.g + gi) * a.l * n;
  const T* __restrict__ Ct = a.Ct + (bi * a.g + gi) * a.l * n;
  const T Dd = a.D ? a.D[di] : T(0);
  T h[N > 0 ? N : kMaxState], A2r[N > 0 ? N : kMaxState];
  for (int64_t s = 0; s < n; ++s) {
    h[s] = a.h0 ? a.h0[ch * n + s] : T(0);
    A2r[s] = a.A2[di * n + s];
  }
  for (int64_t t = 0; t < a.l; ++t) {
    if (bounds && t % a.chunk == 0) std::copy(h, h + n, bounds + (t / a.chunk) * n);
    const T dtt = dt[t], dtu = dtt * u[t];
    const T *B = Bt + t * n, *C = Ct + t * n;
    T y = 0;
#pragma omp simd reduction(+ : y)
    for (int64_t s = 0; s < n; ++s) {
      h[s] = exp2_fast(dtt * A2r[s]) * h[s] + dtu * B[s];
      y += h[s] * C[s];
    }
    y += Dd * u[t];
    out[row + t] = gate ? y * gate[t] : y;
  }
  std::copy(h, h + n, last + ch * n);
}

struct Grads {  // backward's per-channel outputs
  void *du, *ddt, *dgate, *dh0;
};

// Backward of the channels [d0, d1) of one group and batch item. dBt/dCt point at this
// work item's private (l, n) slabs; dA, dD at its private (d, n) and (d,) rows.
template <typename T, int N>
void backward_channels(const Args<T>& a, int64_t bi, int64_t d0, int64_t d1,
                       const T* gout, const T* glast, const T* bounds_all, const Grads& gr,
                       T* __restrict__ dBt, T* __restrict__ dCt, T* __restrict__ dA_out,
                       T* __restrict__ dD_out) {
  const int64_t n = N > 0 ? N : a.n;
  constexpr int M = N > 0 ? N : kMaxState;
  std::vector<T> Hbuf(a.chunk * n), Abuf(a.chunk * n);
  for (int64_t di = d0; di < d1; ++di) {
    const int64_t ch = bi * a.d + di, row = ch * a.l, gi = di / (a.d / a.g);
    const T* __restrict__ u = a.u + row;
    const T* __restrict__ dt = a.dt + row;
    const T* __restrict__ gate = a.gate ? a.gate + row : nullptr;
    const T* __restrict__ go = gout ? gout + row : nullptr;
    const T* __restrict__ Bt = a.Bt + (bi * a.g + gi) * a.l * n;
    const T* __restrict__ Ct = a.Ct + (bi * a.g + gi) * a.l * n;
    const T* __restrict__ bounds = bounds_all + ch * a.K * n;
    const T Dd = a.D ? a.D[di] : T(0);
    T* __restrict__ du = static_cast<T*>(gr.du) + row;
    T* __restrict__ ddt = static_cast<T*>(gr.ddt) + row;
    T* __restrict__ dgate = gr.dgate ? static_cast<T*>(gr.dgate) + row : nullptr;
    // dA and dD sum over time: in double, as the terms often cancel (fp32 round-off of
    // the sum would then dominate the small result).
    T dh[M], Ar[M], A2r[M];
    double dA[M];
    for (int64_t s = 0; s < n; ++s) {
      dh[s] = glast ? glast[ch * n + s] : T(0);
      dA[s] = 0;
      Ar[s] = a.A[di * n + s];
      A2r[s] = a.A2[di * n + s];
    }
    double dD = 0;
    for (int64_t c = a.K - 1; c >= 0; --c) {
      const int64_t t0 = c * a.chunk, t1 = std::min(t0 + a.chunk, a.l);
      // Recompute the chunk's states h_t and decays a_t from its start state.
      const T* hprev = bounds + c * n;
      for (int64_t t = t0; t < t1; ++t) {
        T* __restrict__ H = Hbuf.data() + (t - t0) * n;
        T* __restrict__ Ad = Abuf.data() + (t - t0) * n;
        const T dtt = dt[t], dtu = dtt * u[t];
        const T* __restrict__ B = Bt + t * n;
#pragma omp simd
        for (int64_t s = 0; s < n; ++s) {
          Ad[s] = exp2_fast(dtt * A2r[s]);
          H[s] = Ad[s] * hprev[s] + dtu * B[s];
        }
        hprev = H;
      }
      // Reverse (adjoint) recurrence: dh_t = gy_t C_t + a_{t+1} dh_{t+1}.
      for (int64_t t = t1 - 1; t >= t0; --t) {
        const T* __restrict__ H = Hbuf.data() + (t - t0) * n;
        const T* __restrict__ Ad = Abuf.data() + (t - t0) * n;
        const T* __restrict__ Hp = t > t0 ? H - n : bounds + c * n;
        const T* __restrict__ B = Bt + t * n;
        const T* __restrict__ C = Ct + t * n;
        T* __restrict__ dB = dBt + t * n;
        T* __restrict__ dC = dCt + t * n;
        const T dtt = dt[t], dtu = dtt * u[t], g = go ? go[t] : T(0);
        T gy = g;
        if (gate) {  // dL/dgate = g (<h, C> + D u)
          T y = 0;
#pragma omp simd reduction(+ : y)
          for (int64_t s = 0; s < n; ++s) y += H[s] * C[s];
          dgate[t] = g * (y + Dd * u[t]);
          gy = g * gate[t];
        }
        T d_dtu = 0, ddtA = 0;
#pragma omp simd reduction(+ : d_dtu, ddtA)
        for (int64_t s = 0; s < n; ++s) {
          const T dhs = dh[s] + gy * C[s];
          dC[s] += gy * H[s];
          dB[s] += dhs * dtu;
          d_dtu += dhs * B[s];
          const T q = dhs * Ad[s] * Hp[s];  // dL/d(dt A)
          ddtA += q * Ar[s];
          dA[s] += static_cast<double>(q * dtt);
          dh[s] = dhs * Ad[s];
        }
        du[t] = d_dtu * dtt + gy * Dd;
        ddt[t] = d_dtu * u[t] + ddtA;
        dD += static_cast<double>(gy * u[t]);
      }
    }
    for (int64_t s = 0; s < n; ++s) dA_out[di * n + s] += static_cast<T>(dA[s]);
    std::copy(dh, dh + n, static_cast<T*>(gr.dh0) + ch * n);
    dD_out[di] += static_cast<T>(dD);
  }
}

template <typename T>
const T* ptr(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

template <typename T>
Args<T> make_args(const at::Tensor& u, const at::Tensor& dt,
                  const c10::optional<at::Tensor>& gate, const at::Tensor& A,
                  const at::Tensor& A2, const at::Tensor& Bt, const at::Tensor& Ct,
                  const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& h0,
                  int64_t chunk) {
  return Args<T>{u.data_ptr<T>(), dt.data_ptr<T>(), ptr<T>(gate), A.data_ptr<T>(),
                 A2.data_ptr<T>(), Bt.data_ptr<T>(), Ct.data_ptr<T>(), ptr<T>(D), ptr<T>(h0),
                 u.size(0), u.size(1), u.size(2), A.size(1), Bt.size(1), chunk,
                 (u.size(2) + chunk - 1) / chunk};
}

// Call f with n as a compile-time constant where it is a usual size (0: any other n).
template <typename F>
void with_n(int64_t n, F&& f) {
  switch (n) {
    case 4: f(std::integral_constant<int, 4>()); break;
    case 8: f(std::integral_constant<int, 8>()); break;
    case 16: f(std::integral_constant<int, 16>()); break;
    case 32: f(std::integral_constant<int, 32>()); break;
    case 64: f(std::integral_constant<int, 64>()); break;
    default: f(std::integral_constant<int, 0>());
  }
}

void check(const at::Tensor& u, const at::Tensor& A, int64_t chunk) {
  TORCH_CHECK(u.is_contiguous() && u.dim() == 3, "u must be contiguous (b, d, l)");
  TORCH_CHECK(A.size(1) <= kMaxState, "d_state ", A.size(1), " > ", kMaxState);
  TORCH_CHECK(chunk > 0, "chunk must be positive, got ", chunk);
}

// -> out (b, d, l), last (b, d, n), bounds (b, d, K, n) (empty unless save).
std::vector<at::Tensor> fwd(const at::Tensor& u, const at::Tensor& dt,
                            const c10::optional<at::Tensor>& gate, const at::Tensor& A,
                            const at::Tensor& A2, const at::Tensor& Bt, const at::Tensor& Ct,
                            const c10::optional<at::Tensor>& D,
                            const c10::optional<at::Tensor>& h0, int64_t chunk, bool save) {
  check(u, A, chunk);
  auto out = at::empty_like(u);
  auto last = at::empty({u.size(0), u.size(1), A.size(1)}, u.options());
  const int64_t K = (u.size(2) + chunk - 1) / chunk;
  auto bounds = at::empty({save ? u.size(0) : 0, u.size(1), K, A.size(1)}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_cpu_fwd", [&] {
    const auto a = make_args<scalar_t>(u, dt, gate, A, A2, Bt, Ct, D, h0, chunk);
    scalar_t *o = out.data_ptr<scalar_t>(), *ls = last.data_ptr<scalar_t>();
    scalar_t* bd = save ? bounds.data_ptr<scalar_t>() : nullptr;
    with_n(a.n, [&](auto NC) {
      at::parallel_for(0, a.b * a.d, 1, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i)
          forward_channel<scalar_t, decltype(NC)::value>(
              a, i / a.d, i % a.d, o, ls, bd ? bd + i * a.K * a.n : nullptr);
      });
    });
  });
  return {out, last, bounds};
}

// -> du, ddt, dgate (empty without gate), dBt, dCt, dA, dD, dh0.
std::vector<at::Tensor> bwd(const at::Tensor& u, const at::Tensor& dt,
                            const c10::optional<at::Tensor>& gate, const at::Tensor& A,
                            const at::Tensor& A2, const at::Tensor& Bt, const at::Tensor& Ct,
                            const c10::optional<at::Tensor>& D, const at::Tensor& bounds,
                            const c10::optional<at::Tensor>& gout,
                            const c10::optional<at::Tensor>& glast, int64_t chunk,
                            int64_t blocks) {
  check(u, A, chunk);
  const int64_t b = u.size(0), d = u.size(1), l = u.size(2), n = A.size(1), g = Bt.size(1);
  const int64_t e = d / g, nb = std::max<int64_t>(1, std::min(blocks, e));
  auto du = at::empty_like(u), ddt = at::empty_like(u);
  auto dgate = gate.has_value() ? at::empty_like(u) : at::empty({0}, u.options());
  // One private dB/dC (b, g, l, n) and dA/dD per channel block, summed below: no races.
  auto dBp = at::zeros({nb, b, g, l, n}, u.options()), dCp = at::zeros_like(dBp);
  auto dAp = at::zeros({nb * b, d, n}, u.options()), dDp = at::zeros({nb * b, d}, u.options());
  auto dh0 = at::empty({b, d, n}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_cpu_bwd", [&] {
    const auto a = make_args<scalar_t>(u, dt, gate, A, A2, Bt, Ct, D, c10::nullopt, chunk);
    Grads gr{du.data_ptr(), ddt.data_ptr(), gate.has_value() ? dgate.data_ptr() : nullptr,
             dh0.data_ptr()};
    const scalar_t *go = ptr<scalar_t>(gout), *gl = ptr<scalar_t>(glast);
    const scalar_t* bd = bounds.data_ptr<scalar_t>();
    scalar_t *dB = dBp.data_ptr<scalar_t>(), *dC = dCp.data_ptr<scalar_t>();
    scalar_t *dA = dAp.data_ptr<scalar_t>(), *dD = dDp.data_ptr<scalar_t>();
    with_n(n, [&](auto NC) {
      // Work items (block k, batch bi, group gi).
      at::parallel_for(0, nb * b * g, 1, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t k = i / (b * g), bi = (i / g) % b, gi = i % g;
          const int64_t d0 = gi * e + k * e / nb, d1 = gi * e + (k + 1) * e / nb;
          const int64_t slab = ((k * b + bi) * g + gi) * l * n, own = k * b + bi;
          backward_channels<scalar_t, decltype(NC)::value>(
              a, bi, d0, d1, go, gl, bd, gr, dB + slab, dC + slab, dA + own * d * n,
              dD + own * d);
        }
      });
    });
  });
  return {du, ddt, dgate, dBp.sum(0), dCp.sum(0), dAp.sum(0), dDp.sum(0), dh0};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fwd", &fwd, "selective scan forward (CPU)");
  m.def("bwd", &bwd, "selective scan backward (CPU)");
}
