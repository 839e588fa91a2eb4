"""Run fairseq's own HuBERT ``simple_kmeans`` scripts with the fixes this environment needs.

Usage::

    python -m fairseq_mamba.fairseq_fixes.upstream <script> args...
    # e.g.
    python -m fairseq_mamba.fairseq_fixes.upstream dump_mfcc_feature <tsv_dir> train 1 0 <feat_dir>
    python -m fairseq_mamba.fairseq_fixes.upstream learn_kmeans <feat_dir> train 1 <km_path> 100 --percent -1
    python -m fairseq_mamba.fairseq_fixes.upstream dump_km_label <feat_dir> train <km_path> 1 0 <lab_dir>
    python -m fairseq_mamba.fairseq_fixes.upstream dump_hubert_feature <tsv_dir> train <ckpt> <layer> 1 0 <feat_dir>

``<script>`` names a file in ``fairseq/examples/hubert/simple_kmeans/`` of the *installed* fairseq
(no copies live in this repository).  It is run with :func:`runpy.run_path` as ``__main__``, with
its directory first on ``sys.path`` (the scripts ``from feature_utils import ...``) and
``sys.argv`` set to ``[script_path, *args]``.  ``<script>`` may also be ``fairseq-hydra-train``
(``python -m fairseq_mamba.fairseq_fixes.upstream fairseq-hydra-train --config-dir ... ``), which runs
fairseq's ``fairseq_cli.hydra_train.cli_main`` with the same fixes (fine-tuning needs fix 4).
Before that, these fixes are applied:

1. **torchaudio without its C++ extension.**  The torchaudio wheels that match torch 2.13 are not
   installable here; ``pip install --no-deps torchaudio==2.11.0`` gives a package whose pure-Python
   parts (``torchaudio.compliance.kaldi.mfcc``, ``torchaudio.functional.compute_deltas``, all that
   ``dump_mfcc_feature.py`` uses) work, but whose ``import torchaudio`` fails while loading the
   compiled ``_torchaudio`` library.  Only when a plain ``import torchaudio`` fails, a stub
   ``torchaudio._extension`` module (``_IS_TORCHAUDIO_EXT_AVAILABLE = False``,
   ``_IS_ALIGN_AVAILABLE = False``, ``fail_if_no_align`` = identity decorator) is put into
   ``sys.modules`` first, so the import skips the library.  A working torchaudio is used as is.

2. **``torchaudio.sox_effects`` is gone** from new torchaudio, but fairseq's
   ``data/audio/audio_utils.convert_waveform`` imports it on every audio read.  If it cannot be
   imported, a stub module is installed whose ``apply_effects_tensor`` raises a ``ValueError``
   explaining that audio must already be 16 kHz mono (and giving the ``sox`` command to convert
   it).  It is only called when resampling / down-mixing is actually needed.

3. **CPU-only machines.**  ``dump_hubert_feature.py`` calls ``.cuda()`` on the model and the
   input unconditionally.  When CUDA is not available, ``torch.nn.Module.cuda`` and
   ``torch.Tensor.cuda`` are replaced by no-ops (everything stays on the CPU).  With a GPU nothing
   is changed.

4. **fairseq 0.12's ``hubert_ctc`` cannot be built**: ``HubertEncoder.__init__`` reads
   ``cfg.autoregressive``, a field only ``HubertSeq2SeqConfig`` defines, so building
   ``hubert_ctc`` fails with ``Key 'autoregressive' not in 'HubertCtcConfig'``.  The registered
   dataclass of ``hubert_ctc`` is replaced by a subclass adding ``autoregressive: bool = False``
   (CTC is never autoregressive), used for both training and checkpoint loading.

5. **Multi-process training on CPU** (gloo): fairseq's ``distributed_utils.all_gather_list``
   (used to sum logging outputs of criteria that cannot be summed with all_reduce, e.g. HuBERT's)
   allocates ``torch.cuda.ByteTensor`` and pinned memory, so it fails on a CPU-only torch.  Without
   CUDA it is replaced by the same operation done with ``torch.distributed.all_gather_object``.
   (Start one process per rank with ``distributed_training.distributed_init_method=tcp://HOST:PORT
   distributed_training.distributed_rank=R distributed_training.distributed_no_spawn=true
   common.cpu=true distributed_training.distributed_backend=gloo``: fairseq's own spawn and
   torchrun paths divide by ``torch.cuda.device_count()``; see tests/test_distributed.py.)

6. **Our checkpoints.**  ``import fairseq_mamba`` registers the ``mamba_hubert`` model/criterion
   (so ``load_model_ensemble_and_task`` can rebuild a mamba_hubert checkpoint) and adds fairseq's
   config classes to torch's ``weights_only`` allow-list (torch >= 2.6 default).

7. **Inputs are checked before a script does any work** (``fairseq_mamba.checks.data_checks``): the
   feature dumps check the audio of their shard's manifest lines (``get_path_iterator`` is
   wrapped), ``learn_kmeans`` and ``dump_km_label`` the feature shards they read (and the k-means
   model's dimension). A bad line stops the script with one ``DataError`` naming the file, the
   manifest line and the fix.  With ``FAIRSEQ_MAMBA_BAD_LINES=skip`` a feature dump instead writes
   zero frames for each bad line (counted in the log), so features and labels stay line-aligned
   with the manifest and training (same setting) drops those lines.
"""
import importlib
import os
import runpy
import sys
import types

