"""Encode one long audio file to per-layer features in bounded memory.

    python -m fairseq_mamba.inference.encode_long MODEL AUDIO OUT_DIR [--layers 6 12 | all]
        [--chunk-frames 500] [--threads 1] [--seed 0] [--no-progress]

MODEL   a fairseq checkpoint (.pt) of ``mamba_hubert`` (any ``bimamba_type``) or stock ``hubert``,
        or a pretraining config (.yaml, e.g. examples/pretrain/mamba_hubert_base_librispeech.yaml)
        for a randomly initialised model (``--seed``), to measure time and memory.
AUDIO   16 kHz mono audio that soundfile reads (wav, flac, ...), of any length.
OUT_DIR gets ``layer{k}.npy`` (frames, dim) float32 for every layer asked for (default: all),
        each equal to ``model.extract_features(wav, output_layer=k)`` of a one-pass encoding,
        and ``info.json`` (frames, frame rate, seconds).

How it stays bounded: see ``fairseq_mamba.inference.long_form``. With a stock hubert model the encoder's
self-attention still runs over the whole sequence (time quadratic in the length).
"""
import argparse
import json
import os
import time

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from fairseq_mamba.inference.long_form import conv_geometry, iter_layer_features


def build_from_config(path, seed, **overrides):
    """(random-init model, task normalize) from a pretraining yaml (mamba_hubert or hubert);
    ``overrides`` replace model fields (e.g. bimamba_type="none")."""
    from fairseq.data import Dictionary
    from fairseq.models.hubert.hubert import HubertConfig, HubertModel
    from fairseq.tasks.hubert_pretraining import HubertPretrainingConfig

    from fairseq_mamba.models.causal_hubert import CausalHubertConfig, CausalHubertModel
    from fairseq_mamba.models.mamba_hubert import MambaHubertConfig, MambaHubertModel

    yaml = OmegaConf.to_container(OmegaConf.load(path))
    fields = {k: v for k, v in yaml["model"].items() if k != "_name" and v != "???"}
    fields.update(overrides)
    classes = {"mamba_hubert": (MambaHubertConfig, MambaHubertModel), "hubert": (HubertConfig, HubertModel),
               "causal_hubert": (CausalHubertConfig, CausalHubertModel)}
    name = yaml["model"].get("_name")
    if name not in classes:
        raise ValueError(f"{path}: model._name={name!r}; encode_long builds {sorted(classes)}")
    fields.setdefault("label_rate", 50)  # only sizes the (unused) prediction head
    cfg_cls, model_cls = classes[name]
    normalize = bool(yaml.get("task", {}).get("normalize", False))
    task_cfg = HubertPretrainingConfig(label_rate=fields["label_rate"], normalize=normalize)
    units = Dictionary()
    for i in range(100):
        units.add_symbol(str(i))
    torch.manual_seed(seed)
    return model_cls(cfg_cls(**fields), task_cfg, [units]), normalize


def load_model(path, seed=0):
    """(model in eval mode, whether the task layer-normalises the waveform)."""
    if path.endswith((".yaml", ".yml")):
        model, normalize = build_from_config(path, seed)
        return model.eval(), normalize
    from fairseq import checkpoint_utils

    models, _, task = checkpoint_utils.load_model_ensemble_and_task([path])
    return models[0].eval(), bool(getattr(task.cfg, "normalize", False))


def read_audio(path, sample_rate=16000):
    """(samples,) float32 tensor; ValueError if not mono at ``sample_rate``."""
    wav, sr = sf.read(path, dtype="float32", always_2d=True)
    if sr != sample_rate or wav.shape[1] != 1:
        raise ValueError(f"{path}: {sr} Hz, {wav.shape[1]} channel(s); encode_long needs "
                         f"{sample_rate} Hz mono (convert with e.g. sox IN -r {sample_rate} -c 1 OUT)")
    return torch.from_numpy(np.ascontiguousarray(wav[:, 0]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("audio")
    parser.add_argument("out_dir")
    parser.add_argument("--layers", nargs="+", default=["all"], help="1-based layers, or 'all'")
    parser.add_argument("--chunk-frames", type=int, default=500, help="frames per chunk (20 ms each)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed for a .yaml MODEL")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.time()
    model, normalize = load_model(args.model, args.seed)
    n_layers = len(model.encoder.layers)
    layers = list(range(1, n_layers + 1)) if args.layers == ["all"] else [int(k) for k in args.layers]
    wav = read_audio(args.audio)
    if normalize:  # as fairseq's dataset and feature reader do, over the whole waveform
        wav = F.layer_norm(wav, wav.shape)
    os.makedirs(args.out_dir, exist_ok=True)
    frames, encode_start, encode_cpu = 0, time.time(), time.process_time()
    for k, feats in iter_layer_features(model, wav, layers, args.chunk_frames, progress=not args.no_progress):
        np.save(os.path.join(args.out_dir, f"layer{k}.npy"), feats.numpy())
        frames = feats.shape[0]
    info = {
        "model": args.model, "audio": args.audio, "audio_seconds": wav.shape[0] / 16000,
        "frames": frames, "frame_rate_hz": 16000 / conv_geometry(model.feature_extractor)[1],
        "layers": sorted(set(layers)),
        "normalize": normalize, "seconds": round(time.time() - start, 2),
        "encode_seconds": round(time.time() - encode_start, 2),
        "encode_cpu_seconds": round(time.process_time() - encode_cpu, 2),
    }
    with open(os.path.join(args.out_dir, "info.json"), "w") as f:
        json.dump(info, f, indent=1)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
