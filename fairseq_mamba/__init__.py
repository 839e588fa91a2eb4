"""fairseq_mamba: HuBERT with bidirectional Mamba layers, as a fairseq user-dir plugin.

``common.user_dir=fairseq_mamba`` (or ``import fairseq_mamba``) registers the ``mamba_hubert``
model and criterion (and the ``speech_enhancement`` task, ``hubert_enhancer`` model and
``spectral_reconstruction`` criterion of the reconstruction model), lets fairseq's own checkpoint loading read checkpoints under
torch >= 2.6 (see ``fairseq_fixes.checkpoint_compat``), makes fairseq 0.12's ``hubert_ctc`` buildable
(see ``fairseq_fixes.upstream.patch_hubert_ctc``) so plain ``fairseq-hydra-train`` fine-tunes our checkpoints,
checks every split fairseq's ``hubert_pretraining`` task loads before it loads it
(``checks.data_checks``; size limits: ``checks.size_checks``), and makes a killed run resume exactly
(``fairseq_fixes.resume``).

Folders by role: ``models/`` (auto-imported by fairseq), ``criterions/``, ``tasks/``, ``modules/`` (the
layers), ``ops/`` (scans and convs, their kernels and references), ``fairseq_fixes/``, ``checks/`` (input
validation before the first update), ``decoding/`` (CTC Viterbi and LM decoding), ``inference/``
(streaming, long-form encoding, enhancement scoring), ``analysis/`` (layer-wise MI), ``prepare/`` (a
user's corpus into the layout stage 01 reads).
"""
try:
    import fairseq  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised only without fairseq
    raise ImportError(
        "fairseq_mamba needs the `fairseq` module, provided by either distribution:\n"
        "  pip install fairseq==0.12.2                               (Python < 3.11)\n"
        "  pip install --no-build-isolation fairseq-fixed==0.12.3.1  (Python >= 3.11)"
    ) from err

import logging  # noqa: E402

# fairseq's tasks package imports text_to_speech, whose logging.basicConfig(level=DEBUG) sets the root
# logger to DEBUG: every script would print our kernel dispatch's debug lines, and stage 09's log
# matplotlib's font search. Those loggers keep a level set for them, else get these.
for _name, _level in ((__name__, logging.INFO), ("matplotlib", logging.WARNING)):
    if logging.getLogger(_name).level == logging.NOTSET:
        logging.getLogger(_name).setLevel(_level)
del _name, _level

from .fairseq_fixes.checkpoint_compat import allow_fairseq_checkpoints  # noqa: E402

allow_fairseq_checkpoints()

from .checks.data_checks import install_training_checks  # noqa: E402
from .fairseq_fixes.resume import install_resume_fixes  # noqa: E402
from .checks.size_checks import install_size_checks  # noqa: E402
from .fairseq_fixes.upstream import patch_hubert_ctc  # noqa: E402

install_training_checks()
install_size_checks()
install_resume_fixes()
# Idempotent; leaves a fairseq whose HubertCtcConfig already has `autoregressive` untouched.
patch_hubert_ctc()

from . import criterions, models, tasks  # noqa: E402,F401  (registration side effects)
