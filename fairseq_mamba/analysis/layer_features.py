"""Every encoder layer's frames of a HuBERT-family checkpoint, and 100 Hz streams aligned to them.

Definitions (used by :mod:`.layer_mi` and its CSV/JSON):

* **layer 0** = the input of the first encoder layer: CNN features -> LayerNorm ->
  ``post_extract_proj`` -> + conv positional embedding -> the encoder's LayerNorm (post-norm
  models, as HuBERT Base and the tiny configs), i.e. fairseq's "features before the first
  layer"; **layer k** (1..L) = the output of encoder layer k (fairseq's ``layer_results[k-1]``),
  before the final encoder LayerNorm that pre-norm (``layer_norm_first``) models apply.
  Both are captured with forward hooks in one ``extract_features`` pass per batch. A
  ``hubert_ctc_head`` model adds its head layers 1..H after the encoder layers it feeds them
  (its ``w2v_encoder.layer_outputs``); fine-tuned, from-scratch and enhancer models are read at
  the HuBERT-family encoder inside them (:func:`encoder_model`).
* **valid frames**: utterance i of S samples has exactly the conv stack's output length
  ``n_i`` (floor((S - kernel) / stride) + 1 per conv layer) frames; frames beyond it in a padded
  batch are dropped.
* **alignment**: model frame j covers samples ``[stride*j, stride*j + receptive)`` (400 and 320
  for HuBERT's conv stack: 25 ms windows every 20 ms) and its centre is ``c_j = stride*j +
  receptive/2``. A 100 Hz stream whose frame i covers ``[hop*i, hop*i + win)`` (hop 160) has
  ``1 + (S - win) // hop`` frames for S samples and gives model frame j its frame whose centre
  is nearest ``c_j``: ``i = floor((c_j - win/2) / hop + 1/2)``. Windows: 400 (25 ms) for Kaldi
  MFCC and for k-means units of MFCC (``UNIT_WIN``: a unit is its MFCC frame's cluster), 160 for
  the corpus's phone labels (frame i = samples ``[160 i, 160 i + 160)``). For HuBERT's stack
  that is MFCC/unit frame 2j (the very same 25 ms window, and the frame HuBERT itself trains
  frame j to predict) and phone frame 2j+1 (the 10 ms frame holding the centre). Labels at the
  model's own rate (iteration-2 units) are used frame for frame. A stream whose length is not
  that of the audio (more than ``TOLERANCE`` frames off) is an error naming the file, line and
  utterance.
"""
from __future__ import annotations

import math
import os
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fairseq_mamba.checks import data_checks

TOLERANCE = 2  # frames a stream may be short (or long) of the audio's length before it is an error
HOP = 160  # samples per 100 Hz frame
MFCC_WIN = 400  # Kaldi MFCC window (25 ms), upstream's dump_mfcc_feature.py defaults
MFCC_DIM = 39  # 13 MFCC + deltas + delta-deltas
UNIT_WIN = MFCC_WIN  # k-means units of MFCC frames (run_scripts 02-04) share the MFCC window
PHONE_WIN = 160  # the bundled corpus's phone labels: one per 10 ms frame


@dataclass
class Utterance:
    """One manifest row: ``line`` is its 1-based line in the manifest (the root is line 1), ``row``
    its 0-based index among the utterance lines (= its line in a label file)."""

    path: str
    n_samples: int
    line: int
    row: int

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


def read_manifest(tsv: str, sample_rate: int = 16000) -> List[Utterance]:
    """A fairseq manifest's utterances, after :mod:`fairseq_mamba.checks.data_checks` has checked every
    audio file (exists, mono, ``sample_rate``, the listed sample count, decodes, finite): a bad
    line is a DataError naming it and the fix, or is dropped under FAIRSEQ_MAMBA_BAD_LINES=skip."""
    manifest = data_checks.read_manifest(tsv)
    if not manifest.entries:
        raise data_checks.DataError(f"{tsv} lists no utterances.\n  Fix: build it with run_scripts/01_manifests.sh")
    bad = data_checks.settle(data_checks.check_audio(manifest, sample_rate), tsv)
    return [Utterance(manifest.audio_path(e), e.samples, e.line, row) for row, e in enumerate(manifest.entries)
            if e.line not in bad]


