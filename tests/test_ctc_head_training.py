"""The ASR variants of the paper's experiment through plain fairseq-hydra-train: fine-tuning with
each extra-module type, and from scratch (no pre-trained weights); reload with fairseq's loader;
stage 08 decoding of a head checkpoint."""
import json
import subprocess

import pytest
import torch
from fairseq import checkpoint_utils

from conftest import REPO, subprocess_env, write_tiny_dataset
from test_ctc_head import add_letter_targets
from test_layer_mi import write_checkpoint
from test_pipeline import stage
from test_training import train_losses

UPDATES = 12
OVERFIT = [f"optimization.max_update={UPDATES}", "common.log_format=json", "common.log_interval=1",
           "model.apply_mask=false", "model.dropout=0.0",
           "lr_scheduler.phase_ratio=[0.1,0.8,0.1]", "checkpoint.save_interval_updates=1000"]


@pytest.fixture(scope="module")
def one_batch(tmp_path_factory):
    """Two training utterances (one batch) with letter targets, and a random-init checkpoint."""
    root = add_letter_targets(write_tiny_dataset(tmp_path_factory.mktemp("ft_batch"), n_train=2, n_valid=1, seed=3))
    (root / "test.tsv").write_text((root / "valid.tsv").read_text())
    (root / "test.ltr").write_text((root / "valid.ltr").read_text())
    return root, write_checkpoint(root / "pt.pt", "mamba_hubert", root)


def finetune(data, ckpt, out, config, *extra):
    """07_finetune.sh as the demo runs it; returns the run's per-update losses."""
    cmd = ["bash", str(REPO / "run_scripts" / "07_finetune.sh"), "mamba_hubert", ckpt, data, out, *OVERFIT, *extra]
    p = subprocess.run(list(map(str, cmd)), cwd=REPO, env={**subprocess_env(), "CONFIG": config},
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    return train_losses((out / "train.log").read_text())


_RUNS = {}


def head_run(head_type, one_batch, tmp_path_factory):
    """Fine-tune with a one-layer head of head_type (once per module); (run dir, losses)."""
    if head_type not in _RUNS:
        data, ckpt = one_batch
        out = tmp_path_factory.mktemp(f"head_{head_type}")
        _RUNS[head_type] = out, finetune(data, ckpt, out, "head_tiny_cpu", f"model.head_type={head_type}",
                                         "model.head_dropout=0.0")
    return _RUNS[head_type]


@pytest.mark.parametrize("head_type", ["conformer", "transformer", "bimamba"])
def test_each_head_trains_and_reloads(head_type, one_batch, tmp_path_factory):
    out, losses = head_run(head_type, one_batch, tmp_path_factory)
    assert len(losses) == UPDATES and sum(losses[-3:]) < 0.7 * sum(losses[:3]), losses
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([str(out / "checkpoints" / "checkpoint_last.pt")])
    assert cfg.model._name == "hubert_ctc_head" and cfg.model.head_type == head_type
    assert len(models[0].w2v_encoder.head) == 1


def test_from_scratch_does_not_load_the_pretrained_weights(one_batch, tmp_path):
    data, ckpt = one_batch
    losses = finetune(data, ckpt, tmp_path / "scratch", "mamba_hubert_tiny_cpu", "model.no_pretrained_weights=true")
    assert len(losses) == UPDATES and sum(losses[-3:]) < 0.7 * sum(losses[:3]), losses
    models, cfg, _ = checkpoint_utils.load_model_ensemble_and_task(
        [str(tmp_path / "scratch" / "checkpoints" / "checkpoint_last.pt")])
    assert cfg.model._name == "hubert_ctc" and cfg.model.no_pretrained_weights
    pre = torch.load(ckpt, map_location="cpu", weights_only=False)["model"]
    key = "encoder.layers.0.fc1.weight"
    assert pre[key].shape == models[0].w2v_encoder.w2v_model.state_dict()[key].shape
    # a few updates move weights by ~1e-2 at most: a loaded copy stays correlated with the pre-trained
    # values (> 0.9), a fresh draw does not
    after = models[0].w2v_encoder.w2v_model.state_dict()[key].flatten()
    corr = torch.corrcoef(torch.stack([after, pre[key].flatten()]))[0, 1]
    assert abs(float(corr)) < 0.2, float(corr)


def test_stage_08_decodes_a_head_checkpoint(one_batch, tmp_path_factory, tmp_path):
    out, _ = head_run("conformer", one_batch, tmp_path_factory)
    stage("08_decode.sh", out / "checkpoints" / "checkpoint_last.pt", one_batch[0], "test", tmp_path / "dec")
    res = json.loads((tmp_path / "dec" / "test.json").read_text())
    assert res["utterances"] == 1 and res["wer"] >= 0 and res["lm"]["wer"] >= 0
    assert len((tmp_path / "dec" / "test.hyp").read_text().splitlines()) == 1
