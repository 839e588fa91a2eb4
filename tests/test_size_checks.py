"""Every size limit fairseq enforces late (or never) stops training before the first update with
one DataError naming the file, the manifest line, the limit and the fix (issue #16, point 2):
min_sample_size, max_sample_size with sequence labels, max_tokens, the conv stack's receptive
field, CTC targets longer than their frames. FAIRSEQ_MAMBA_BAD_LINES=skip drops those lines.

In-process on fairseq's own HubertPretrainingTask and HubertDataset (the tiny dataset: 6 train
utterances of 14034-22462 samples), then two real fairseq-hydra-train starts: pre-training that
skips an over-long and an under-short line, and fine-tuning from its checkpoint that stops on a
transcript CTC cannot fit (found in the validation set, which fairseq would batch only at the first
validation: it is checked before the first update too).
"""

import numpy as np
import pytest
import soundfile as sf
import torch

from fairseq.models.wav2vec.wav2vec2 import ConvFeatureExtractionModel
from fairseq.tasks.hubert_pretraining import HubertPretrainingConfig, HubertPretrainingTask
import fairseq_mamba  # noqa: F401  (installs the checks)
from fairseq_mamba.checks.data_checks import BAD_LINES_ENV, DataError
from fairseq_mamba.checks.size_checks import conv_layers, ctc_min_frames, frames, receptive_field

from conftest import BIN, REPO, write_tiny_dataset
from test_bad_inputs import run, train

