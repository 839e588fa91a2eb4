"""fairseq_mamba: HuBERT with bidirectional Mamba layers, as a fairseq user-dir plugin.

``common.user_dir=fairseq_mamba`` (or ``import fairseq_mamba``) registers the ``mamba_hubert``
model and criterion, lets fairseq's own checkpoint loading read checkpoints under
torch >= 2.6 (see ``checkpoint_compat``) and makes fairseq 0.12's ``hubert_ctc`` buildable
(see ``upstream.patch_hubert_ctc``), so plain ``fairseq-hydra-train`` fine-tunes our checkpoints.
"""
try:
    import fairseq  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised only without fairseq
    raise ImportError(
        "fairseq_mamba needs the `fairseq` module, provided by either distribution:\n"
        "  pip install fairseq==0.12.2                               (Python < 3.11)\n"
        "  pip install --no-build-isolation fairseq-fixed==0.12.3.1  (Python >= 3.11)"
    ) from err

from .checkpoint_compat import allow_fairseq_checkpoints

allow_fairseq_checkpoints()

from .upstream import patch_hubert_ctc  # noqa: E402

# Idempotent; leaves a fairseq whose HubertCtcConfig already has `autoregressive` untouched.
patch_hubert_ctc()

from . import criterions, models  # noqa: E402,F401  (registration side effects)
