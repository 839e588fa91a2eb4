// The CPU kernels' Python module (one extension, one build): torch's pybind casters only,
// not torch/extension.h, for a 30% faster cold build.
#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>

#include <vector>

namespace fairseq_mamba {
std::vector<at::Tensor> scan_fwd(const at::Tensor& u, const at::Tensor& delta,
                                 const c10::optional<at::Tensor>& z,
                                 const c10::optional<at::Tensor>& bias, bool softplus,
                                 const at::Tensor& A, const at::Tensor& A2, const at::Tensor& Bt,
                                 const at::Tensor& Ct, const c10::optional<at::Tensor>& D,
                                 const c10::optional<at::Tensor>& h0, int64_t chunk, bool save);
std::vector<at::Tensor> scan_bwd(const at::Tensor& u, const at::Tensor& delta,
                                 const c10::optional<at::Tensor>& z,
                                 const c10::optional<at::Tensor>& bias, bool softplus,
                                 const at::Tensor& A, const at::Tensor& A2, const at::Tensor& Bt,
                                 const at::Tensor& Ct, const c10::optional<at::Tensor>& D,
                                 const at::Tensor& bounds, const c10::optional<at::Tensor>& gout,
                                 const c10::optional<at::Tensor>& glast, int64_t chunk,
                                 int64_t blocks);
at::Tensor conv_fwd(const at::Tensor& x, const at::Tensor& w,
                    const c10::optional<at::Tensor>& bias, bool silu);
std::vector<at::Tensor> conv_bwd(const at::Tensor& x, const at::Tensor& w,
                                 const c10::optional<at::Tensor>& bias, const at::Tensor& gout,
                                 bool silu);
}  // namespace fairseq_mamba

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fwd", &fairseq_mamba::scan_fwd, "selective scan forward (CPU)");
  m.def("bwd", &fairseq_mamba::scan_bwd, "selective scan backward (CPU)");
  m.def("conv_fwd", &fairseq_mamba::conv_fwd, "causal depthwise conv1d (+ SiLU) forward (CPU)");
  m.def("conv_bwd", &fairseq_mamba::conv_bwd, "causal depthwise conv1d (+ SiLU) backward (CPU)");
}