@dataclass
class FrameGeometry:
    """The conv feature extractor's (kernel, stride) per layer, receptive field and total stride."""

    convs: Tuple[Tuple[int, int], ...]

    @classmethod
    def of(cls, model: nn.Module) -> "FrameGeometry":
        """Of any model :func:`encoder_model` reads."""
        model = encoder_model(model)
        convs = tuple((m.kernel_size[0], m.stride[0]) for m in model.feature_extractor.modules()
                      if isinstance(m, nn.Conv1d))
        if not convs:
            raise ValueError(f"{type(model).__name__}.feature_extractor has no Conv1d layers")
        return cls(convs)

    @property
    def stride(self) -> int:
        return math.prod(s for _, s in self.convs)

    @property
    def receptive(self) -> int:
        field, jump = 1, 1
        for kernel, stride in self.convs:
            field, jump = field + (kernel - 1) * jump, jump * stride
        return field

    @property
    def rate(self) -> float:
        return 16000 / self.stride

    def n_frames(self, n_samples: int) -> int:
        n = n_samples
        for kernel, stride in self.convs:
            n = (n - kernel) // stride + 1
        return max(0, n)

    def stream_index(self, n_model: int, win: int) -> np.ndarray:
        """(n_model,) index of the 100 Hz frame (hop 160, window ``win``) nearest each model frame centre."""
        centres = self.stride * np.arange(n_model) + self.receptive / 2
        return np.floor((centres - win / 2) / HOP + 0.5).astype(np.int64).clip(min=0)


