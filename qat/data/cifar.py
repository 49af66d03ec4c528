"""Find CIFAR data in any supported layout and decode a split once into a cached uint8 array."""
import hashlib
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
PICKLE_DIRS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
PICKLE_FILES = {
    "cifar10": {"meta": "batches.meta", "names_key": "label_names", "label_key": "labels",
                "train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
    "cifar100": {"meta": "meta", "names_key": "fine_label_names", "label_key": "fine_labels",
                 "train": ["train"], "test": ["test"]},
}
LAYOUTS = ("torchvision's extracted pickles (<root>/cifar-10-batches-py or <root>/cifar-100-python), "
           "or image folders <root>/train/<class>/*.jpg and <root>/test/<class>/*.jpg (directly or one folder below)")


@dataclass(frozen=True)
class Source:
    kind: str  # "pickle" | "folder"
    path: Path
    classes: list
    name: str | None = None  # pickle flavour: cifar10 | cifar100


@dataclass
class Split:
    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N,) int64
    classes: list


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)


def is_folder_tree(path: Path) -> bool:
    return all((path / split).is_dir() and any(d.is_dir() for d in (path / split).iterdir())
               for split in ("train", "test"))


def find_source(root, name: str | None = None) -> Source:
    """The dataset below `root`: pickles of `name` (any CIFAR if None) or one image-folder tree."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data root {root} does not exist")
    names = [name] if name in PICKLE_FILES else list(PICKLE_FILES)
    for n in names:
        for path in (root / PICKLE_DIRS[n], root):
            if (path / PICKLE_FILES[n]["meta"]).is_file():
                with open(path / PICKLE_FILES[n]["meta"], "rb") as f:
                    classes = pickle.load(f, encoding="latin1")[PICKLE_FILES[n]["names_key"]]
                return Source("pickle", path, list(classes), n)
    trees = [root] if is_folder_tree(root) else [d for d in sorted(root.iterdir()) if d.is_dir() and is_folder_tree(d)]
    if len(trees) > 1:
        raise ValueError(f"several image-folder trees below {root}: {[t.name for t in trees]}; point data.root at one")
    if not trees:
        raise ValueError(f"no CIFAR data recognised in {root}. Expected {LAYOUTS}. "
                         "Set data.root to such a folder, or data.download=true to fetch CIFAR with torchvision.")
    classes = sorted(d.name for d in (trees[0] / "train").iterdir() if d.is_dir())
    return Source("folder", trees[0], classes)


def writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


def cache_dir(source: Source) -> Path:
    """<dataset>/.qat_cache, or a per-dataset folder under $XDG_CACHE_HOME/qat when the dataset is read-only."""
    local = source.path / ".qat_cache"
    if writable(local):
        return local
    user = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qat"
    return user / hashlib.sha1(str(source.path.resolve()).encode()).hexdigest()[:16]


def listing(source: Source, split: str) -> list[tuple[str, int]]:
    """(relative path, size) of every file a split is read from: the cache key."""
    if source.kind == "pickle":
        files = [source.path / f for f in PICKLE_FILES[source.name][split]]
    else:
        files = [f for c in source.classes for f in image_files(source.path / split / c)]
    return [(f.relative_to(source.path).as_posix(), f.stat().st_size) for f in files]


def decode(source: Source, split: str) -> tuple[np.ndarray, np.ndarray]:
    if source.kind == "pickle":
        spec = PICKLE_FILES[source.name]
        images, labels = [], []
        for fname in spec[split]:
            with open(source.path / fname, "rb") as f:
                batch = pickle.load(f, encoding="latin1")
            images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels += batch[spec["label_key"]]
        return np.ascontiguousarray(np.concatenate(images)), np.asarray(labels, dtype=np.int64)
    images, labels = [], []
    for label, cls in enumerate(source.classes):
        for f in image_files(source.path / split / cls):
            try:
                with Image.open(f) as img:
                    images.append(np.asarray(img.convert("RGB")))
            except (OSError, SyntaxError) as err:  # PIL: truncated or not an image
                raise ValueError(f"cannot decode image {f} ({err}): replace or delete that file") from None
            labels.append(label)
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise ValueError(f"images in {source.path / split} have different sizes {sorted(shapes)[:3]}...; "
                         "resize them first")
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def load_split(source: Source, split: str) -> Split:
    """Decoded `split` ("train" | "test"), from the .npz cache when the files have not changed since it was written."""
    key = hashlib.sha1(repr(listing(source, split)).encode()).hexdigest()
    cache = cache_dir(source) / f"{split}.npz"
    if cache.is_file():
        with np.load(cache) as npz:
            if str(npz["key"]) == key:
                return Split(npz["images"], npz["labels"], source.classes)
    images, labels = decode(source, split)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, images=images, labels=labels, key=np.array(key))
    os.replace(tmp, cache)
    return Split(images, labels, source.classes)


def subset_per_class(labels: np.ndarray, per_class: int, classes: list, split: str) -> np.ndarray:
    """Indices of the first `per_class` images of every class, in file order."""
    picked = []
    for c, name in enumerate(classes):
        idx = np.flatnonzero(labels == c)
        if len(idx) < per_class:
            raise ValueError(f"per_class={per_class}: class {name!r} has only {len(idx)} {split} images")
        picked.append(idx[:per_class])
    return np.sort(np.concatenate(picked))