from fairseq_mamba.checks import data_checks

SOX_HELP = (
    "fairseq asked torchaudio.sox_effects to {what}, but sox effects are not available in this "
    "torchaudio. The audio must already be 16 kHz mono; convert it first, e.g.\n"
    "  sox in.wav -r 16000 -c 1 -b 16 out.wav      (or: ffmpeg -i in.wav -ar 16000 -ac 1 out.wav)"
)


def _apply_effects_tensor(tensor, sample_rate, effects, channels_first=True):
    raise ValueError(SOX_HELP.format(what=f"apply {effects} to {sample_rate} Hz audio"))


def _stub_sox_effects(torchaudio_mod=None):
    sox = types.ModuleType("torchaudio.sox_effects")
    sox.apply_effects_tensor = _apply_effects_tensor
    sox.__doc__ = "fairseq_mamba stub: sox effects are not available; audio must be 16 kHz mono."
    sys.modules["torchaudio.sox_effects"] = sox
    if torchaudio_mod is not None:
        torchaudio_mod.sox_effects = sox
    return sox


def patch_torchaudio():
    """Make ``import torchaudio`` and ``torchaudio.sox_effects`` importable (fixes 1 and 2).

    Returns the torchaudio module, or ``None`` when torchaudio is not installed at all.
    """
    try:
        import torchaudio  # noqa: F401
    except ImportError as err:
        if "No module named 'torchaudio'" in str(err):
            _stub_sox_effects()
            return None
        torchaudio = None
    except OSError:  # the compiled library cannot be loaded
        torchaudio = None
    if torchaudio is None:
        for name in [m for m in sys.modules if m == "torchaudio" or m.startswith("torchaudio.")]:
            del sys.modules[name]
        ext = types.ModuleType("torchaudio._extension")
        ext._IS_TORCHAUDIO_EXT_AVAILABLE = False
        ext._IS_ALIGN_AVAILABLE = False
        ext.fail_if_no_align = lambda f: f
        sys.modules["torchaudio._extension"] = ext
        torchaudio = importlib.import_module("torchaudio")
        torchaudio._extension = ext
    # Pure-Python parts the HuBERT scripts use; fail early if they cannot load.
    importlib.import_module("torchaudio.compliance.kaldi")
    importlib.import_module("torchaudio.functional")
    try:
        importlib.import_module("torchaudio.sox_effects")
    except Exception:
        _stub_sox_effects(torchaudio)
    return torchaudio


def patch_cuda_calls():
    """Fix 3: make ``.cuda()`` a no-op when CUDA is not available."""
    import torch

    if torch.cuda.is_available():
        return False
    torch.nn.Module.cuda = lambda self, device=None: self
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    return True


def patch_hubert_ctc():
    """Fix 4: give ``hubert_ctc``'s config the ``autoregressive`` field its encoder reads."""
    from dataclasses import dataclass, field, fields

    from fairseq.models import MODEL_DATACLASS_REGISTRY
    from fairseq.models.hubert import hubert_asr  # noqa: F401  (registers hubert_ctc)

    base = MODEL_DATACLASS_REGISTRY["hubert_ctc"]
    if "autoregressive" in {f.name for f in fields(base)}:
        return False

    @dataclass
    class HubertCtcConfig(base):
        autoregressive: bool = field(
            default=False, metadata={"help": "read by fairseq 0.12 HubertEncoder; CTC: always false"}
        )

    MODEL_DATACLASS_REGISTRY["hubert_ctc"] = HubertCtcConfig
    setattr(hubert_asr.HubertCtc, "__dataclass", HubertCtcConfig)
    return True


def patch_cpu_all_gather_list():
    """Fix 5: a CPU ``all_gather_list`` (fairseq's allocates CUDA tensors)."""
    import torch

    if torch.cuda.is_available():
        return False
    from fairseq.distributed import utils as distributed_utils

    if getattr(distributed_utils.all_gather_list, "_fairseq_mamba_cpu", False):
        return False

    def all_gather_list(data, group=None, max_size=16384):
        import torch.distributed as dist

        if group is None:
            group = distributed_utils.get_global_group()
        world = distributed_utils.get_world_size(group)
        out = [None] * world
        dist.all_gather_object(out, data, group=group)
        return out

    all_gather_list._fairseq_mamba_cpu = True
    distributed_utils.all_gather_list = all_gather_list
    return True


