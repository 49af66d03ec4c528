"""Evaluate a checkpoint: rebuild the model from it alone, score a split, write eval.json + a confusion matrix."""
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn
from torch.utils.data import DataLoader

from qat.callbacks import write_json_atomic
from qat.builders import as_dict, build
from qat.checkpoint import load_model
from qat.data.datamodule import ArrayDataset
from qat.distill.teacher import load_teacher
from qat.runs import load_checkpoint, resolve

log = logging.getLogger(__name__)

SPLITS = ("test", "val", "train")


def checkpoint_file(ckpt: str, output_root: str | Path) -> Path:
    """`ckpt` (run dir, .ckpt file, experiment:<name> or zoo:<name>) -> the checkpoint file."""
    if not ckpt:
        raise ValueError("ckpt is required: ckpt=<run dir | .ckpt file | experiment:<name> | zoo:<name>>")
    try:
        return resolve(str(ckpt), output_root)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"ckpt={ckpt}: {e}") from None


def read(path: Path) -> dict:
    """The checkpoint as a dict; a one-line ValueError if it is not a readable torch checkpoint dict."""
    checkpoint = load_checkpoint(path)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"ckpt={path} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    return checkpoint


def run_recipe(checkpoint: dict, path: Path, model_cfg: dict | None, num_classes: int | None) -> dict:
    """The qat run's recipe, checked against a forced `model=` and the data's class count."""
    recipe = checkpoint["qat"]
    name = recipe["model"]["name"]
    if model_cfg is not None and model_cfg["name"] != name:
        raise ValueError(f"ckpt={path} is a {name} run but model={model_cfg['name']} was given: drop model= "
                         f"(qat runs carry their architecture) or pass model={name}")
    if num_classes is not None and int(recipe["num_classes"]) != num_classes:
        raise ValueError(f"ckpt={path} predicts {recipe['num_classes']} classes but data.num_classes={num_classes}: "
                         "choose the data the run was trained on")
    return recipe


def build_model(cfg: DictConfig, path: Path, checkpoint: dict, num_classes: int) -> tuple[nn.Module, dict]:
    """The eval-mode model and a description {model, quant, format} of what was loaded."""
    model_cfg, quant = as_dict(cfg.get("model")), as_dict(cfg.get("quant"))
    if "qat" in checkpoint:
        recipe = run_recipe(checkpoint, path, model_cfg, num_classes)
        model = load_model(path)
        return model, {"model": recipe["model"]["name"], "quant": recipe.get("quant"), "format": "qat run"}
    if model_cfg is None:
        raise ValueError(f"ckpt={path} is an original-format checkpoint (no qat recipe): say its architecture "
                         "with model=<name> (and quant=<config> if it is quantized)")
    try:
        model = load_teacher(model_cfg, path, quant, num_classes=num_classes)
    except ValueError as e:
        raise ValueError(f"ckpt={path} does not load into model={model_cfg['name']}: {e}") from None
    return model, {"model": model_cfg["name"], "quant": quant, "format": "original"}


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, tta: bool) -> torch.Tensor:
    """Logits of `x`; with `tta` the mean of the image's and its horizontal mirror's logits."""
    logits = model(x)
    return (logits + model(x.flip(-1))) / 2 if tta else logits


def score(model: nn.Module, loader: DataLoader, num_classes: int, tta: bool = False) -> dict:
    """Top-1/top-5 accuracy (percent), mean cross-entropy and the confusion matrix (rows: true class)."""
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    top5 = loss = 0.0
    k = min(5, num_classes)
    for x, y in loader:
        logits = predict_logits(model, x, tta).float()
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        top5 += (logits.topk(k, dim=-1).indices == y[:, None]).any(-1).sum().item()
        confusion += torch.bincount(y * num_classes + logits.argmax(-1), minlength=num_classes ** 2).view_as(confusion)
    n = int(confusion.sum())
    if n == 0:
        raise ValueError("the evaluation split is empty")
    return {"images": n, "acc1": 100.0 * confusion.diag().sum().item() / n, "acc5": 100.0 * top5 / n,
            "loss": loss / n, "confusion": confusion.tolist()}


def per_class(confusion: list[list[int]], classes: list[str]) -> list[dict]:
    """One row per class: images and top-1 accuracy (percent) of that class."""
    rows = []
    for i, name in enumerate(classes):
        n = sum(confusion[i])
        rows.append({"class": name, "images": n, "acc1": 100.0 * confusion[i][i] / n if n else None})
    return rows


