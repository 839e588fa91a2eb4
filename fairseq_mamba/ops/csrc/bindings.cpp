// The CPU kernels' Python module (one extension, one build): each kernel file registers its
// functions; torch's pybind casters only, not torch/extension.h, for a faster cold build.
#include <torch/csrc/utils/pybind.h>

namespace fairseq_mamba {
void register_scan(pybind11::module_& m);  // selective_scan_cpu.cpp
void register_conv(pybind11::module_& m);  // causal_conv1d_cpu.cpp
}  // namespace fairseq_mamba

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  fairseq_mamba::register_scan(m);
  fairseq_mamba::register_conv(m);
}