def expected_frames(n_samples: int, win: int) -> int:
    """Frames of a 100 Hz stream (hop 160, window ``win``) over n_samples: 1 + (S - win) // 160."""
    return max(0, 1 + (n_samples - win) // HOP)


def align(stream: np.ndarray, geometry: FrameGeometry, n_samples: int, win: int, where: str) -> np.ndarray:
    """(T100, ...) 100 Hz stream of one utterance -> (n_model, ...) rows at the model's frames.

    The stream must have ``expected_frames(n_samples, win)`` frames (within ``TOLERANCE``), else
    ValueError naming ``where`` (file, line, utterance)."""
    expected = expected_frames(n_samples, win)
    if abs(len(stream) - expected) > TOLERANCE:
        raise ValueError(f"{where}: {len(stream)} frames, but {n_samples} samples give {expected} frames at 100 Hz "
                         f"({win}-sample windows); the stream does not belong to this audio - regenerate it "
                         "from the same manifest (run_scripts/02_mfcc_features.sh .. 04_labels.sh) or fix the manifest")
    idx = geometry.stream_index(geometry.n_frames(n_samples), win)
    return stream[idx.clip(max=len(stream) - 1)]


def read_labels(path: str, utts: Sequence[Utterance], geometry: FrameGeometry, win: int) -> List[np.ndarray]:
    """Frame labels, one line per manifest row in manifest order (a longer file is allowed, as
    for a manifest of its first rows) -> per utterance (n_model_frames,) int64 ids.

    Symbols (k-means ids or phone names) get ids in order of first appearance. The rate is
    decided once per file from its total length: 100 Hz (windows of ``win`` samples, aligned
    as the module doc says) or the model's own frame rate (used frame for frame). A line whose
    length does not fit its utterance is a ValueError naming the file, line and utterance."""
    if not os.path.isfile(path):
        raise ValueError(f"label file {path} does not exist")
    with open(path) as f:
        lines = [line.split() for line in f]
    if len(lines) <= utts[-1].row:
        raise ValueError(f"{path} has {len(lines)} lines for {utts[-1].row + 1} manifest rows; "
                         "it must have one line of labels per utterance, in manifest order")
    lines = [lines[u.row] for u in utts]
    total, secs = sum(len(t) for t in lines), sum(u.n_samples for u in utts) / 16000
    at_100 = abs(total / secs - 100) <= abs(total / secs - geometry.rate)
    ids: Dict[str, int] = {}
    out = []
    for tokens, utt in zip(lines, utts):
        where = f"{path} line {utt.row + 1} ({utt.name}, manifest line {utt.line})"
        labels = np.array([ids.setdefault(t, len(ids)) for t in tokens], dtype=np.int64)
        if at_100:
            out.append(align(labels, geometry, utt.n_samples, win, where))
            continue
        n_model = geometry.n_frames(utt.n_samples)
        if abs(len(labels) - n_model) > TOLERANCE or not len(labels):
            raise ValueError(f"{where}: {len(labels)} labels, but the model has {n_model} frames "
                             f"({geometry.rate:g} Hz) for {utt.n_samples} samples; the labels do not belong "
                             "to this audio - regenerate them from the same manifest")
        out.append(np.pad(labels, (0, max(0, n_model - len(labels))), mode="edge")[:n_model])
    return out


def mfcc_reader():
    """fairseq's own ``MfccFeatureReader`` (examples/hubert/simple_kmeans/dump_mfcc_feature.py,
    the iteration-1 features: 13 Kaldi MFCC + deltas + delta-deltas, 100 Hz, 25 ms windows)."""
    from fairseq_mamba.fairseq_fixes.upstream import patch_torchaudio, simple_kmeans_dir

    patch_torchaudio()
    if simple_kmeans_dir() not in sys.path:
        sys.path.insert(0, simple_kmeans_dir())
    from dump_mfcc_feature import MfccFeatureReader

    return MfccFeatureReader(16000)


def read_mfcc(utts: Sequence[Utterance], geometry: FrameGeometry) -> List[np.ndarray]:
    """Per utterance (n_model_frames, 39) float32 MFCC: the frame with the same window as each model frame."""
    reader = mfcc_reader()
    return [align(reader.get_feats(u.path).numpy(), geometry, u.n_samples, MFCC_WIN,
                  f"MFCC of {u.path} (manifest line {u.line})") for u in utts]


def kmeans_units(km_path: str, mfcc: Sequence[np.ndarray]) -> List[np.ndarray]:
    """Per utterance (n,) int64 k-means units of (n, 39) MFCC rows, with fairseq's own
    ``ApplyKmeans`` (dump_km_label.py) and a k-means model from learn_kmeans.py on MFCC."""
    from fairseq_mamba.fairseq_fixes.upstream import simple_kmeans_dir

    if not os.path.isfile(km_path):
        raise ValueError(f"k-means model {km_path} does not exist (make it with run_scripts/03_kmeans.sh)")
    if simple_kmeans_dir() not in sys.path:
        sys.path.insert(0, simple_kmeans_dir())
    from dump_km_label import ApplyKmeans

    apply = ApplyKmeans(km_path)
    if apply.C_np.shape[0] != MFCC_DIM:
        raise ValueError(f"{km_path} clusters {apply.C_np.shape[0]}-d features, not {MFCC_DIM}-d MFCC; pass the "
                         "MFCC (iteration-1) k-means, or give the units as a label file with --units")
    return [apply(m.astype(np.float32)).astype(np.int64) for m in mfcc]


def read_audio(utt: Utterance, normalize: bool) -> Tensor:
    """(S,) float waveform as fairseq's HuBERT dataset reads it (layer-normed if the task says so).
    The file was checked by :func:`read_manifest`."""
    from fairseq.data.audio.audio_utils import get_features_or_waveform
    from fairseq_mamba.fairseq_fixes.upstream import patch_torchaudio

    patch_torchaudio()  # fairseq's reader imports torchaudio.sox_effects
    wav = torch.from_numpy(get_features_or_waveform(utt.path, need_waveform=True, use_sample_rate=16000)).float()
    return F.layer_norm(wav, wav.shape) if normalize else wav


def encoder_model(model: nn.Module) -> nn.Module:
    """The HuBERT-family model (``feature_extractor``, ``encoder``, ``extract_features``) inside a
    checkpoint's model: itself (pre-trained hubert / mamba_hubert), ``w2v_encoder.w2v_model``
    (hubert_ctc fine-tuned or from scratch, hubert_ctc_head) or ``encoder_model`` (hubert_enhancer)."""
    inner = model.w2v_encoder.w2v_model if hasattr(model, "w2v_encoder") else getattr(model, "encoder_model", model)
    if not all(hasattr(inner, a) for a in ("feature_extractor", "encoder", "extract_features")):
        raise ValueError(f"a {type(model).__name__} holds no HuBERT-family encoder; give a hubert, mamba_hubert, "
                         "hubert_ctc, hubert_ctc_head or hubert_enhancer checkpoint")
    return inner


def head_layers(model: nn.Module) -> int:
    """H: the layers a hubert_ctc_head model puts between its encoder and the CTC projection (0 otherwise)."""
    return len(getattr(getattr(model, "w2v_encoder", None), "head", None) or ())


def _placeholder_rows(state: Dict) -> Optional[int]:
    """Symbols of the single label dictionary the checkpoint's weights were built for (None: unknown):
    the pre-training label embeddings' rows, or the CTC projection's outputs; 4 specials included."""
    weights = state["model"]
    for key in ("label_embs_concat", "w2v_encoder.proj.weight"):
        if key in weights:
            return weights[key].shape[0]
    return None


def load_checkpoint(path: str):
    """(model in eval mode, model name, task normalize flag) via fairseq's checkpoint loading.

    Any checkpoint :func:`encoder_model` reads. fairseq's hubert_pretraining task reads
    ``dict.<label>.txt`` from the label_dir saved in the checkpoint, which rarely exists where the
    checkpoint is analysed (a released HuBERT, a moved run). The labels play no part here, so when
    a dictionary is missing the task reads a placeholder one, as many symbols as the checkpoint's
    label embeddings (pre-trained) or CTC projection (fine-tuned) have rows."""
    import fairseq_mamba  # noqa: F401  (registers our models and task; weights_only allow-list)
    from fairseq import checkpoint_utils
    from omegaconf import open_dict

    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path} does not exist")
    state = checkpoint_utils.load_checkpoint_to_cpu(path)
    task_cfg = state["cfg"].task
    with tempfile.TemporaryDirectory() as placeholder:
        label_dir = task_cfg.get("label_dir") or task_cfg.get("data")
        labels = list(task_cfg.get("labels") or [])
        if labels and not all(os.path.isfile(f"{label_dir}/dict.{label}.txt") for label in labels):
            rows = _placeholder_rows(state)
            if rows is None or len(labels) != 1:
                raise ValueError(f"checkpoint {path}: its task needs dict.{'/'.join(labels)}.txt in {label_dir}, "
                                 "which is missing; copy the dictionaries there")
            with open(os.path.join(placeholder, f"dict.{labels[0]}.txt"), "w") as f:
                f.writelines(f"placeholder{i} 1\n" for i in range(rows - 4))  # + 4 specials
            with open_dict(task_cfg):
                task_cfg.label_dir = placeholder
        models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([path], state=state)
    model = models[0].eval()
    try:
        encoder_model(model)
    except ValueError as err:
        raise ValueError(f"checkpoint {path} holds a {cfg.model._name} model: {err}") from None
    return model, cfg.model._name, bool(getattr(task.cfg, "normalize", False))