def plot_confusion(confusion: list[list[int]], classes: list[str], path: Path, title: str) -> None:
    """Row-normalised confusion matrix as a PNG, written atomically."""
    from qat.report import plt, save_figure
    m = torch.tensor(confusion, dtype=torch.float)
    m = m / m.sum(1, keepdim=True).clamp_min(1)
    size = max(4.0, 0.45 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(m.numpy(), cmap="Blues", vmin=0, vmax=1)
    if len(classes) <= 20:
        ax.set_xticks(range(len(classes)), classes, rotation=90)
        ax.set_yticks(range(len(classes)), classes)
        for i in range(len(classes)):
            for j in range(len(classes)):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if m[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    save_figure(fig, path)


def check_options(cfg: DictConfig) -> None:
    split = cfg.eval.split
    if split not in SPLITS:
        raise ValueError(f"eval.split={split!r} is not one of {list(SPLITS)}")
    if split == "val" and cfg.data.get("val_split") is None:
        raise ValueError("eval.split=val needs a held-out validation set: set data.val_split=N (images per class "
                         "held out from train, as in training), or use eval.split=test")


def data_config(cfg: DictConfig, path: Path) -> DictConfig:
    """`data=<name>` when given, else the data config of the run that wrote `path` (<run>/.hydra/config.yaml)
    with any `+data.<key>=<value>` overrides merged over it."""
    given = cfg.get("data")
    if given is not None and "_target_" in given:
        return given
    run_config = path.parent.parent / ".hydra" / "config.yaml"
    if not run_config.is_file():
        raise ValueError(f"ckpt={path} is not inside a run dir with .hydra/config.yaml: say which data to use, "
                         "e.g. data=cifar10 (or data=cifar10_sample)")
    run = OmegaConf.load(run_config)
    return OmegaConf.merge(OmegaConf.to_container(run.data, resolve=True), given or {})


def check(cfg: DictConfig) -> Path:
    """The checkpoint file, after every check that needs no loading; sets cfg.data when it is absent."""
    path = checkpoint_file(cfg.ckpt, cfg.paths.output_root)
    data = data_config(cfg, path)
    with open_dict(cfg):
        cfg.data = data
    check_options(cfg)
    return path


def load(cfg: DictConfig, path: Path) -> tuple[nn.Module, dict]:
    """The eval-mode model of `path` and the facts {ckpt, model, quant, format}."""
    model, info = build_model(cfg, path, read(path), int(cfg.data.num_classes))
    return model, {"ckpt": str(path), **info}


def split_dataset(datamodule, split: str):
    """The dataset of `split` with the eval transform (train images without augmentation)."""
    datamodule.setup()
    if split == "train":
        train = datamodule.train_set
        return ArrayDataset(train.images, train.labels, datamodule.test_set.transform)
    return datamodule.val_set if split == "val" else datamodule.test_set


def evaluate(cfg: DictConfig) -> dict:
    """Score the checkpoint on `eval.split`; write eval.json and confusion.png in cfg.paths.output_dir."""
    path = check(cfg)
    datamodule = build(cfg.data, _convert_="all")  # a missing dataset fails here, before loading
    model, info = load(cfg, path)
    dataset = split_dataset(datamodule, cfg.eval.split)
    loader = DataLoader(dataset, batch_size=int(cfg.data.eval_batch_size), num_workers=int(cfg.data.num_workers))
    result = score(model, loader, int(cfg.data.num_classes), tta=bool(cfg.eval.tta))
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    title = f"{info['model']} {cfg.data.name} {cfg.eval.split}: top-1 {result['acc1']:.2f}%"
    plot_confusion(result["confusion"], datamodule.classes, out / "confusion.png", title)
    report = {**info, "data": cfg.data.name, "split": cfg.eval.split, "tta": bool(cfg.eval.tta),
              **{k: v for k, v in result.items() if k != "confusion"},
              "per_class": per_class(result["confusion"], datamodule.classes), "classes": datamodule.classes,
              "confusion": result["confusion"], "confusion_png": "confusion.png"}
    write_json_atomic(out / "eval.json", report)
    for row in report["per_class"]:
        log.info("  %-12s %5d images  top-1 %6.2f", row["class"], row["images"], row["acc1"] or 0.0)
    log.info("eval %s (%s) on %s %s, %d images: top-1 %.2f  top-5 %.2f  loss %.4f -> %s", info["model"],
             info["format"], cfg.data.name, cfg.eval.split, result["images"], result["acc1"], result["acc5"],
             result["loss"], out / "eval.json")
    return report
