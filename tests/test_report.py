"""python -m qat.report: PNGs + report.md from metrics.csv, and the plotted data equal metrics.csv."""
import csv
import json
import subprocess
import sys

import pytest

from conftest import ROOT, TINY
from qat.report import heatmap_data, main, read_metrics, write_report

PNG = b"\x89PNG\r\n\x1a\n"
LAYERS = ("blocks.0.qkv.weight_quantizer", "blocks.0.qkv.act_quantizer")


def write_run(run, acc_offset: float = 0.0):
    """A run dir with a metrics.csv laid out as Lightning's CSVLogger writes it (telemetry rows: step only)."""
    run.mkdir(parents=True)
    rows = []
    for epoch in range(3):
        for step in (2 * epoch, 2 * epoch + 1):
            for j, name in enumerate(LAYERS):
                rows.append({"step": step, f"quant/{name}/step": 0.1 * (j + 1) + 0.01 * step,
                             f"quant/{name}/clip": 0.05 * (j + 1) + 0.01 * step})
                if "weight" in name and step > 0:
                    rows[-1][f"quant/{name}/flip"] = 0.001 * step
        last = 2 * epoch + 1
        rows.append({"epoch": epoch, "step": last, "val/acc1": 0.3 + 0.1 * epoch + acc_offset,
                     "val/loss": 2 - 0.2 * epoch})
        rows.append({"epoch": epoch, "step": last, "lr-AdamW/decay": 1e-3 / (epoch + 1),
                     "lr-AdamW/quant": 1e-2, "train/acc1": 0.2 + 0.1 * epoch,
                     "train/loss_epoch": 2.2 - 0.3 * epoch})
    rows.append({"epoch": 3, "step": 6, "test/acc1": 0.55})
    columns = sorted({k for row in rows for k in row})
    with open(run / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    (run / "summary.json").write_text(json.dumps({"name": "toy", "model": "vit_2_4_32", "quant_choice": "w2a2",
                                                  "best_val_acc": 50.0 + acc_offset, "finished": True}))
    return run


def test_report_plots_exactly_the_metrics(tmp_path):
    a, b = write_run(tmp_path / "a"), write_run(tmp_path / "b", acc_offset=0.05)
    drawn = write_report([a, b], tmp_path / "report")
    assert drawn["curves.png"]["b"]["val/acc1"] == ([0, 1, 2], pytest.approx([35.0, 45.0, 55.0]))
    assert drawn["curves.png"]["a"]["train/loss_epoch"] == ([0, 1, 2], pytest.approx([2.2, 1.9, 1.6]))
    assert drawn["lr.png"]["a"] == ([0, 1, 2], pytest.approx([1e-3, 5e-4, 1e-3 / 3]))
    steps = drawn["steps_0.png"][LAYERS[1]]
    assert steps == (list(range(6)), pytest.approx([0.2 + 0.01 * s for s in range(6)]))
    names, epochs, clip = drawn["clip_1.png"]
    assert names == list(LAYERS) and epochs == [0, 1, 2]
    assert clip[0] == pytest.approx([0.055, 0.075, 0.095])  # mean of the two steps of each epoch
    names, epochs, flip = drawn["flip_0.png"]
    assert names == [LAYERS[0]] and flip == [pytest.approx([0.001, 0.0025, 0.0045])]  # epoch 0: step 1 only
    for name in ("curves.png", "lr.png", "steps_0.png", "clip_0.png", "flip_0.png", "steps_1.png"):
        assert (tmp_path / "report" / name).read_bytes()[:8] == PNG
    md = (tmp_path / "report" / "report.md").read_text()
    assert "](flip_1.png)" in md and "| b | toy | vit_2_4_32 | w2a2 |" in md and "| 50.05 |" in md


def test_heatmap_of_a_run_without_telemetry_is_empty_and_report_says_so(tmp_path):
    run = tmp_path / "fp"
    run.mkdir()
    (run / "metrics.csv").write_text("epoch,step,val/acc1,lr\n0,1,0.5,0.001\n")
    assert heatmap_data(read_metrics(run), "clip") == ([], [], [])
    main([str(run)])
    md = (run / "report" / "report.md").read_text()
    assert "No `quant/*/clip` telemetry" in md and "| fp | - |" in md


def test_report_cli_rejects_a_folder_without_metrics(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path)])
    assert "no metrics.csv in" in capsys.readouterr().err


@pytest.mark.slow
def test_report_of_a_real_quantized_run(tmp_path):
    """A tiny w2a2 run with telemetry every step: every PNG present, curves equal to its metrics.csv."""
    args = TINY + ["quant=w2a2", "telemetry.every_n_steps=1", "trainer.max_epochs=2", f"paths.output_root={tmp_path}"]
    done = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    (run,) = (tmp_path / "train").iterdir()
    subprocess.run([sys.executable, "-m", "qat.report", str(run)], cwd=ROOT, check=True, timeout=300)
    for name in ("curves.png", "lr.png", "steps_0.png", "clip_0.png", "flip_0.png"):
        assert (run / "report" / name).stat().st_size > 1000
    drawn = write_report([run], tmp_path / "again")
    val = [r for r in read_metrics(run) if "val/acc1" in r]
    assert drawn["curves.png"][run.name]["val/acc1"][1] == pytest.approx([100 * r["val/acc1"] for r in val])
    assert drawn["flip_0.png"][0]  # weight quantizers logged flips