def batch_consistent(model: nn.Module) -> bool:
    """False for conv stacks with a GroupNorm (``extractor_mode=default``, HuBERT Base): it
    normalises over the whole padded time axis, so padding changes every frame."""
    return not any(isinstance(m, nn.GroupNorm) for m in encoder_model(model).feature_extractor.modules())


@contextmanager
def exact_frame_mask(model: nn.Module, geometry: FrameGeometry):
    """Within the block, ``model.forward_padding_mask`` gives the exact conv output lengths.

    Stock HubertModel marks a frame valid when any sample of its stride window is, so a padded
    batch would let the last, partly padded frame into attention; mamba_hubert already counts
    exactly (this is the same rule for every model). Shadows the method on the instance only."""
    def forward_padding_mask(features: Tensor, padding_mask: Tensor) -> Tensor:
        lengths = torch.tensor([geometry.n_frames(int(n)) for n in (~padding_mask).sum(-1)])
        return torch.arange(features.size(1))[None, :] >= lengths[:, None]

    model.forward_padding_mask = forward_padding_mask
    try:
        yield
    finally:
        del model.forward_padding_mask


def _batches(lengths: Sequence[int], batch_seconds: float) -> List[List[int]]:
    """Utterance indices in length order, grouped while the padded batch holds <= batch_seconds of audio."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: List[List[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[i] <= batch_seconds * 16000:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


@contextmanager
def layer_forward(model: nn.Module):
    """Within the block, a function (source (B, S), padding_mask (B, S) or None) -> [layer 0, ...,
    layer L, head layer 1, ..., head layer H], each (B, T, C), T = the batch's conv frames.

    A model with ``w2v_encoder.layer_outputs`` (hubert_ctc_head: the encoder layers it feeds the
    head, then the head's) gives them itself; for every other model forward hooks capture the
    encoder layers' inputs and outputs of one ``extract_features`` pass. Either way the
    encoder's frame mask is exact (:func:`exact_frame_mask`)."""
    inner = encoder_model(model)
    owner = getattr(model, "w2v_encoder", None)
    with exact_frame_mask(inner, FrameGeometry.of(inner)):
        if hasattr(owner, "layer_outputs"):
            yield lambda source, pad: list(owner.layer_outputs(source, pad)[0])
            return
        layers = inner.encoder.layers
        captured: List[Tensor] = []
        hooks = [layers[0].register_forward_pre_hook(lambda mod, args: captured.append(args[0]))]
        hooks += [layer.register_forward_hook(lambda mod, args, out: captured.append(out[0])) for layer in layers]

        def forward(source: Tensor, pad: Optional[Tensor]) -> List[Tensor]:
            captured.clear()
            inner.extract_features(source, padding_mask=pad, mask=False)
            if len(captured) != len(layers) + 1:
                raise RuntimeError(f"captured {len(captured)} layer outputs for {len(layers)} layers (layerdrop?)")
            return [h.transpose(0, 1) for h in captured]  # T x B x C -> B x T x C

        try:
            yield forward
        finally:
            for h in hooks:
                h.remove()


@torch.no_grad()
def extract_layers(model: nn.Module, waves: Sequence[Tensor], keep: Optional[Sequence[np.ndarray]] = None,
                   batch_seconds: float = 0.0, progress: Optional[Callable[[int], None]] = None) -> List[Tensor]:
    """[layer 0, layer 1, ..., layer L, head layer 1, ..., head layer H], each (N, D) float32:
    every utterance's valid frames, in utterance order (utterance i contributes its ``keep[i]``
    frame indices, default all ``n_frames(len(waves[i]))``). ``model``: any model
    :func:`encoder_model` reads (:func:`layer_forward` says which layers); H = :func:`head_layers`.

    waves: 1-D float tensors. Utterances are batched in length order up to ``batch_seconds`` of
    padded audio per batch (0: one utterance per forward, no padding at all); padded batches
    give each utterance its solo features (exact frame mask; models whose conv stack has a
    GroupNorm always run solo). ``progress(n_done_utterances)`` is called after each batch."""
    geometry = FrameGeometry.of(model)
    if not batch_consistent(model):
        batch_seconds = 0.0
    per_utt: List[Optional[List[Tensor]]] = [None] * len(waves)
    with layer_forward(model) as forward:
        for batch in _batches([len(w) for w in waves], batch_seconds):
            source = torch.zeros(len(batch), max(len(waves[i]) for i in batch))
            pad = torch.ones(source.shape, dtype=torch.bool)
            for b, i in enumerate(batch):
                source[b, :len(waves[i])], pad[b, :len(waves[i])] = waves[i], False
            outputs = forward(source, pad if pad.any() else None)
            for b, i in enumerate(batch):
                n = geometry.n_frames(len(waves[i]))
                rows = torch.as_tensor(keep[i]) if keep is not None else torch.arange(n)
                per_utt[i] = [h[b, :n][rows].float() for h in outputs]
            if progress is not None:
                progress(sum(p is not None for p in per_utt))
    return [torch.cat([u[k] for u in per_utt]) for k in range(len(per_utt[0]))]  # type: ignore[index]
