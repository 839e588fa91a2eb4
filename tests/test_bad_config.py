"""Bad configs (issue #6, point 2): an unknown key, a bad choice or a size out of range is named
before the first update (hydra composition, or MambaHubertModel's build-time validate_config)."""
import subprocess

import pytest

from fairseq_mamba.models.mamba_hubert import MambaHubertConfig, validate_config

from conftest import BIN, REPO, subprocess_env, write_tiny_dataset


def test_an_unknown_config_key_stops_fairseq_hydra_train(tmp_path):
    root = write_tiny_dataset(tmp_path / "data")
    p = subprocess.run([str(BIN / "fairseq-hydra-train"), "--config-dir", "examples/pretrain", "--config-name",
                        "mamba_hubert_tiny_cpu", f"task.data={root}", f"task.label_dir={root}",
                        "common.user_dir=fairseq_mamba", f"hydra.run.dir={tmp_path / 'run'}",
                        "model.mamba_bogus=3"], cwd=REPO, env=subprocess_env(), capture_output=True,
                       text=True, timeout=600)
    rc, log = p.returncode, p.stdout + p.stderr
    assert rc != 0 and "Key 'mamba_bogus' is not in struct" in log and "full_key: model.mamba_bogus" in log
    assert "train_inner" not in log


def compose(config_dir, name, *overrides):
    """The config fairseq-hydra-train would train with (its hydra_init, compose, add_defaults)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from fairseq.dataclass.initialize import add_defaults, hydra_init

    import fairseq_mamba  # noqa: F401  (common.user_dir: registers mamba_hubert)

    hydra_init(name)
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.1"):  # as fairseq
        cfg = hydra_compose(config_name=name, overrides=["task.data=x", "task.label_dir=x", *overrides])
    add_defaults(cfg)
    return cfg


@pytest.mark.parametrize("override,error", [
    ("task.lable_dir=x", "Could not override 'task.lable_dir'"),
    ("model.bimamba_type=sideways", "Invalid value 'sideways', expected one of [external, internal, none]"),
])
def test_config_typos_and_bad_choices_are_named(override, error):
    compose(REPO / "examples" / "pretrain", "mamba_hubert_tiny_cpu")  # the config itself is fine
    with pytest.raises(Exception) as err:
        compose(REPO / "examples" / "pretrain", "mamba_hubert_tiny_cpu", override)
    assert error in str(err.value)


def test_an_unknown_key_in_a_yaml_is_named(tmp_path):
    yaml = (REPO / "examples" / "pretrain" / "mamba_hubert_tiny_cpu.yaml").read_text()
    (tmp_path / "bad.yaml").write_text(yaml.replace("  mamba_ffn: true\n", "  mamba_ffn: true\n  mamba_bogus: 3\n"))
    with pytest.raises(Exception, match="Key 'mamba_bogus' not in 'MambaHubertConfig'"):
        compose(tmp_path, "bad")


@pytest.mark.parametrize("field,value,match", [
    ("mamba_d_state", -1, "model.mamba_d_state=-1 must be >= 1"),
    ("mamba_d_conv", 0, "model.mamba_d_conv=0 must be >= 1"),
    ("encoder_layers", 0, "model.encoder_layers=0 must be >= 1"),
    ("mamba_dt_rank", "0", "model.mamba_dt_rank='0': use 'auto' or a positive integer"),
    ("mamba_expand", 1.3, r"mamba_expand=1.3 x encoder_embed_dim=128 = 166.4 is not a whole inner width"),
    ("encoder_ffn_embed_dim", 0, "encoder_ffn_embed_dim=0 must be >= 1 with mamba_ffn=true"),
    ("bimamba_type", "both", "model.bimamba_type='both': choose one of"),
])
def test_sizes_out_of_range_are_named_at_build_time(field, value, match):
    cfg = MambaHubertConfig(encoder_embed_dim=128, **{field: value})
    with pytest.raises(ValueError, match=match):
        validate_config(cfg)