TINY_CONV = [(32, 10, 5), (64, 8, 4), (128, 4, 4), (128, 4, 2), (128, 4, 2)]  # the tiny configs'
BASE_CONV = [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2  # HuBERT Base


@pytest.mark.parametrize("layers", [TINY_CONV, BASE_CONV], ids=["tiny", "base"])
def test_frames_and_receptive_field_match_fairseqs_conv_stack(layers):
    extractor = ConvFeatureExtractionModel(layers, mode="layer_norm")
    conv = [(k, s) for _, k, s in layers]
    field = receptive_field(conv)
    assert field == (825 if layers is TINY_CONV else 400)
    for n in (field, field + 1, 1000, 16000, 16321):
        with torch.no_grad():
            assert extractor(torch.zeros(1, n)).shape[-1] == frames(n, conv), n
    assert frames(field - 1, conv) == 0 and frames(0, conv) == 0
    model = torch.nn.Sequential(extractor)
    assert conv_layers(model) == conv


def test_ctc_needs_a_blank_between_repeats():
    assert ctc_min_frames([]) == 0
    assert ctc_min_frames([5, 6, 7]) == 3
    assert ctc_min_frames([5, 5, 6, 6, 6]) == 5 + 3


def task_with(root, split="train", conv=TINY_CONV, **overrides):
    """HubertPretrainingTask over ``root`` with ``split`` loaded (checked) and the conv stack set."""
    cfg = HubertPretrainingConfig(data=str(root), label_dir=str(root), labels=["km"], label_rate=100.0,
                                  sample_rate=16000, **overrides)
    task = HubertPretrainingTask.setup_task(cfg)
    task.load_dataset(split)
    task.fairseq_mamba_conv = [(k, s) for _, k, s in conv]  # what build_model records
    return task


def batches(task, max_tokens, split="train"):
    return task.get_batch_iterator(dataset=task.datasets[split], max_tokens=max_tokens)


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    monkeypatch.delenv(BAD_LINES_ENV, raising=False)
    return write_tiny_dataset(tmp_path / "data")


def test_an_utterance_over_max_tokens_is_named_not_asserted(tiny, monkeypatch):
    task = task_with(tiny, max_sample_size=None)
    with pytest.raises(DataError) as err:
        batches(task, 20000)
    message = str(err.value)
    assert message.startswith(f"{tiny / 'train.tsv'} line 2: {tiny}/wav/train0.wav is 22207 samples (1.39 s), "
                              "over dataset.max_tokens=20000 (1.25 s)")
    assert "Fix: raise dataset.max_tokens to at least 22207, or split the file" in message
    assert "line 4: " in message and BAD_LINES_ENV in message  # train2: 22462 samples
    # pre-training crops to max_sample_size (its frame labels crop with it): then it fits
    batches(task_with(tiny, max_sample_size=16000), 20000)
    monkeypatch.setenv(BAD_LINES_ENV, "skip")
    task = task_with(tiny, max_sample_size=None)
    itr = batches(task, 20000)
    assert task.datasets["train"].manifest_lines == [3, 5, 6, 7] and len(task.datasets["train"]) == 4
    assert sum(len(b["id"]) for b in itr.next_epoch_itr(shuffle=False)) == 4


def test_an_utterance_under_min_sample_size_is_named_not_dropped_silently(tiny, monkeypatch):
    with pytest.raises(DataError, match=r"(?s)train.tsv line 5: .*train3.wav is 14034 samples \(0.88 s\), under "
                                        r"task.min_sample_size=15000: fairseq would leave it out.*"
                                        r"Fix: lower task.min_sample_size to 14034 or less"):
        task_with(tiny, min_sample_size=15000)
    monkeypatch.setenv(BAD_LINES_ENV, "skip")
    assert task_with(tiny, min_sample_size=15000).datasets["train"].manifest_lines == [2, 3, 4, 6, 7]


def letters_dataset(root, texts, lengths):
    """A fine-tuning split: ``lengths`` samples of noise, ``texts`` as .ltr letters, dict.ltr.txt."""
    (root / "wav").mkdir(parents=True)
    rows, rng = [str(root)], np.random.default_rng(0)
    for i, n in enumerate(lengths):
        sf.write(root / "wav" / f"u{i}.wav", (0.1 * rng.standard_normal(n)).astype(np.float32), 16000)
        rows.append(f"wav/u{i}.wav\t{n}")
    ltr = [" ".join(t.replace(" ", "|")) + " |" for t in texts]
    for split in ("train", "valid"):
        (root / f"{split}.tsv").write_text("\n".join(rows) + "\n")
        (root / f"{split}.ltr").write_text("\n".join(ltr) + "\n")
    (root / "dict.ltr.txt").write_text("".join(f"{c} 1\n" for c in "|ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    return root


def ft_task(root, **overrides):
    cfg = HubertPretrainingConfig(data=str(root), label_dir=str(root), labels=["ltr"], fine_tuning=True,
                                  single_target=True, **overrides)
    task = HubertPretrainingTask.setup_task(cfg)
    task.load_dataset("train")
    task.fairseq_mamba_conv = [(k, s) for _, k, s in TINY_CONV]
    return task


FT_FAULTS = {  # what, (texts, lengths) of 3 utterances with the fault in the second, message
    "ctc_too_long": (["AB", "A LONG TRANSCRIPT FOR A SHORT SOUND", "CD"], [16000, 4000, 16000],
                     r"train.tsv line 3: .*u1.wav has a transcript that needs 36 CTC frames \(labels, and a blank "
                     r"between repeats\) but its 4000 samples \(0.25 s\) give 10 frames \(stride 320\).*"
                     r"Fix: check that the transcript belongs to this audio"),
    "under_receptive_field": (["AB", "A", "CD"], [16000, 800, 16000],
                              r"line 3: .*u1.wav is 800 samples \(0.05 s\), shorter than the 825-sample "
                              r"receptive field of model.conv_feature_layers: it gives no frame"),
    "over_max_sample_size": (["AB", "CD", "EF"], [16000, 40000, 16000],
                             r"line 3: .*u1.wav is 40000 samples \(2.50 s\), over task.max_sample_size=32000: "
                             r"fine-tuning would crop its audio and keep its whole transcript.*Fix: raise "
                             r"task.max_sample_size to at least 40000"),
}


@pytest.mark.parametrize("fault", sorted(FT_FAULTS))
def test_fine_tuning_limits_are_named(fault, tmp_path, monkeypatch):
    texts, lengths, expected = FT_FAULTS[fault]
    root = letters_dataset(tmp_path / "ft", texts, lengths)
    monkeypatch.delenv(BAD_LINES_ENV, raising=False)
    with pytest.raises(DataError, match=f"(?s){expected}"):
        batches(ft_task(root, max_sample_size=32000), 100000)
    monkeypatch.setenv(BAD_LINES_ENV, "skip")
    task = ft_task(root, max_sample_size=32000)
    batches(task, 100000)
    assert task.datasets["train"].manifest_lines == [2, 4]


def test_fine_tuning_over_max_tokens_is_named(tmp_path, monkeypatch):
    monkeypatch.delenv(BAD_LINES_ENV, raising=False)
    root = letters_dataset(tmp_path / "ft", ["AB", "CD", "EF"], [16000, 40000, 16000])
    task = ft_task(root, pad_audio=True)
    with pytest.raises(DataError, match=r"(?s)line 3: .*u1.wav is 40000 samples \(2.50 s\), over dataset.max_tokens="
                                        r"32000 \(2.00 s\).*Fix: raise dataset.max_tokens to at least 40000"):
        batches(task, 32000)
    batches(task, 40000)


def test_ctc_repeats_count(tmp_path, monkeypatch):
    """ "AAAA" needs 4 labels + 3 blanks + '|' = 8 frames: 3065 samples (825 + 7 x 320) give 8, 3064 give 7."""
    monkeypatch.delenv(BAD_LINES_ENV, raising=False)
    assert frames(3065, [(k, s) for _, k, s in TINY_CONV]) == 8
    batches(ft_task(letters_dataset(tmp_path / "ok", ["AAAA"], [3065])), None)
    with pytest.raises(DataError, match="needs 8 CTC frames"):
        batches(ft_task(letters_dataset(tmp_path / "short", ["AAAA"], [3064])), None)


def test_build_model_records_the_conv_stack(tiny):
    from omegaconf import OmegaConf

    from fairseq_mamba.models import MambaHubertConfig

    yaml = OmegaConf.load(REPO / "examples" / "pretrain" / "mamba_hubert_tiny_cpu.yaml")
    task = task_with(tiny, conv=[])
    task.build_model(OmegaConf.merge(OmegaConf.structured(MambaHubertConfig), yaml.model))
    assert task.fairseq_mamba_conv == [(k, s) for _, k, s in TINY_CONV]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """2 updates of mamba_hubert on the tiny dataset with an over-long (max_tokens) and an
    under-short (min_sample_size) utterance, skipped; -> (log, checkpoint)."""
    tmp = tmp_path_factory.mktemp("sizes")
    root = write_tiny_dataset(tmp / "data")
    rc, log = train("mamba_hubert_tiny_cpu", root, tmp / "run", "optimization.max_update=2",
                    "task.max_sample_size=null", "dataset.max_tokens=22300", "task.min_sample_size=14500",
                    env={BAD_LINES_ENV: "skip"})
    assert rc == 0, log[-3000:]
    return log, tmp / "run" / "checkpoints" / "checkpoint_last.pt"


def test_pretraining_skips_size_faults_when_asked(pretrained):
    log, checkpoint = pretrained
    assert "skipping 1 bad line(s)" in log and "train3.wav is 14034 samples (0.88 s), under task.min_sample_size" in log
    assert "train2.wav is 22462 samples (1.40 s), over dataset.max_tokens=22300" in log
    assert "done training" in log and checkpoint.exists()


def test_fine_tuning_stops_before_the_first_update(pretrained, tmp_path):
    _, checkpoint = pretrained
    texts, lengths, _ = FT_FAULTS["ctc_too_long"]
    root = letters_dataset(tmp_path / "ft", texts, lengths)
    rc, log = run([BIN / "fairseq-hydra-train", "--config-dir", "examples/finetune", "--config-name",
                   "mamba_hubert_tiny_cpu", f"task.data={root}", f"task.label_dir={root}",
                   f"model.w2v_path={checkpoint}", "common.user_dir=fairseq_mamba", f"hydra.run.dir={tmp_path / 'run'}",
                   "optimization.max_update=2"])
    assert rc != 0
    assert "DataError: " in log and "valid.tsv line 3: " in log and "needs 36 CTC frames" in log, log[-2000:]
    assert "Sentences lengths should not exceed" not in log and "train_inner" not in log
    assert not list((tmp_path / "run").rglob("checkpoint*.pt"))
