"""make_report.py on a demo run's layout with every variant of the paper's experiment: results.json's
"finetune" / "scratch" / "reconstruction" entries, the table, and the MI section's rise-again marks."""
import json
import subprocess
import sys

import pytest

from conftest import REPO, subprocess_env
from fairseq_mamba.analysis.mi_plots import plot_checkpoint_curves, rise_again

WERS = {"mamba_hubert": (70.0, 60.0), "mamba_hubert_conformer": (65.0, 55.5), "mamba_hubert_scratch": (99.0, 98.0),
        "hubert": (80.0, 66.0), "hubert_conformer": (82.0, 67.0), "hubert_scratch": (100.0, 99.5)}


def lay_out_run(w):
    for name, (wer, wer_lm) in WERS.items():
        (w / "decode" / name).mkdir(parents=True)
        (w / "decode" / name / "test.json").write_text(json.dumps(
            {"wer": wer, "cer": wer / 3, "utterances": 61, "lm": {"wer": wer_lm, "cer": wer_lm / 3, "lm_weight": 1.0,
                                                                  "sil_score": 0.0, "tune_wer": wer_lm}}))
        (w / "finetune" / name).mkdir(parents=True)
        params = 1_000_000 + 250_000 * name.endswith("conformer")
        (w / "finetune" / name / "train.log").write_text(f"[fairseq_cli.train] num. shared model params: {params:,} "
                                                          f"(num. trained: {params:,})\n")
    (w / "reconstruction" / "mamba_hubert").mkdir(parents=True)
    (w / "reconstruction" / "mamba_hubert" / "test.json").write_text(json.dumps({"lsd_improvement_db": 3.5}))
    curve = {"layer0": [3.0, 2.0, 1.5, 2.5], "mfcc": [2.0, 1.9, 1.8, 1.85],
             "std": {"layer0": [0.02, 0.03, 0.05, 0.04], "mfcc": [0.1, 0.1, 0.1, 0.1]}}
    mi = {"models": {"mamba_hubert": curve, "mamba_hubert_conformer": {**curve, "encoder_layers": 2, "head_layers": 1},
                     "mamba_hubert_recon": curve}}
    (w / "mi" / "mamba_hubert").mkdir(parents=True)
    (w / "mi" / "mamba_hubert" / "layer_mi.json").write_text(json.dumps(mi))
    (w / "settings.json").write_text(json.dumps({"FT_UPDATES": 1500, "HEAD": "conformer"}))


def test_results_and_table_of_every_variant(tmp_path):
    lay_out_run(tmp_path)
    p = subprocess.run([sys.executable, "run_scripts/make_report.py", str(tmp_path), "mamba_hubert", "hubert"],
                       cwd=REPO, env=subprocess_env(), capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())["models"]
    m = res["mamba_hubert"]
    assert m["finetune"]["alone"]["wer_test"] == 70.0 == m["wer_test"]  # top-level = "alone"
    assert m["finetune"]["conformer"]["wer_test_lm"] == 55.5 and m["finetune"]["conformer"]["params"] == 1_250_000
    assert m["scratch"]["cer_test"] == 33.0 and m["scratch"]["checkpoint"].endswith("mamba_hubert_scratch/checkpoints/checkpoint_best.pt")
    assert m["reconstruction"]["lsd_improvement_db"] == 3.5 and m["reconstruction"]["mi"]["layer0"][-1] == 2.5
    assert m["finetune"]["conformer"]["mi"]["head_layers"] == 1 and "mi" not in m["scratch"]
    assert "reconstruction" not in res["hubert"] and res["hubert"]["finetune"]["conformer"]["wer_test"] == 82.0
    report = (tmp_path / "report.md").read_text()
    assert "| mamba_hubert | n/a | n/a | 3.50 | n/a |" in report  # the reconstruction row
    assert "| mamba_hubert | + conformer head | 1,250,000 | 65.00 | 21.67 | 55.50 | 18.50 | 9.2 (+ Conformer, 100 h) |" in report
    assert "One conformer layer on top helps: 4.50 points below fine-tuning alone." in report
    assert "One conformer layer on top does not help: 1.00 points above fine-tuning alone." in report
    assert "No pre-training, same schedule: 38.00 points above the fine-tuned encoder alone" in report
    # layer0 falls to 1.5 at layer 2 and rises by 1.0 (spread 0.05): marked; mfcc's +0.05 is within its spread
    assert "| mamba_hubert | + conformer head | layer0 | 3.00 2.00 1.50 ‖ 2.50 | yes: +1.00 after layer 2 (spread 0.05) |" in report
    assert "| mamba_hubert | pre-trained | mfcc | 2.00 1.90 1.80 1.85 | within noise: +0.05 after layer 2 (spread 0.10) |" in report
    assert "![MI per layer, model by model](mi/checkpoint_mi.png)" in report and (tmp_path / "mi" / "checkpoint_mi.png").exists()


def test_rise_again_of_a_falling_curve_is_no():
    assert rise_again([3.0, 2.0, 1.0], [0.1, 0.1, 0.1]) == (2, 0.0, 0.1, False)
    assert rise_again([3.0, 1.0, 1.5], [0.1, 0.3, 0.2]) == (1, 0.5, 0.3, False)  # 0.5 < 2 x 0.3
    assert rise_again([3.0, 1.0, 1.5], None) == (1, 0.5, 0.0, True)
    with pytest.raises(ValueError, match="empty curve"):
        rise_again([], None)


def test_the_plot_marks_each_rise_against_its_spread(tmp_path):
    head = {"input": [2.0, 1.0, 1.6], "std": {"input": [0.1, 0.1, 0.1]}, "encoder_layers": 1}
    flat = {"input": [2.0, 1.5, 1.0], "layer0": [3.0, 2.9, 2.95],
            "std": {"input": [0.1, 0.1, 0.1], "layer0": [0.05, 0.05, 0.05]}}
    marks = plot_checkpoint_curves({"m": [("+ conformer head", head), ("fine-tuned alone", flat)]},
                                   ["layer0", "phones", "input"], str(tmp_path / "c.png"))
    assert marks == ["m | fine-tuned alone | layer0: +0.05 (<= 2x0.05)", "m | + conformer head | input: +0.60 (> 2x0.10) *"]
    assert (tmp_path / "c.png").stat().st_size > 10_000
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_checkpoint_curves({"m": [("alone", flat)]}, ["phones"], str(tmp_path / "d.png"))
