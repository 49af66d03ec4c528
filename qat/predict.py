"""Predict image files with a trained model: top-k classes and probabilities per image -> predictions.csv."""
import csv
import io
import logging
import os
from pathlib import Path

import torch
from omegaconf import DictConfig
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from qat.data.datamodule import DATASETS
from qat.data.transforms import eval_transform
from qat.evaluate import check, load, predict_logits

log = logging.getLogger(__name__)


def find_images(source: str | Path) -> tuple[list[Path], list[Path]]:
    """(images, skipped): the files of `source` (a file or a folder, recursively) Pillow can identify, and the rest."""
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"predict.input={source} does not exist: give an image file or a folder of images")
    files = [source] if source.is_file() else sorted(p for p in source.rglob("*")
                                                     if p.is_file() and not p.name.startswith("."))
    images, skipped = [], []
    for path in files:
        try:
            with Image.open(path) as img:
                img.verify()
            images.append(path)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            skipped.append(path)
    if not images:
        raise ValueError(f"predict.input={source}: no images among {len(files)} file(s) (Pillow could not read "
                         "any); give a folder of .jpg/.png/... images")
    return images, skipped


class ImageFiles(Dataset):
    """Image files -> (tensor, index); an image that fails to decode yields (None, index)."""

    def __init__(self, paths: list[Path], transform):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            with Image.open(self.paths[i]) as img:
                return self.transform(img.convert("RGB")), i
        except (OSError, ValueError):
            return None, i


def collate(items):
    """Stack the decoded images; indices of the failed ones separately."""
    good = [(x, i) for x, i in items if x is not None]
    xs = torch.stack([x for x, _ in good]) if good else None
    return xs, [i for _, i in good], [i for x, i in items if x is None]


def class_names(data: DictConfig, num_classes: int) -> list[str]:
    """Class names from the dataset on disk, else '0', '1', ... (with a warning)."""
    from qat.data.cifar import find_source
    try:
        root = data.root if data.get("root") is not None else DATASETS[data.name][3]
        classes = find_source(root, "cifar10" if data.name == "cifar10_sample" else data.name).classes
        if len(classes) == num_classes:
            return list(classes)
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        pass
    log.warning("class names unavailable (data.root=%s not found): writing class indices", data.get("root"))
    return [str(i) for i in range(num_classes)]


def write_csv(path: Path, rows: list[list], k: int) -> None:
    header = ["path"] + [f"{kind}_{j}" for j in range(1, k + 1) for kind in ("class", "prob")]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(buffer.getvalue())
    os.replace(tmp, path)


def predict(cfg: DictConfig) -> dict:
    """Top-k predictions for every image of `predict.input`, written to <output_dir>/predictions.csv."""
    images, skipped = find_images(cfg.predict.input)
    model, info = load(cfg, check(cfg))
    data, num_classes = cfg.data, int(cfg.data.num_classes)
    classes, k = class_names(data, num_classes), min(int(cfg.predict.topk), num_classes)
    transform = eval_transform(int(data.img_size), *DATASETS[data.name][1:3])
    loader = DataLoader(ImageFiles(images, transform), batch_size=int(cfg.predict.batch_size), collate_fn=collate,
                        num_workers=int(data.num_workers))
    rows, failed = [], []
    for xs, index, bad in tqdm(loader, desc="predict", unit="batch"):
        failed += [images[i] for i in bad]
        if xs is None:
            continue
        probs = predict_logits(model, xs, bool(cfg.eval.tta)).float().softmax(-1)
        top = probs.topk(k, dim=-1)
        for i, p, c in zip(index, top.values.tolist(), top.indices.tolist()):
            rows.append([str(images[i])] + [v for j in range(k) for v in (classes[c[j]], f"{p[j]:.6f}")])
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "predictions.csv", rows, k)
    for path in skipped + failed:
        log.warning("skipped %s: not a readable image", path)
    log.info("predicted %d image(s) with %s (%s), skipped %d -> %s", len(rows), info["model"], info["format"],
             len(skipped) + len(failed), out / "predictions.csv")
    return {**info, "predicted": len(rows), "skipped": [str(p) for p in skipped + failed],
            "csv": str(out / "predictions.csv")}
