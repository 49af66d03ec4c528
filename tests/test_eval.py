"""eval.py: rebuild from a checkpoint alone, score a split exactly, eval.json + confusion.png, one-line errors."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf, open_dict

from conftest import CONF, ROOT, TINY, compose_config
from qat import load_model
from qat.data import CIFARDataModule
from qat.evaluate import evaluate
from qat.models import create_model
from qat.quant import QuantConfig, quantize_

MODEL = {"name": "vit_2_4_32", "num_classes": 10}


def make_run(root: Path, quant: dict | None = None, test_per_class: int = 3) -> Path:
    """A run dir as train.py leaves it (checkpoints/best.ckpt with the qat recipe, .hydra/config.yaml), untrained."""
    torch.manual_seed(0)
    model = create_model(**MODEL)
    if quant is not None:
        quantize_(model, QuantConfig(**quant))
        model.train()(torch.randn(8, 3, 32, 32))  # initialises the quantizer steps
    run = root / "outputs" / "train" / "run"
    (run / "checkpoints").mkdir(parents=True)
    recipe = {"model": MODEL, "quant": dataclasses.asdict(QuantConfig(**quant)) if quant else None, "num_classes": 10}
    torch.save({"qat": recipe, "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}},
               run / "checkpoints" / "best.ckpt")
    cfg = compose_config(TINY + [f"data.test_per_class={test_per_class}", "data.per_class=2"], root / "outputs")
    (run / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), run / ".hydra" / "config.yaml")
    (run / "summary.json").write_text(json.dumps({"name": "quickstart", "model": MODEL["name"], "finished": True,
                                                  "best_ckpt": str(run / "checkpoints" / "best.ckpt")}))
    return run


def compose_eval(root: Path, *overrides: str):
    """conf/eval.yaml composed as `python eval.py <overrides>` would, writing to <root>/eval."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("eval", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.output_root = str(root / "outputs")
        cfg.paths.output_dir = str(root / "eval")
    return cfg


def reference(model, test_per_class: int, tta: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of the sample's test images, computed by hand."""
    dm = CIFARDataModule(name="cifar10_sample", test_per_class=test_per_class, num_workers=0)
    dm.setup()
    x = torch.stack([dm.test_set[i][0] for i in range(len(dm.test_set))])
    y = torch.tensor([dm.test_set[i][1] for i in range(len(dm.test_set))])
    with torch.no_grad():
        logits = (model(x) + model(x.flip(-1))) / 2 if tta else model(x)
    return logits, y


@pytest.mark.parametrize("tta", [False, True])
def test_eval_run_dir_matches_hand_computed_metrics(tmp_path, tta):
    run = make_run(tmp_path, quant={"act": {"bits": 2}})
    report = evaluate(compose_eval(tmp_path, f"ckpt={run}", f"eval.tta={tta}"))
    logits, y = reference(load_model(run), 3, tta)
    assert report["images"] == 30 and report["format"] == "qat run" and report["data"] == "cifar10_sample"
    assert report["acc1"] == pytest.approx(100 * (logits.argmax(-1) == y).float().mean().item())
    top5 = (logits.topk(5, -1).indices == y[:, None]).any(-1)
    assert report["acc5"] == pytest.approx(100 * top5.float().mean().item())
    assert report["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    confusion = torch.tensor(report["confusion"])
    assert confusion.sum(1).tolist() == [3] * 10
    assert [r["acc1"] for r in report["per_class"]] == pytest.approx((100 * confusion.diag() / 3).tolist())
    written = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert written["acc1"] == report["acc1"] and written["quant"]["act"]["bits"] == 2
    assert (tmp_path / "eval" / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_original_format_checkpoint_equals_run_checkpoint(tmp_path):
    run = make_run(tmp_path, quant={"act": {"bits": 2}})
    state = torch.load(run / "checkpoints" / "best.ckpt", weights_only=False)["state_dict"]
    original = tmp_path / "model_best.pth.tar"
    torch.save({"state_dict": {"module." + k[len("model."):]: v for k, v in state.items()}, "epoch": 3}, original)
    ours = evaluate(compose_eval(tmp_path, f"ckpt={run}"))
    theirs = evaluate(compose_eval(tmp_path, f"ckpt={original}", "model=vit_2_4_32", "quant=act2b",
                                   "data=cifar10_sample", "data.test_per_class=3"))
    assert theirs["format"] == "original" and theirs["confusion"] == ours["confusion"]
    assert theirs["loss"] == pytest.approx(ours["loss"], rel=1e-6)


def test_eval_experiment_reference_and_train_split(tmp_path):
    make_run(tmp_path)
    report = evaluate(compose_eval(tmp_path, "ckpt=experiment:quickstart", "eval.split=train"))
    assert report["split"] == "train" and report["images"] == 20 and report["quant"] is None


def test_eval_data_overrides_merge_over_the_runs_data_config(tmp_path):
    run = make_run(tmp_path)
    report = evaluate(compose_eval(tmp_path, f"ckpt={run}", "+data.test_per_class=1"))
    assert report["images"] == 10 and report["data"] == "cifar10_sample"


@pytest.mark.parametrize("case, error, message", [
    ("missing", FileNotFoundError, "ckpt=.*does not exist"),
    ("corrupt", ValueError, "not a readable torch checkpoint"),
    ("family", ValueError, "is a vit_2_4_32 run but model=resnet20 was given"),
    ("split", ValueError, r"eval.split='dev' is not one of \['test', 'val', 'train'\]"),
    ("val", ValueError, "eval.split=val needs a held-out validation set: set data.val_split=N"),
    ("original_no_model", ValueError, "original-format checkpoint .* model=<name>"),
    ("original_wrong_model", ValueError, "does not load into model=resnet20: .*looks like: vit_2_4_32"),
])
def test_eval_bad_input_is_one_line_error_before_any_work(tmp_path, case, error, message):
    run = make_run(tmp_path)
    corrupt, original = tmp_path / "corrupt.ckpt", tmp_path / "original.pth"
    corrupt.write_bytes((run / "checkpoints" / "best.ckpt").read_bytes()[:300])
    torch.save(create_model(**MODEL).state_dict(), original)
    overrides = {"missing": [f"ckpt={tmp_path / 'nope.ckpt'}"], "corrupt": [f"ckpt={corrupt}", "data=cifar10_sample"],
                 "family": [f"ckpt={run}", "model=resnet20"], "split": [f"ckpt={run}", "eval.split=dev"],
                 "val": [f"ckpt={run}", "eval.split=val"],
                 "original_no_model": [f"ckpt={original}", "data=cifar10_sample"],
                 "original_wrong_model": [f"ckpt={original}", "data=cifar10_sample", "model=resnet20"]}[case]
    with pytest.raises(error, match=message) as info:
        evaluate(compose_eval(tmp_path, *overrides))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "eval").exists()


@pytest.mark.slow
def test_eval_py_command_line(tmp_path):
    """`python eval.py ckpt=<run dir>` end to end: own run dir under outputs/eval, one-line result and errors."""
    run = make_run(tmp_path)
    base = [sys.executable, str(ROOT / "eval.py"), f"paths.output_root={tmp_path / 'outputs'}"]
    done = subprocess.run(base + [f"ckpt={run}"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    (out,) = (tmp_path / "outputs" / "eval").glob("*-vit_2_4_32")
    assert json.loads((out / "eval.json").read_text())["images"] == 30
    assert "top-1" in (out / "eval.log").read_text()
    bad = subprocess.run(base + [f"ckpt={tmp_path / 'nope'}"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and bad.stderr.strip().count("\n") == 0 and "does not exist" in bad.stderr
