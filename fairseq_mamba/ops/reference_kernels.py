"""CPU stand-ins for the CUDA kernels, to run every kernel call site without a GPU.

Each stand-in has its kernel's exact Python API, checks the dtype and layout contract the
compiled kernel checks (its TORCH_CHECKs, after the Python wrapper's ``.contiguous()`` calls),
counts its calls, and computes with the package's own pure-PyTorch reference:

* ``selective_scan_fn``: mamba-ssm's ``selective_scan_ref`` (fp32 math), or our
  ``selective_scan_reference`` for fp64 runs (the kernel has no fp64; they check the call
  sites' arithmetic to 1e-9);
* ``mamba_inner_fn``: mamba-ssm's ``mamba_inner_ref``, calling the two stand-ins below it;
* ``causal_conv1d_fn``: causal-conv1d is not installable without CUDA, so our
  ``causal_conv1d_reference`` behind ``causal_conv1d_fn``'s signature.

Usage: ``with ops.use_kernels(reference_kernels(calls)): layer(x)`` runs ``layer`` through its
GPU branch on CPU tensors; ``calls`` (a Counter) says which kernels it took.
"""
import collections
import importlib
import importlib.util
import sys
import types

import torch

from fairseq_mamba.ops.causal_conv1d import causal_conv1d_reference
from fairseq_mamba.ops.dispatch import KERNEL_DTYPES, Kernels
from fairseq_mamba.ops.selective_scan import selective_scan_reference


class KernelContractError(ValueError):
    """A call a compiled kernel would reject (dtype, layout or width)."""


def _require(ok, what):
    if not ok:
        raise KernelContractError(what)


def load_selective_scan_interface():
    """mamba-ssm's selective_scan_interface module without its CUDA/triton parts, or (None, why).

    A private copy: mamba_ssm/__init__ (triton-only imports), the CUDA extension and the triton
    layer norm are stubbed while it imports, and ``sys.modules`` is restored afterwards.
    """
    spec = importlib.util.find_spec("mamba_ssm")
    if spec is None:
        return None, ("mamba_ssm is not installed; for the pure-PyTorch references: "
                      "MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE pip install "
                      "--no-build-isolation --no-deps mamba-ssm einops")
    ours = [k for k in sys.modules if k.startswith("mamba_ssm") or k == "selective_scan_cuda"]
    saved = {k: sys.modules.pop(k) for k in ours}
    pkg = types.ModuleType("mamba_ssm")
    pkg.__path__ = list(spec.submodule_search_locations)
    layer_norm = types.ModuleType("mamba_ssm.ops.triton.layer_norm")
    layer_norm._layer_norm_fwd = None
    sys.modules.update({"mamba_ssm": pkg, layer_norm.__name__: layer_norm,
                        "selective_scan_cuda": types.ModuleType("selective_scan_cuda")})
    try:
        return importlib.import_module("mamba_ssm.ops.selective_scan_interface"), None
    except Exception as exc:  # e.g. einops missing
        return None, f"mamba_ssm's selective_scan_interface could not be imported: {exc!r}"
    finally:
        for k in [k for k in sys.modules if k.startswith("mamba_ssm") or k == "selective_scan_cuda"]:
            del sys.modules[k]
        sys.modules.update(saved)


