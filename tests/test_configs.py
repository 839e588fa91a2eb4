"""Every yaml under examples/ composes the way fairseq-hydra-train composes it, against its dataclasses."""
import subprocess

import pytest
from omegaconf import OmegaConf

import fairseq_mamba  # noqa: F401  (registers mamba_hubert)
from fairseq.dataclass.initialize import add_defaults
from fairseq.models import MODEL_DATACLASS_REGISTRY
from fairseq.registry import REGISTRIES
from fairseq.tasks import TASK_DATACLASS_REGISTRY

from conftest import BIN, REPO, subprocess_env

YAMLS = sorted(p for p in (REPO / "examples").rglob("*.yaml") if "corpus" not in p.parts)


def test_there_are_configs_to_check():
    names = {p.stem for p in YAMLS}
    assert {"mamba_hubert_tiny_cpu", "hubert_tiny_cpu", "mamba_hubert_base_librispeech",
            "hubert_base_librispeech", "causal_hubert_tiny_cpu", "causal_hubert_base_librispeech",
            "mamba2_hubert_tiny_cpu", "mamba2_hubert_base_librispeech",
            "mamba2_hubert_causal_base_librispeech"} <= names


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(REPO)))
def test_yaml_composes_against_its_dataclasses(path, tmp_path):
    assert path.read_text().startswith("# @package _group_"), "yamls start with '# @package _group_'"
    raw = OmegaConf.load(path)
    # Paths are left for the user (???); fill whichever mandatory values the yaml leaves open.
    missing = [f"{section}.{key}" for section in raw for key in raw[section]
               if section != "hydra" and OmegaConf.is_missing(raw[section], key)]
    overrides = [f"{m}={tmp_path}" if m.endswith(("data", "dir", "path")) else
                 f"{m}=50" if m.endswith("label_rate") else f"{m}=[km]" for m in missing]
    # Compose exactly as fairseq-hydra-train does (same search path and hydra version rules).
    cmd = [str(BIN / "fairseq-hydra-train"), "--config-dir", str(path.parent), "--config-name", path.stem,
           *overrides, "common.user_dir=fairseq_mamba", "--cfg", "job"]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    cfg = OmegaConf.create(run.stdout)
    add_defaults(cfg)  # what fairseq-hydra-train does: merge each section into its dataclass
    registries = {"model": MODEL_DATACLASS_REGISTRY, "task": TASK_DATACLASS_REGISTRY}
    for section in ("model", "task", "criterion", "optimizer", "lr_scheduler"):
        if section not in raw:
            continue
        name = cfg[section]._name
        registry = registries.get(section) or REGISTRIES[section]["dataclass_registry"]
        assert name in registry, f"{path.name}: unknown {section} {name!r}"
        typed = OmegaConf.merge(OmegaConf.structured(registry[name]), OmegaConf.to_container(cfg[section]))
        for key in raw[section]:
            assert key in typed, f"{path.name}: {section}.{key} is not a field of {registry[name].__name__}"
    assert cfg.common.user_dir == "fairseq_mamba"
