"""Size limits that fairseq enforces late, or never, checked before the first update.

Each limit below is checked per utterance and turned into a ``data_checks.Problem`` (file,
manifest line, the limit, the fix), then settled like every other data fault (``settle``: one
``DataError`` by default; ``FAIRSEQ_MAMBA_BAD_LINES=skip`` drops the lines, counted in the log).

Task limits, checked with the rest of the split (``data_checks.check_task_split``):

* ``task.min_sample_size``: fairseq's ``HubertDataset`` drops a shorter utterance with one count in
  its log, so a transcript or label line silently goes unused;
* ``task.max_sample_size`` with sequence labels (fine-tuning, ``label_rate: -1``): fairseq crops the
  audio to it and keeps the whole transcript, so the target no longer matches the audio.
  (Pre-training crops its frame labels with the audio, which is fine.)

Batch and model limits, checked by the task's ``get_batch_iterator`` (model built, ``max_tokens``
known), on fairseq's own sizes (``dataset.num_tokens``: capped at ``max_sample_size`` unless
``pad_audio``):

* ``dataset.max_tokens`` (``max_tokens_valid`` for validation): a longer utterance stops fairseq's
  batch sampler with a bare ``AssertionError: Sentences lengths should not exceed max_tokens``;
* the receptive field of the conv feature extractor (``model.conv_feature_layers``): a shorter
  utterance gives no frame;
* CTC (sequence labels): the utterance's frames must hold its target, one frame per label plus a
  blank between repeated labels; otherwise the loss is infinite, and ``zero_infinity`` hides it.
"""
import functools
import logging
from typing import List, Optional, Sequence, Tuple

from fairseq_mamba.checks import data_checks
from fairseq_mamba.checks.data_checks import Manifest, Problem

logger = logging.getLogger(__name__)

Conv = List[Tuple[int, int]]  # (kernel, stride) of each conv layer, input first


def conv_layers(model) -> Optional[Conv]:
    """(kernel, stride) of the conv feature extractor inside ``model`` (HubertModel, MambaHubertModel,
    HubertCtc), or None when it has none."""
    import torch.nn as nn
    from fairseq.models.wav2vec.wav2vec2 import ConvFeatureExtractionModel

    extractor = next((m for m in model.modules() if isinstance(m, ConvFeatureExtractionModel)), None)
    if extractor is None:
        return None
    return [(c.kernel_size[0], c.stride[0]) for c in extractor.modules() if isinstance(c, nn.Conv1d)]


def frames(samples: int, conv: Conv) -> int:
    """Frames the conv stack gives for ``samples`` input samples (no padding: floor((n - k) / s) + 1)."""
    for kernel, stride in conv:
        samples = (samples - kernel) // stride + 1 if samples >= kernel else 0
    return samples


def receptive_field(conv: Conv) -> int:
    """The fewest input samples that give one frame."""
    need = 1
    for kernel, stride in reversed(conv):
        need = (need - 1) * stride + kernel
    return need


def ctc_min_frames(target: Sequence[int]) -> int:
    """Frames CTC needs for ``target``: one per label, plus a blank between equal neighbours."""
    return len(target) + sum(a == b for a, b in zip(target, target[1:]))


def _seconds(samples: int, rate: int) -> str:
    return f"{samples} samples ({samples / rate:.2f} s)"


def task_problems(manifest: Manifest, cfg) -> List[Problem]:
    """Problems of the task's own size limits (``cfg``: HubertPretrainingConfig)."""
    problems = []
    sequence_labels = cfg.label_rate == -1
    if sequence_labels and not cfg.pad_audio:
        logger.warning("task.pad_audio=false with sequence labels: fairseq's HubertDataset crops every "
                       "batch to its shortest utterance and keeps the whole transcripts (fairseq PR "
                       "#3998, unmerged); task.pad_audio=true pads instead")
    for e in manifest.entries:
        where = lambda what, fix: Problem(manifest.path, e.line, manifest.audio_path(e), what, fix)  # noqa: E731
        if cfg.min_sample_size is not None and e.samples < cfg.min_sample_size:
            problems.append(where(f"is {_seconds(e.samples, cfg.sample_rate)}, under task.min_sample_size="
                                  f"{cfg.min_sample_size}: fairseq would leave it out without a word",
                                  f"lower task.min_sample_size to {e.samples} or less, or delete the line"))
        elif sequence_labels and cfg.max_sample_size is not None and e.samples > cfg.max_sample_size:
            problems.append(where(f"is {_seconds(e.samples, cfg.sample_rate)}, over task.max_sample_size="
                                  f"{cfg.max_sample_size}: fine-tuning would crop its audio and keep its whole "
                                  "transcript", f"raise task.max_sample_size to at least {e.samples} (and "
                                  "dataset.max_tokens with it), or split the file into shorter utterances"))
    return problems