def simple_kmeans_dir():
    import fairseq

    d = os.path.join(os.path.dirname(fairseq.__file__), "examples", "hubert", "simple_kmeans")
    if not os.path.isdir(d):
        raise FileNotFoundError(f"fairseq's HuBERT simple_kmeans scripts are not at {d}")
    return d


def apply_all():
    patch_torchaudio()
    patch_cuda_calls()
    patch_hubert_ctc()
    patch_cpu_all_gather_list()
    import fairseq_mamba  # noqa: F401  (fix 6)


class _BadPath(str):
    """A manifest path whose line is skipped: the reader gives it zero frames."""


class _SkippingReader:
    """A simple_kmeans feature reader that returns (0, dim) features for ``_BadPath`` s."""

    def __init__(self, reader, generator):
        self.reader, self.generator, self.dim = reader, generator, None

    def get_feats(self, path, ref_len=None):
        if not isinstance(path, _BadPath):
            return self.reader.get_feats(path, ref_len)
        if self.dim is None:  # the feature size, from the shard's first good utterance
            good = next(((p, n) for p, n in self.generator() if not isinstance(p, _BadPath)), None)
            if good is None:
                raise data_checks.DataError(f"every line of this shard is bad (e.g. {path}): no "
                                            "feature size to give them.\n  Fix: repair the audio, "
                                            "or shard the manifest differently")
            self.dim = self.reader.get_feats(*good).shape[1]
        import torch

        return torch.zeros(0, self.dim)


def patch_input_checks(script, args):
    """Fix 7: check a simple_kmeans script's inputs before it starts (see the module docstring)."""
    import feature_utils

    if script in ("learn_kmeans", "dump_km_label"):
        feat_dir, split = args[0], args[1]
        if script == "learn_kmeans":
            nshard, ranks, dim = int(args[2]), range(int(args[2])), None
        else:
            km_path, nshard, ranks = args[2], int(args[3]), [int(args[4])]
            if not os.path.isfile(km_path):
                raise data_checks.DataError(f"k-means model {km_path} does not exist.\n  Fix: learn "
                                            "it first (stage 03, learn_kmeans)")
            import joblib

            dim = joblib.load(km_path).cluster_centers_.shape[1]
        data_checks.check_feature_shards(feat_dir, split, nshard, ranks, dim)
        return
    get_path_iterator, dump_feature = feature_utils.get_path_iterator, feature_utils.dump_feature
    sample_rate = int(args[args.index("--sample_rate") + 1]) if "--sample_rate" in args else 16000

    def checked_get_path_iterator(tsv, nshard, rank):
        manifest = data_checks.read_manifest(tsv)
        start, end = feature_utils.get_shard_range(len(manifest.entries), nshard, rank)
        problems = data_checks.check_audio(manifest, sample_rate, manifest.entries[start:end])
        bad = data_checks.settle(problems, f"{tsv} (shard {rank}/{nshard})")
        iterate, num = get_path_iterator(tsv, nshard, rank)

        def tagged():
            for entry, (path, n) in zip(manifest.entries[start:end], iterate()):
                yield (_BadPath(path) if entry.line in bad else path), n

        tagged.skips = bool(bad)
        return tagged, num

    def checked_dump_feature(reader, generator, *rest):
        if getattr(generator, "skips", False):
            reader = _SkippingReader(reader, generator)
        return dump_feature(reader, generator, *rest)

    feature_utils.get_path_iterator = checked_get_path_iterator
    feature_utils.dump_feature = checked_dump_feature


def run(script, args):
    apply_all()
    if script in ("fairseq-hydra-train", "hydra_train"):
        from fairseq_cli.hydra_train import cli_main

        sys.argv = ["fairseq-hydra-train", *args]
        return cli_main()
    d = simple_kmeans_dir()
    name = script[:-3] if script.endswith(".py") else script
    path = os.path.join(d, name + ".py")
    if not os.path.isfile(path):
        avail = sorted(f[:-3] for f in os.listdir(d) if f.endswith(".py"))
        raise SystemExit(f"unknown script {script!r}; available in {d}: {', '.join(avail)}")
    sys.path.insert(0, d)
    patch_input_checks(name, args)
    sys.argv = [path, *args]
    runpy.run_path(path, run_name="__main__")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0 if argv else 2)
    try:
        run(argv[0], argv[1:])
    except data_checks.DataError as err:  # the message is the whole story: no traceback
        raise SystemExit(f"{type(err).__name__}: {err}") from None


if __name__ == "__main__":
    main()
