// Fused CPU selective scan: forward and backward of Mamba's S6 recurrence.
//
// The math is that of fairseq_mamba/ops/selective_scan.py, all of it in here: Δ's bias and
// softplus, silu(z), the scan, and their derivatives. b = batch, d = dim, l = length,
// n = d_state, g = groups, e = d / g channels per group, K = number of state chunks of
// `chunk` steps. In the compute type T (float or double):
//   u, delta, z, out, du, ddelta, dz   (b, d, l): one channel's steps in a row; the rows
//                                      contiguous, the batch and channel strides anything
//                                      (x and z can be the halves of mamba-ssm's "d (b l)"
//                                      projection; out and du are laid out like u)
//   Bt, Ct, dBt, dCt                   (b, g, l, n) time-major: one step's n values in a row
//   A, A2 (= A log2 e), dA             (d, n);  D, dD, bias, dbias (d)
//   h0, last, dh0                      (b, d, n)
//   bounds                             (b, d, K, n): the state before each chunk
// Per channel and step: dt = softplus(delta + bias); h = exp2(dt A2) h + dt u B;
// out = (<h, C> + D u) silu(z).
// Work goes chunk by chunk: the chunk's dt and gate (and in backward their derivatives) are
// computed into L1 buffers by loops the compiler vectorises, then the steps run over them.
// Each channel's n states live in registers (n is a template constant for the usual sizes);
// the (b, d, l, n) state is never stored: backward recomputes one chunk's states (at most
// chunk x n values, in L1) from the saved chunk-boundary state.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>

#include "fast_math.h"
#include "state_ops.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