def batch_problems(dataset, max_tokens: Optional[int], conv: Optional[Conv], which: str) -> List[Problem]:
    """Problems of a loaded HubertDataset (its ``manifest_lines`` set by data_checks) against
    ``max_tokens`` (named ``which`` in messages) and the model's conv stack ``conv``."""
    sequence_labels = dataset.label_rates[0] == -1.0
    rate, problems = int(dataset.sample_rate), []
    field = receptive_field(conv) if conv else 0
    stride = functools.reduce(lambda a, b: a * b, [s for _, s in conv]) if conv else 0
    for i, line in enumerate(dataset.manifest_lines):
        samples, tokens = dataset.sizes[i], dataset.num_tokens(i)
        where = lambda what, fix: Problem(dataset.manifest_path, line, f"{dataset.audio_root}/"  # noqa: E731
                                          f"{dataset.audio_names[i]}", what, fix)
        if max_tokens is not None and tokens > max_tokens:
            cropped = f", cropped to {tokens}" if tokens < samples else ""
            problems.append(where(f"is {_seconds(samples, rate)}{cropped}, over {which}="
                                  f"{max_tokens} ({max_tokens / rate:.2f} s): "
                                  "fairseq's batch sampler would stop ('Sentences lengths should not exceed "
                                  "max_tokens')", f"raise {which} to at least {tokens}, or split the file "
                                  "into shorter utterances"))
            continue
        if conv is None:
            continue
        used = min(samples, dataset.max_sample_size)
        if used < field:
            problems.append(where(f"is {_seconds(samples, rate)}, shorter than the {field}-sample receptive "
                                  "field of model.conv_feature_layers: it gives no frame",
                                  "delete the line, or join the recording to a neighbouring one"))
        elif sequence_labels:
            need, have = ctc_min_frames(dataset.get_label(i, 0).tolist()), frames(used, conv)
            if need > have:
                problems.append(where(f"has a transcript that needs {need} CTC frames (labels, and a blank "
                                      f"between repeats) but its {_seconds(used, rate)} give {have} frames "
                                      f"(stride {stride}): the CTC loss would be infinite", "check that the "
                                      "transcript belongs to this audio, or delete the line"))
    return problems


def check_dataset(task, dataset, max_tokens: Optional[int], which: str) -> None:
    """Settle ``batch_problems`` of a HubertDataset that data_checks loaded, once per ``max_tokens``;
    skipped lines are dropped from it."""
    from fairseq.data.audio.hubert_dataset import HubertDataset

    checked = getattr(dataset, "fairseq_mamba_sizes_checked", ())
    if not isinstance(dataset, HubertDataset) or not hasattr(dataset, "manifest_lines") or max_tokens in checked:
        return
    problems = batch_problems(dataset, max_tokens, getattr(task, "fairseq_mamba_conv", None), which)
    bad = data_checks.settle(problems, dataset.manifest_path)
    if bad:
        keep = [i for i, line in enumerate(dataset.manifest_lines) if line not in bad]
        data_checks.subset(dataset, keep, dataset.manifest_path)
    dataset.fairseq_mamba_sizes_checked = (*checked, max_tokens)


def install_size_checks() -> None:
    """Wrap fairseq: HubertPretrainingTask.build_model records the conv stack; its
    get_batch_iterator checks a dataset before batching it; Trainer.get_train_iterator checks the
    validation sets too (fairseq batches them only at the first validation, after updates)."""
    from fairseq.tasks.hubert_pretraining import HubertPretrainingTask
    from fairseq.trainer import Trainer

    build_model, get_batch_iterator = HubertPretrainingTask.build_model, HubertPretrainingTask.get_batch_iterator
    get_train_iterator = Trainer.get_train_iterator
    if getattr(get_batch_iterator, "_fairseq_mamba_checked", False):
        return

    @functools.wraps(build_model)
    def recording_build_model(self, *args, **kwargs):
        model = build_model(self, *args, **kwargs)
        self.fairseq_mamba_conv = conv_layers(model)
        return model

    @functools.wraps(get_batch_iterator)
    def checked_get_batch_iterator(self, dataset, *args, **kwargs):
        split = next((s for s, d in self.datasets.items() if d is dataset), None)
        which = "dataset.max_tokens" if split == "train" else "dataset.max_tokens_valid"
        check_dataset(self, dataset, kwargs.get("max_tokens", args[0] if args else None), which)
        return get_batch_iterator(self, dataset, *args, **kwargs)

    @functools.wraps(get_train_iterator)
    def checked_get_train_iterator(self, *args, **kwargs):
        for subset in self.cfg.dataset.valid_subset.split(","):
            if subset in self.task.datasets:
                check_dataset(self.task, self.task.datasets[subset], self.cfg.dataset.max_tokens_valid,
                              "dataset.max_tokens_valid")
        return get_train_iterator(self, *args, **kwargs)

    checked_get_batch_iterator._fairseq_mamba_checked = True
    HubertPretrainingTask.build_model = recording_build_model
    HubertPretrainingTask.get_batch_iterator = checked_get_batch_iterator
    Trainer.get_train_iterator = checked_get_train_iterator
