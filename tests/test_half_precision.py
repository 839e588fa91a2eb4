"""Half precision as fairseq trains it: common.bf16 / common.fp16 on the tiny config, on this CPU.

fairseq's Trainer casts the model (model.half() / .to(bfloat16)) and the batches, and keeps fp32
master weights in FP16Optimizer. The SSM parameters the kernels read in fp32 (A_log, D, the Δ
bias) must stay fp32 through that cast. (fp16 needs common.fp16_no_flatten_grads=true on a CPU:
fairseq's flattened fp16 master copy calls torch.cuda.current_device(); bf16 never flattens.)
"""
import math

import pytest
import torch

from fairseq_mamba.modules.mamba_mixer import Mamba

from conftest import load_run_script, write_tiny_dataset

UPDATES = 5


@pytest.fixture(scope="module")
def one_batch(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("one_batch"), n_train=2, n_valid=1, seed=3)


@pytest.mark.parametrize("precision,dtype", [
    (["common.bf16=true"], "bfloat16"),
    (["common.fp16=true", "common.fp16_no_flatten_grads=true"], "float16"),
])
def test_tiny_config_trains_in_half_precision(precision, dtype, one_batch, tmp_path):
    overrides = [f"task.data={one_batch}", f"task.label_dir={one_batch}", "common.cpu=true",
                 "optimization.lr=[0.002]", "lr_scheduler.warmup_updates=2", "model.dropout=0.0",
                 "model.dropout_input=0.0", "model.dropout_features=0.0",
                 "task.random_crop=false", *precision]
    row = load_run_script("gpu_check").fairseq_updates("mamba_hubert_tiny_cpu", overrides, UPDATES, tmp_path)
    losses = row["losses"]
    assert len(losses) == UPDATES and all(map(math.isfinite, losses)), row
    assert sum(losses[-3:]) < 0.9 * sum(losses[:3]), losses  # falling
    assert row["finite"]
    assert row["dtypes"] == {"A_log": ["float32"], "D": ["float32"], "dt_proj.bias": ["float32"],
                             "other": [dtype]}, row["dtypes"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_casting_keeps_the_ssm_parameters_fp32_and_exact(dtype):
    mixer = Mamba(16, d_state=4, directions=("forward", "backward"))
    ssm = mixer.ssms[1]
    before = {"A_log": ssm.A_log.detach().clone(), "D": ssm.D.detach().clone(),
              "dt_bias": ssm.dt_proj.bias.detach().clone()}
    mixer.to(dtype)
    after = {"A_log": ssm.A_log, "D": ssm.D, "dt_bias": ssm.dt_proj.bias}
    for name, p in after.items():
        assert p.dtype == torch.float32 and torch.equal(p.detach(), before[name]), name
    assert mixer.in_proj.weight.dtype == ssm.dt_proj.weight.dtype == dtype
    mixer.double()  # any other cast applies to them as to every parameter
    assert ssm.A_log.dtype == ssm.dt_proj.bias.dtype == torch.float64
