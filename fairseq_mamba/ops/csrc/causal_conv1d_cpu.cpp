// Causal depthwise conv1d (+ optional SiLU), forward and backward, for the CPU.
//
// The math is causal_conv1d_reference's (fairseq_mamba/ops/causal_conv1d.py), without
// states: out[b, d, t] = act(bias[d] + sum_k w[d, k] x[b, d, t - (K - 1) + k]), x = 0
// before t = 0. x (b, d, l) with contiguous rows and any batch/channel strides (e.g. one
// half of mamba-ssm's "d (b l)" projection); out and dx are returned as (b, d, l) views of
// (d, b, l) memory, the layout the x projection then reads without a copy. Each channel is
// one work item (its batch rows in turn), so dw and dbias need no reduction across threads.
// F.conv1d on the same input costs ~8x more forward+backward (it pads, copies and calls
// a general depthwise kernel; measured in BENCHMARKS.md).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>

#include "fast_math.h"

#include <algorithm>
#include <vector>

namespace fairseq_mamba {
namespace {

// pre[t] = bias + sum_k w[k] x[t - (K - 1) + k], t < l: one loop per tap, over t.
template <typename T>
void conv_row(const T* __restrict__ x, const T* __restrict__ w, int64_t K, T bias, int64_t l,
              T* __restrict__ pre) {
  std::fill(pre, pre + l, bias);
  for (int64_t k = 0; k < K; ++k) {
    const int64_t shift = K - 1 - k;
    const T wk = w[k];
#pragma omp simd
    for (int64_t t = shift; t < l; ++t) pre[t] += wk * x[t - shift];
  }
}

// out row = act(conv(x row)).
template <typename T>
void forward_row(const T* __restrict__ x, const T* __restrict__ w, int64_t K, T bias, int64_t l,
                 bool silu, T* __restrict__ out) {
  conv_row(x, w, K, bias, l, out);
  if (silu) {
#pragma omp simd
    for (int64_t t = 0; t < l; ++t) out[t] *= sigmoid_fast(out[t]);
  }
}

// One batch row of channel d: dx row; adds to dw[K] and dbias. g: l scratch values.
template <typename T>
void backward_row(const T* __restrict__ x, const T* __restrict__ gout, const T* __restrict__ w,
                  int64_t K, T bias, int64_t l, bool silu, T* __restrict__ g,
                  T* __restrict__ dx, double* dw, double& dbias) {
  if (silu) {  // through silu: silu'(p) = sig(p) (1 + p (1 - sig(p)))
    conv_row(x, w, K, bias, l, g);
#pragma omp simd
    for (int64_t t = 0; t < l; ++t) {
      const T s = sigmoid_fast(g[t]);
      g[t] = gout[t] * s * (T(1) + g[t] * (T(1) - s));
    }
  } else {
    std::copy(gout, gout + l, g);
  }
  std::fill(dx, dx + l, T(0));
  T sb = 0;
#pragma omp simd reduction(+ : sb)
  for (int64_t t = 0; t < l; ++t) sb += g[t];
  dbias += sb;
  for (int64_t k = 0; k < K; ++k) {  // tap k reads x[t - shift]
    const int64_t shift = K - 1 - k;
    const T wk = w[k];
    T sw = 0;
#pragma omp simd reduction(+ : sw)
    for (int64_t t = shift; t < l; ++t) {
      sw += g[t] * x[t - shift];
      dx[t - shift] += wk * g[t];
    }
    dw[k] += sw;
  }
}

void check(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 3 && (x.size(2) <= 1 || x.stride(2) == 1),
              "x must be (b, d, l) with contiguous rows");
  TORCH_CHECK(w.dim() == 2 && w.size(0) == x.size(1) && w.is_contiguous(),
              "weight must be contiguous (d, width)");
}

// (b, d, l) view of new (d, b, l) memory.
at::Tensor channel_major(const at::Tensor& x) {
  return at::empty({x.size(1), x.size(0), x.size(2)}, x.options()).permute({1, 0, 2});
}

}  // namespace

at::Tensor conv_fwd(const at::Tensor& x, const at::Tensor& w,
                    const c10::optional<at::Tensor>& bias, bool silu) {
  check(x, w);
  const int64_t b = x.size(0), d = x.size(1), l = x.size(2), K = w.size(1);
  auto out = channel_major(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "causal_conv1d_cpu_fwd", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const scalar_t* bp = bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, d, 1, [&](int64_t d0, int64_t d1) {
      for (int64_t di = d0; di < d1; ++di)
        for (int64_t bi = 0; bi < b; ++bi) {
          forward_row(xp + bi * x.stride(0) + di * x.stride(1), wp + di * K, K,
                      bp ? bp[di] : scalar_t(0), l, silu, op + (di * b + bi) * l);
        }
    });
  });
  return out;
}

// -> dx (b, d, l), dw (d, width), dbias (d,).
std::vector<at::Tensor> conv_bwd(const at::Tensor& x, const at::Tensor& w,
                                 const c10::optional<at::Tensor>& bias, const at::Tensor& gout,
                                 bool silu) {
  check(x, w);
  check(gout, w);
  const int64_t b = x.size(0), d = x.size(1), l = x.size(2), K = w.size(1);
  auto dx = channel_major(x);
  auto dw = at::zeros_like(w), db = at::zeros({d}, w.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "causal_conv1d_cpu_bwd", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = gout.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const scalar_t* bp = bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr;
    scalar_t *dxp = dx.data_ptr<scalar_t>(), *dwp = dw.data_ptr<scalar_t>();
    scalar_t* dbp = db.data_ptr<scalar_t>();
    at::parallel_for(0, d, 1, [&](int64_t d0, int64_t d1) {
      std::vector<scalar_t> g(l);  // dL/d(pre-activation) of one row
      for (int64_t di = d0; di < d1; ++di) {
        const scalar_t* wd = wp + di * K;
        double dbias = 0;
        std::vector<double> dwd(K, 0.0);
        for (int64_t bi = 0; bi < b; ++bi)
          backward_row(xp + bi * x.stride(0) + di * x.stride(1),
                       gp + bi * gout.stride(0) + di * gout.stride(1), wd, K,
                       bp ? bp[di] : scalar_t(0), l, silu, g.data(), dxp + (di * b + bi) * l,
                       dwd.data(), dbias);
        for (int64_t k = 0; k < K; ++k) dwp[di * K + k] = static_cast<scalar_t>(dwd[k]);
        dbp[di] = static_cast<scalar_t>(dbias);
      }
    });
  });
  return {dx, dw, db};
}

void register_conv(pybind11::module_& m) {
  m.def("conv_fwd", &conv_fwd, "causal depthwise conv1d (+ SiLU) forward (CPU)");
  m.def("conv_bwd", &conv_bwd, "causal depthwise conv1d (+ SiLU) backward (CPU)");
}

}  // namespace fairseq_mamba