namespace fairseq_mamba {
namespace {

constexpr int kMaxState = 256;

// A (b, d, l) tensor whose rows (one channel's steps) are contiguous.
template <typename P>
struct Rows {
  P p;
  int64_t sb, sd;
  P row(int64_t bi, int64_t di) const { return p ? p + bi * sb + di * sd : nullptr; }
};

template <typename T>
Rows<T*> out_rows(const at::Tensor& t) {  // an empty or 1-d t: none
  if (t.dim() != 3 || t.numel() == 0) return {nullptr, 0, 0};
  return {t.data_ptr<T>(), t.stride(0), t.stride(1)};
}
template <typename T>
Rows<const T*> in_rows(const c10::optional<at::Tensor>& t) {
  if (!t.has_value()) return {nullptr, 0, 0};
  return {t->numel() ? t->data_ptr<T>() : nullptr, t->stride(0), t->stride(1)};
}

template <typename T>
struct Args {
  Rows<const T*> u, delta, z;
  const T *bias, *A, *A2, *Bt, *Ct, *D, *h0;
  int64_t b, d, l, n, g, chunk, K;
  bool softplus;
};

// One chunk's dt = softplus(delta + bias) (or delta + bias) and its derivative, m steps.
template <typename T>
void chunk_dt(const T* __restrict__ delta, T bias, bool softplus, int64_t m, T* __restrict__ dt,
              T* __restrict__ ddt_dx) {
  if (!softplus) {
    for (int64_t j = 0; j < m; ++j) dt[j] = delta[j] + bias, ddt_dx[j] = T(1);
    return;
  }
#pragma omp simd
  for (int64_t j = 0; j < m; ++j) softplus_sigmoid(delta[j] + bias, dt[j], ddt_dx[j]);
}

// One chunk's gate = silu(z) and sigmoid(z), m steps.
template <typename T>
void chunk_gate(const T* __restrict__ z, int64_t m, T* __restrict__ gate, T* __restrict__ sig) {
#pragma omp simd
  for (int64_t j = 0; j < m; ++j) {
    T sp;
    softplus_sigmoid(z[j], sp, sig[j]);
    gate[j] = z[j] * sig[j];
  }
}

// dt's bound in the decay's exponent: the largest |dt| with every |dt A2_s| <= kExp2Arg (inf
// where A is 0). A larger dt is capped there only, where 2^(dt A2) is 0 or inf already.
template <typename T>
T dt_cap(const T* A2r, int64_t n) {
  T amax = 0;
  for (int64_t s = 0; s < n; ++s) amax = std::max(amax, std::fabs(A2r[s]));
  return amax > 0 ? static_cast<T>(kExp2Arg) / amax : std::numeric_limits<T>::infinity();
}
// dtc = dt capped to [-cap, cap], m steps (a loop of its own: capping inside the step loop,
// per step, made the forward scan 5% slower, measured here).
template <typename T>
void chunk_cap(const T* __restrict__ dt, T cap, int64_t m, T* __restrict__ dtc) {
#pragma omp simd
  for (int64_t j = 0; j < m; ++j) dtc[j] = dt[j] > cap ? cap : (dt[j] < -cap ? -cap : dt[j]);
}

// Forward of one channel (bi, di). N > 0: n known at compile time (registers).
// buf: 5 * chunk scratch values.
template <typename T, int N>
void forward_channel(const Args<T>& a, int64_t bi, int64_t di, const Rows<T*>& out,
                     T* __restrict__ last, T* __restrict__ bounds, T* __restrict__ buf) {
  const int64_t n = N > 0 ? N : a.n;
  const int64_t ch = bi * a.d + di, gi = di / (a.d / a.g);
  const T* __restrict__ u = a.u.row(bi, di);
  const T* __restrict__ delta = a.delta.row(bi, di);
  const T* __restrict__ z = a.z.row(bi, di);
  const T* __restrict__ Bt = a.Bt + (bi * a.g + gi) * a.l * n;
  const T* __restrict__ Ct = a.Ct + (bi * a.g + gi) * a.l * n;
  T* __restrict__ o = out.row(bi, di);
  const T Dd = a.D ? a.D[di] : T(0), bias = a.bias ? a.bias[di] : T(0);
  T *dtb = buf, *sdt = buf + a.chunk, *gb = buf + 2 * a.chunk, *sz = buf + 3 * a.chunk,
    *dtc = buf + 4 * a.chunk;
  T h[N > 0 ? N : kMaxState], A2r[N > 0 ? N : kMaxState];
  for (int64_t s = 0; s < n; ++s) {
    h[s] = a.h0 ? a.h0[ch * n + s] : T(0);
    A2r[s] = a.A2[di * n + s];
  }
  const T cap = dt_cap(A2r, n);
  for (int64_t c = 0; c < a.K; ++c) {
    const int64_t t0 = c * a.chunk, m = std::min(a.chunk, a.l - t0);
    if (bounds) std::copy(h, h + n, bounds + c * n);
    chunk_dt(delta + t0, bias, a.softplus, m, dtb, sdt);
    chunk_cap(dtb, cap, m, dtc);
    if (z) chunk_gate(z + t0, m, gb, sz);
    for (int64_t j = 0; j < m; ++j) {
      const int64_t t = t0 + j;
      const T dtt = dtb[j], dtu = dtt * u[t], dta = dtc[j];
      const T *B = Bt + t * n, *C = Ct + t * n;
#pragma omp simd
      for (int64_t s = 0; s < n; ++s) h[s] = exp2_fast(dta * A2r[s]) * h[s] + dtu * B[s];
      const T y = state_dot<T, N>(h, C, n) + Dd * u[t];
      o[t] = z ? y * gb[j] : y;
    }
  }
  std::copy(h, h + n, last + ch * n);
}

template <typename T>
struct Grads {  // backward's per-channel outputs, (b, d, l) and (b, d, n)
  Rows<const T*> gout;
  Rows<T*> du, ddelta, dz;
  T* dh0;
};

// Backward of the channels [d0, d1) of one group and batch item. dBt/dCt point at this
// work item's private (l, n) slabs; dA, dD, dbias at its private (d, n) and (d,) rows.
template <typename T, int N>
void backward_channels(const Args<T>& a, int64_t bi, int64_t d0, int64_t d1,
                       const T* glast, const T* bounds_all, const Grads<T>& gr,
                       T* __restrict__ dBt, T* __restrict__ dCt, T* __restrict__ dA_out,
                       T* __restrict__ dD_out, T* __restrict__ dbias_out) {
  const int64_t n = N > 0 ? N : a.n, L = a.chunk;
  constexpr int M = N > 0 ? N : kMaxState;
  // The chunk's states and decays, then dt, dt's derivative, gate, sigmoid(z), dgate, ddt,
  // capped dt.
  std::vector<T> Hbuf(L * n), Abuf(L * n), row(7 * L);
  T *dtb = row.data(), *sdt = dtb + L, *gb = sdt + L, *sz = gb + L, *dgb = sz + L, *ddtb = dgb + L,
    *dtc = ddtb + L;
  for (int64_t di = d0; di < d1; ++di) {
    const int64_t ch = bi * a.d + di, gi = di / (a.d / a.g);
    const T* __restrict__ u = a.u.row(bi, di);
    const T* __restrict__ delta = a.delta.row(bi, di);
    const T* __restrict__ z = a.z.row(bi, di);
    const T* __restrict__ go = gr.gout.row(bi, di);
    const T* __restrict__ Bt = a.Bt + (bi * a.g + gi) * a.l * n;
    const T* __restrict__ Ct = a.Ct + (bi * a.g + gi) * a.l * n;
    const T* __restrict__ bounds = bounds_all + ch * a.K * n;
    const T Dd = a.D ? a.D[di] : T(0), bias = a.bias ? a.bias[di] : T(0);
    T* __restrict__ du = gr.du.row(bi, di);
    T* __restrict__ ddelta = gr.ddelta.row(bi, di);
    T* __restrict__ dz = z ? gr.dz.row(bi, di) : nullptr;
    // dA, dD and dbias sum over time: each chunk's terms in T, the chunks' sums in double,
    // as the terms often cancel (fp32 round-off of one long sum would then dominate the
    // small result; a double add per term and state would slow the loop by ~15%).
    T dh[M], Ar[M], A2r[M], dAc[M];
    double dA[M];
    for (int64_t s = 0; s < n; ++s) {
      dh[s] = glast ? glast[ch * n + s] : T(0);
      dA[s] = 0;
      Ar[s] = a.A[di * n + s];
      A2r[s] = a.A2[di * n + s];
    }
    const T cap = dt_cap(A2r, n);
    double dD = 0, dbias = 0;
    for (int64_t c = a.K - 1; c >= 0; --c) {
      const int64_t t0 = c * L, m = std::min(L, a.l - t0);
      chunk_dt(delta + t0, bias, a.softplus, m, dtb, sdt);
      chunk_cap(dtb, cap, m, dtc);
      if (z) chunk_gate(z + t0, m, gb, sz);
      // Recompute the chunk's states h_t and decays a_t from its start state.
      const T* hprev = bounds + c * n;
      for (int64_t j = 0; j < m; ++j) {
        T* __restrict__ H = Hbuf.data() + j * n;
        T* __restrict__ Ad = Abuf.data() + j * n;
        const T dtt = dtb[j], dtu = dtt * u[t0 + j], dta = dtc[j];
        const T* __restrict__ B = Bt + (t0 + j) * n;
#pragma omp simd
        for (int64_t s = 0; s < n; ++s) {
          Ad[s] = exp2_fast(dta * A2r[s]);
          H[s] = Ad[s] * hprev[s] + dtu * B[s];
        }
        hprev = H;
      }
      // Reverse (adjoint) recurrence: dh_t = gy_t C_t + a_{t+1} dh_{t+1}.
      std::fill(dAc, dAc + n, T(0));
      for (int64_t j = m - 1; j >= 0; --j) {
        const int64_t t = t0 + j;
        const T* __restrict__ H = Hbuf.data() + j * n;
        const T* __restrict__ Ad = Abuf.data() + j * n;
        const T* __restrict__ Hp = j > 0 ? H - n : bounds + c * n;
        const T* __restrict__ B = Bt + t * n;
        const T* __restrict__ C = Ct + t * n;
        T* __restrict__ dB = dBt + t * n;
        T* __restrict__ dC = dCt + t * n;
        const T dtt = dtb[j], dtu = dtt * u[t], g = go ? go[t] : T(0);
        T gy = g;
        if (z) {  // dL/dgate = g (<h, C> + D u)
          dgb[j] = g * (state_dot<T, N>(H, C, n) + Dd * u[t]);
          gy = g * gb[j];
        }
        T d_dtu, ddtA;
        adjoint_states<T, N>(gy, dtu, dtt, H, Ad, Hp, B, C, Ar, dh, dAc, dB, dC, n, d_dtu, ddtA);
        du[t] = d_dtu * dtt + gy * Dd;
        ddtb[j] = d_dtu * u[t] + ddtA;
        dD += static_cast<double>(gy * u[t]);
      }
      for (int64_t s = 0; s < n; ++s) dA[s] += static_cast<double>(dAc[s]);
      // Through softplus and silu: ddelta = ddt sigmoid(x); dz = dgate silu'(z), with
      // silu'(z) = sig(z) (1 + z (1 - sig(z))).
      T db = 0;
#pragma omp simd reduction(+ : db)
      for (int64_t j = 0; j < m; ++j) {
        ddelta[t0 + j] = ddtb[j] * sdt[j];
        db += ddtb[j] * sdt[j];
      }
      dbias += static_cast<double>(db);
      if (z) {
#pragma omp simd
        for (int64_t j = 0; j < m; ++j)
          dz[t0 + j] = dgb[j] * sz[j] * (T(1) + z[t0 + j] * (T(1) - sz[j]));
      }
    }
    for (int64_t s = 0; s < n; ++s) dA_out[di * n + s] += static_cast<T>(dA[s]);
    std::copy(dh, dh + n, gr.dh0 + ch * n);
    dD_out[di] += static_cast<T>(dD);
    dbias_out[di] += static_cast<T>(dbias);
  }
}

template <typename T>
const T* ptr(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

template <typename T>
Args<T> make_args(const at::Tensor& u, const at::Tensor& delta,
                  const c10::optional<at::Tensor>& z, const c10::optional<at::Tensor>& bias,
                  bool softplus, const at::Tensor& A, const at::Tensor& A2, const at::Tensor& Bt,
                  const at::Tensor& Ct, const c10::optional<at::Tensor>& D,
                  const c10::optional<at::Tensor>& h0, int64_t chunk) {
  return Args<T>{in_rows<T>(u), in_rows<T>(delta), in_rows<T>(z), ptr<T>(bias),
                 A.data_ptr<T>(), A2.data_ptr<T>(), Bt.data_ptr<T>(), Ct.data_ptr<T>(),
                 ptr<T>(D), ptr<T>(h0), u.size(0), u.size(1), u.size(2), A.size(1),
                 Bt.size(1), chunk, (u.size(2) + chunk - 1) / chunk, softplus};
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

// (b, d, l) with contiguous rows: the layout the kernels read.
void check_rows(const at::Tensor& t, const at::Tensor& u, const char* name) {
  TORCH_CHECK(t.sizes() == u.sizes() && t.scalar_type() == u.scalar_type(), name,
              " must have u's shape and dtype");
  TORCH_CHECK(t.size(2) <= 1 || t.stride(2) == 1, name, " must have contiguous rows");
}

void check(const at::Tensor& u, const at::Tensor& delta, const c10::optional<at::Tensor>& z,
           const at::Tensor& A, int64_t chunk) {
  TORCH_CHECK(u.dim() == 3, "u must be (b, d, l)");
  check_rows(u, u, "u");
  check_rows(delta, u, "delta");
  if (z.has_value()) check_rows(*z, u, "z");
  TORCH_CHECK(A.size(1) <= kMaxState, "d_state ", A.size(1), " > ", kMaxState);
  TORCH_CHECK(chunk > 0, "chunk must be positive, got ", chunk);
}

}  // namespace

// -> out (b, d, l), last (b, d, n), bounds (b, d, K, n) (empty unless save).
std::vector<at::Tensor> scan_fwd(const at::Tensor& u, const at::Tensor& delta,
                            const c10::optional<at::Tensor>& z,
                            const c10::optional<at::Tensor>& bias, bool softplus,
                            const at::Tensor& A, const at::Tensor& A2, const at::Tensor& Bt,
                            const at::Tensor& Ct, const c10::optional<at::Tensor>& D,
                            const c10::optional<at::Tensor>& h0, int64_t chunk, bool save) {
  check(u, delta, z, A, chunk);
  auto out = at::empty_like(u);  // u's layout
  auto last = at::empty({u.size(0), u.size(1), A.size(1)}, u.options());
  const int64_t K = (u.size(2) + chunk - 1) / chunk;
  auto bounds = at::empty({save ? u.size(0) : 0, u.size(1), K, A.size(1)}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_cpu_fwd", [&] {
    const auto a = make_args<scalar_t>(u, delta, z, bias, softplus, A, A2, Bt, Ct, D, h0, chunk);
    const auto o = out_rows<scalar_t>(out);
    scalar_t* ls = last.data_ptr<scalar_t>();
    scalar_t* bd = save ? bounds.data_ptr<scalar_t>() : nullptr;
    with_n(a.n, [&](auto NC) {
      at::parallel_for(0, a.b * a.d, 1, [&](int64_t i0, int64_t i1) {
        std::vector<scalar_t> buf(5 * chunk);
        for (int64_t i = i0; i < i1; ++i)
          forward_channel<scalar_t, decltype(NC)::value>(
              a, i / a.d, i % a.d, o, ls, bd ? bd + i * a.K * a.n : nullptr, buf.data());
      });
    });
  });
  return {out, last, bounds};
}

// -> du, ddelta, dz (empty without z), dBt, dCt, dA, dD, dbias, dh0.
std::vector<at::Tensor> scan_bwd(const at::Tensor& u, const at::Tensor& delta,
                            const c10::optional<at::Tensor>& z,
                            const c10::optional<at::Tensor>& bias, bool softplus,
                            const at::Tensor& A, const at::Tensor& A2, const at::Tensor& Bt,
                            const at::Tensor& Ct, const c10::optional<at::Tensor>& D,
                            const at::Tensor& bounds, const c10::optional<at::Tensor>& gout,
                            const c10::optional<at::Tensor>& glast, int64_t chunk,
                            int64_t blocks) {
  check(u, delta, z, A, chunk);
  const int64_t b = u.size(0), d = u.size(1), l = u.size(2), n = A.size(1), g = Bt.size(1);
  const int64_t e = d / g, nb = std::max<int64_t>(1, std::min(blocks, e));
  if (gout.has_value()) check_rows(*gout, u, "gout");
  auto du = at::empty_like(u), ddelta = at::empty_like(delta);  // the inputs' layouts
  auto dz = z.has_value() ? at::empty_like(*z) : at::empty({0}, u.options());
  // One private dB/dC (b, g, l, n) and dA/dD/dbias per channel block, summed below: no races.
  auto dBp = at::zeros({nb, b, g, l, n}, u.options()), dCp = at::zeros_like(dBp);
  auto dAp = at::zeros({nb * b, d, n}, u.options());
  auto dDp = at::zeros({nb * b, d}, u.options()), dbp = at::zeros({nb * b, d}, u.options());
  auto dh0 = at::empty({b, d, n}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_cpu_bwd", [&] {
    const auto a = make_args<scalar_t>(u, delta, z, bias, softplus, A, A2, Bt, Ct, D,
                                       c10::nullopt, chunk);
    Grads<scalar_t> gr{in_rows<scalar_t>(gout), out_rows<scalar_t>(du),
                       out_rows<scalar_t>(ddelta), out_rows<scalar_t>(dz),
                       dh0.data_ptr<scalar_t>()};
    const scalar_t* gl = ptr<scalar_t>(glast);
    const scalar_t* bd = bounds.data_ptr<scalar_t>();
    scalar_t *dB = dBp.data_ptr<scalar_t>(), *dC = dCp.data_ptr<scalar_t>();
    scalar_t *dA = dAp.data_ptr<scalar_t>(), *dD = dDp.data_ptr<scalar_t>();
    scalar_t* db = dbp.data_ptr<scalar_t>();
    with_n(n, [&](auto NC) {
      // Work items (block k, batch bi, group gi).
      at::parallel_for(0, nb * b * g, 1, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t k = i / (b * g), bi = (i / g) % b, gi = i % g;
          const int64_t d0 = gi * e + k * e / nb, d1 = gi * e + (k + 1) * e / nb;
          const int64_t slab = ((k * b + bi) * g + gi) * l * n, own = k * b + bi;
          backward_channels<scalar_t, decltype(NC)::value>(
              a, bi, d0, d1, gl, bd, gr, dB + slab, dC + slab, dA + own * d * n,
              dD + own * d, db + own * d);
        }
      });
    });
  });
  return {du, ddelta, dz, dBp.sum(0), dCp.sum(0), dAp.sum(0), dDp.sum(0), dbp.sum(0), dh0};
}

void register_scan(pybind11::module_& m) {
  m.def("fwd", &scan_fwd, "selective scan forward (CPU)");
  m.def("bwd", &scan_bwd, "selective scan backward (CPU)");
}

}  // namespace fairseq_mamba