def check_scan_contract(u, delta, A, B, C, D=None, z=None, delta_bias=None, dtypes=KERNEL_DTYPES):
    """What selective_scan_cuda.fwd accepts: inputs in one kernel dtype, A/D/Δ bias in fp32."""
    _require(u.dtype in dtypes, f"u dtype {u.dtype} is not one of {dtypes}")
    _require(A.dtype == torch.float32, f"A must be fp32, got {A.dtype}")
    _require(A.shape[-1] <= 256, f"d_state={A.shape[-1]} > 256")
    for name, t in (("delta", delta), ("B", B), ("C", C), ("z", z)):
        _require(t is None or t.dtype == u.dtype, f"{name} dtype {t.dtype} != u dtype {u.dtype}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        _require(t is None or t.dtype == torch.float32, f"{name} must be fp32, got {t.dtype}")


def check_conv_contract(x, weight, bias=None, initial_states=None, return_final_states=False,
                        dtypes=KERNEL_DTYPES):
    """What causal_conv1d_cuda.causal_conv1d_fwd accepts after causal_conv1d_fn's wrapper."""
    _require(x.dtype in dtypes and weight.dtype in dtypes,
             f"x / weight dtypes {x.dtype} / {weight.dtype} not in {dtypes}")
    _require(bias is None or bias.dtype == weight.dtype,
             f"bias dtype {None if bias is None else bias.dtype} != weight dtype {weight.dtype}")
    _require(2 <= weight.shape[-1] <= 4, f"width {weight.shape[-1]} outside 2..4")
    # The wrapper makes x contiguous unless it is channel-last (stride(1) == 1): that layout
    # takes the channel-last kernel, which has its own conditions.
    channel_last = x.stride(1) == 1 and x.stride(2) > 1
    if channel_last:
        _require(x.shape[1] % 8 == 0 and x.stride(2) % 8 == 0 and x.stride(0) % 8 == 0,
                 f"channel-last x needs dim and strides divisible by 8, got shape "
                 f"{tuple(x.shape)} strides {x.stride()}")
    _require(channel_last or (initial_states is None and not return_final_states),
             "initial_states / final states need a channel-last x")


def reference_kernels(calls=None, fp64=False):
    """``Kernels`` of CPU stand-ins (see the module docstring); ``calls`` counts their calls.

    fp64=True: the stand-ins also take fp64 inputs, and the scan is our fp64 reference.
    Raises RuntimeError naming the fix if mamba-ssm's references cannot be imported.
    """
    ssi, why = load_selective_scan_interface()
    if ssi is None:
        raise RuntimeError(why)
    calls = collections.Counter() if calls is None else calls
    dtypes = KERNEL_DTYPES + ((torch.float64,) if fp64 else ())
    scan_ref = selective_scan_reference if fp64 else ssi.selective_scan_ref

    def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                          delta_softplus=False, return_last_state=False):
        calls["selective_scan_fn"] += 1
        check_scan_contract(u, delta, A, B, C, D, z, delta_bias, dtypes)
        return scan_ref(u, delta, A, B, C, D, z=z, delta_bias=delta_bias,
                        delta_softplus=delta_softplus, return_last_state=return_last_state)

    def causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None,
                         return_final_states=False, final_states_out=None, activation=None):
        calls["causal_conv1d_fn"] += 1
        _require(seq_idx is None and final_states_out is None, "seq_idx / final_states_out unused")
        check_conv_contract(x, weight, bias, initial_states, return_final_states, dtypes)
        return causal_conv1d_reference(x, weight, bias, activation=activation,
                                       initial_states=initial_states,
                                       return_final_states=return_final_states)

    # mamba_inner_ref looks both up in its module: this private copy gets the stand-ins.
    ssi.selective_scan_fn, ssi.causal_conv1d_fn = selective_scan_fn, causal_conv1d_fn

    def mamba_inner_fn(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
                       out_proj_weight, out_proj_bias, A, B=None, C=None, D=None,
                       delta_bias=None, B_proj_bias=None, C_proj_bias=None, delta_softplus=True,
                       checkpoint_lvl=1, b_rms_weight=None, c_rms_weight=None,
                       dt_rms_weight=None, b_c_dt_rms_eps=1e-6):
        calls["mamba_inner_fn"] += 1
        _require(b_rms_weight is None and c_rms_weight is None and dt_rms_weight is None,
                 "mamba_inner_ref has no B/C/Δ RMS norms")
        # mamba_inner_ref always applies softplus to Δ; the kernel honours the flag.
        _require(delta_softplus, "delta_softplus=False: mamba_inner_ref cannot stand in")
        _require(conv1d_weight.dim() == 3 and conv1d_weight.shape[1] == 1,
                 f"conv1d_weight must be (dim, 1, width), got {tuple(conv1d_weight.shape)}")
        return ssi.mamba_inner_ref(xz, conv1d_weight, conv1d_bias, x_proj_weight,
                                   delta_proj_weight, out_proj_weight, out_proj_bias, A, B, C, D,
                                   delta_bias=delta_bias, B_proj_bias=B_proj_bias,
                                   C_proj_bias=C_proj_bias, delta_softplus=delta_softplus)

    return Kernels(selective_scan_fn, mamba_inner_fn, causal_conv1d_fn, device_type="cpu",
                   dtypes=dtypes)
