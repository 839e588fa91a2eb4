"""The compiled CPU scan's own cases (its parity with the reference on every input is in
test_selective_scan.py and test_properties.py): saved-state chunk boundaries and the
fallback to the chunked scan when the build fails."""

import os
import time

import pytest
import torch

from fairseq_mamba.ops import scan_kernel, selective_scan, selective_scan_reference
from test_selective_scan import RTOL, assert_rel_close, assert_same, make_inputs, run


@pytest.mark.parametrize("chunk,length", [(1, 50), (3, 50), (16, 300), (64, 63), (64, 65),
                                          (64, 200), (200, 130)])
@pytest.mark.parametrize("with_h0", [False, True])
def test_kernel_chunk_sizes(chunk, length, with_h0):
    """The kernel's saved-state chunks (backward recomputes the states from them), full
    and partial, are exact."""
    x = make_inputs(length=length, dtype=torch.float64, with_h0=with_h0)

    def kernel(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
               initial_state=None):
        out, last = scan_kernel.KernelSelectiveScan.apply(
            u, delta, A, B.unsqueeze(1), C.unsqueeze(1), D, z, delta_bias, delta_softplus,
            initial_state, chunk)
        return (out, last) if return_last_state else out

    assert_same(x, kernel, selective_scan_reference, RTOL[torch.float64])


def test_failed_kernel_build_falls_back_to_chunked(monkeypatch, caplog):
    """A build or load error: one logged warning, then the chunked scan, same results."""
    import torch.utils.cpp_extension

    def broken_load(*args, **kwargs):
        raise RuntimeError("Error building extension 'x'\nmore lines")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", broken_load)
    monkeypatch.setattr(scan_kernel, "_ext", None)
    monkeypatch.setattr(scan_kernel, "_tried", False)
    x = make_inputs(length=40)
    with caplog.at_level("WARNING", logger=scan_kernel.__name__):
        assert_same(x, selective_scan, selective_scan_reference, RTOL[torch.float32])
    warnings = [r for r in caplog.records if r.name == scan_kernel.__name__]
    assert len(warnings) == 1 and "chunked PyTorch scan" in warnings[0].getMessage()
    assert "Error building extension 'x'" in warnings[0].getMessage()
    assert scan_kernel.load_kernel() is None


def test_a_killed_builds_lock_is_cleared_and_a_live_one_kept(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / "ext" / "lock"
    lock.parent.mkdir()
    lock.write_text("")
    assert scan_kernel.clear_stale_build_lock("ext") is False and lock.exists()  # a build under way
    old = time.time() - scan_kernel.STALE_LOCK_SECONDS - 5
    os.utime(lock, (old, old))
    with caplog.at_level("WARNING"):
        assert scan_kernel.clear_stale_build_lock("ext") is True
    assert not lock.exists() and "did not finish" in caplog.text
    assert scan_kernel.clear_stale_build_lock("ext") is False  # nothing left to clear


def _channel_major(t):
    """The same values as a (b, d, l) view of (d, b, l) memory, as the mixer passes them."""
    return t.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()


@pytest.mark.parametrize("softplus", [False, True])
def test_kernel_reads_channel_major_rows(softplus):
    """u, delta, z as views of "d (b l)" memory (z one half of a (b, 2d, l) projection):
    read in place, same outputs and gradients as contiguous inputs."""
    x = make_inputs(batch=3, length=37, dtype=torch.float64)
    if not softplus:
        x["delta"] = x["delta"].detach().exp().requires_grad_()
    strided = dict(x, u=_channel_major(x["u"]), delta=_channel_major(x["delta"]))
    xz = torch.cat([x["z"].detach(), torch.randn_like(x["z"])], 1)
    strided["z"] = xz.transpose(0, 1).contiguous().transpose(0, 1)[:, :6].requires_grad_()
    assert scan_kernel._rows(strided["z"], torch.float64) is strided["z"]  # no copy
    assert_same(strided, selective_scan, selective_scan_reference, RTOL[torch.float64],
                softplus=softplus)


def test_kernel_on_two_threads_matches_one_thread():
    """at::parallel_for really splits the channels (the extension is built with OpenMP), and
    backward's per-block dB/dC/dA slabs add up to the one-thread gradients."""
    x = make_inputs(batch=3, dim=8, length=150, groups=2)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(selective_scan, x)
        torch.set_num_threads(2)
        two = run(selective_scan, x)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one[0], two[0]):
        assert_rel_close(a, b, 1e-6, "output")
    for k in one[1]:
        assert_rel_close(two[1][k], one[1][k], 1e-5, f"grad {k}")
