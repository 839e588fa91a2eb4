"""End to end through fairseq-hydra-train, run from the repository root exactly as the README says."""
import json
import re
import subprocess

import pytest
import torch
from fairseq import checkpoint_utils

from fairseq_mamba.models.causal_hubert import CausalHubertModel
from fairseq_mamba.models.mamba_hubert import MambaHubertModel

from conftest import BIN, REPO, subprocess_env, write_tiny_dataset

UPDATES = 20


def train(config, data, run_dir, *extra):
    cmd = [
        str(BIN / "fairseq-hydra-train"), "--config-dir", "examples/pretrain", "--config-name", config,
        f"task.data={data}", f"task.label_dir={data}", "common.user_dir=fairseq_mamba",
        f"hydra.run.dir={run_dir}", "common.log_format=json", "common.log_interval=1",
        *extra,
    ]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=subprocess_env(), timeout=600)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-3000:]
    return log


def train_losses(log):
    """The per-update training losses logged by fairseq (json log format)."""
    losses = []
    for line in log.splitlines():
        if "[train_inner]" in line:
            record = json.loads(line[line.index("{"):])
            losses.append(float(record["loss"]))
    return losses


@pytest.fixture(scope="module")
def one_batch(tmp_path_factory):
    """Two utterances: the whole training set fits in one batch, so the model can overfit it."""
    return write_tiny_dataset(tmp_path_factory.mktemp("one_batch"), n_train=2, n_valid=1, seed=3)


OVERFIT = [f"optimization.max_update={UPDATES}", "optimization.lr=[0.002]", "lr_scheduler.warmup_updates=3",
           "model.dropout=0.0", "model.dropout_input=0.0", "model.dropout_features=0.0",
           "checkpoint.save_interval_updates=1000", "task.random_crop=false"]


@pytest.mark.parametrize("config,model_name", [("mamba_hubert_tiny_cpu", "mamba_hubert"), ("hubert_tiny_cpu", "hubert"),
                                               ("causal_hubert_tiny_cpu", "causal_hubert"),
                                               ("mamba2_hubert_tiny_cpu", "mamba_hubert")])
def test_pretraining_overfits_one_batch_and_reloads(config, model_name, one_batch, tmp_path):
    log = train(config, one_batch, tmp_path / "run", *OVERFIT)
    losses = train_losses(log)
    assert len(losses) == UPDATES
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.8 * first, losses

    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint_last.pt"
    assert checkpoint.exists()
    # fairseq's own loader, with torch's default weights_only=True: needs the plugin's allow-list.
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([str(checkpoint)])
    assert cfg.model._name == model_name and task.cfg._name == "hubert_pretraining"
    if model_name == "mamba_hubert":
        assert isinstance(models[0], MambaHubertModel)
        # the criterion's Mamba-1 diagnostics (Mamba-2's SSD records no Δ statistic)
        assert bool(re.search(r"ssm_delta_0=|\"ssm_delta_0\"", log)) == (config == "mamba_hubert_tiny_cpu")
        assert cfg.model.mamba_version == (2 if config.startswith("mamba2") else 1)
    assert isinstance(models[0], CausalHubertModel) == (model_name == "causal_hubert")
    with torch.no_grad():
        feats, _ = models[0].eval().extract_features(torch.randn(1, 16000))
    assert feats.shape == (1, 48, 128) and torch.isfinite(feats).all()  # 1 s through the stride-320 front-end


def test_resume_continues_from_checkpoint_last(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    train("mamba_hubert_tiny_cpu", tiny_data, run_dir, "optimization.max_update=3")
    log = train("mamba_hubert_tiny_cpu", tiny_data, run_dir, "optimization.max_update=5")
    assert re.search(r"Loaded checkpoint .*checkpoint_last\.pt \(epoch \d+ @ 3 updates\)", log), log[-2000:]
    assert "num_updates: 5 >= max_update: 5" in log
