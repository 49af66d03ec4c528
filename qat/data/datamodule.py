"""CIFARDataModule: CIFAR-10/100 (pickles, image folders or a torchvision download) as in-memory uint8 arrays."""
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from qat.data.cifar import LAYOUTS, PICKLE_DIRS, Split, find_source, load_split, subset_per_class
from qat.data.sampler import EpochSampler, EpochSeeded, ShardSampler, mix
from qat.data.transforms import (CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, check_aug, eval_transform,
                                 train_transform)

SAMPLE_ROOT = Path(__file__).parent / "sample" / "cifar10"
DATASETS = {  # name: (classes, mean, std, default root)
    "cifar10": (10, CIFAR10_MEAN, CIFAR10_STD, None),
    "cifar100": (100, CIFAR100_MEAN, CIFAR100_STD, None),
    "cifar10_sample": (10, CIFAR10_MEAN, CIFAR10_STD, SAMPLE_ROOT),
}


def batch_images(batch) -> int:
    """Images in a training batch (x, y): the batch_size_fn of Lightning's ThroughputMonitor (conf/callbacks)."""
    return len(batch[0])


class ArrayDataset(Dataset):
    """uint8 HWC images + int64 labels, transformed per item (PIL in, tensor out)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def hold_out(split: Split, per_class: int) -> tuple[Split, Split]:
    """(rest, held out): the last `per_class` images of every class of `split` held out, file order kept."""
    held = []
    for c, name in enumerate(split.classes):
        idx = np.flatnonzero(split.labels == c)
        if len(idx) <= per_class:
            raise ValueError(f"data.val_split={per_class}: class {name!r} has only {len(idx)} train images; "
                             f"hold out fewer than {len(idx)} per class")
        held.append(idx[-per_class:])
    mask = np.zeros(len(split.labels), dtype=bool)
    mask[np.concatenate(held)] = True
    return (Split(split.images[~mask], split.labels[~mask], split.classes),
            Split(split.images[mask], split.labels[mask], split.classes))


def download(root: Path, name: str) -> None:
    from torchvision.datasets import CIFAR10, CIFAR100
    {"cifar10": CIFAR10, "cifar100": CIFAR100}[name](str(root), train=True, download=True)
    {"cifar10": CIFAR10, "cifar100": CIFAR100}[name](str(root), train=False, download=True)


class CIFARDataModule(L.LightningDataModule):
    """CIFAR train/val/test loaders with the log's augmentation; without `val_split` the test split doubles as
    validation (as in the log).

    Args:
        name: cifar10 | cifar100 | cifar10_sample (the bundled 1,000/500-image sample).
        root: pickles or image folders (see qat.data.cifar.LAYOUTS); defaults to the sample for cifar10_sample.
        download: fetch with torchvision into `root` when nothing is there yet.
        batch_size: per-device train batch (qat.run divides the global batch by the world size).
        per_class / test_per_class: keep the first N images of every class (quick runs); None = all.
        val_split: hold the last N train images of every class out as the validation set (the test split is
            then only used by `test`); None = validate on the test split, as the log did.
        aug: overrides of qat.data.transforms.AUG_DEFAULTS.
        seed: base seed of shuffling and augmentation (a function of (seed, epoch, index): exact resume).
    """

    def __init__(self, name: str = "cifar10", root=None, download: bool = False, num_classes: int | None = None,
                 img_size: int = 32, batch_size: int = 128, eval_batch_size: int = 256, num_workers: int = 4,
                 pin_memory: bool = True, per_class: int | None = None, test_per_class: int | None = None,
                 aug: dict | None = None, seed: int = 0, val_split: int | None = None):
        super().__init__()
        if name not in DATASETS:
            raise ValueError(f"data.name={name!r} is not one of {sorted(DATASETS)}")
        classes, self.mean, self.std, default_root = DATASETS[name]
        root = root if root is not None else default_root
        if root is None:
            raise ValueError(f"data.root is required for {name}: a folder with {LAYOUTS}")
        self.name, self.root, self.download = name, Path(root).expanduser(), download
        self.pickle_name = "cifar10" if name == "cifar10_sample" else name
        self.num_classes = num_classes or classes
        self.img_size, self.batch_size, self.eval_batch_size = img_size, batch_size, eval_batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.per_class, self.test_per_class, self.seed = per_class, test_per_class, seed
        if val_split is not None and (isinstance(val_split, bool) or not isinstance(val_split, int) or val_split < 1):
            raise ValueError(f"data.val_split={val_split!r}: give a positive number of train images per class "
                             "to hold out for validation, or null to validate on the test split")
        self.val_split = val_split
        self.aug = check_aug(aug)
        self.train_set = self.test_set = self.val_set = None
        self.classes: list[str] | None = None  # class names, set by setup()
        if not download:
            self.check_source()

    def check_source(self):
        if not self.root.exists():
            raise FileNotFoundError(
                f"data.root={self.root} does not exist. Expected {LAYOUTS}. To get CIFAR: set data.download=true "
                f"(torchvision, needs network), or extract the JPEG folders, e.g. "
                f"`tar xzf ../shared/data/cifar10-jpg.tar.gz -C data/` and pass data.root=data/cifar10-jpg.")
        source = find_source(self.root, self.pickle_name)
        if len(source.classes) != self.num_classes:
            raise ValueError(f"data.num_classes={self.num_classes} but {source.path} has {len(source.classes)} classes")
        return source

    def prepare_data(self) -> None:
        if self.download and not (self.root / PICKLE_DIRS[self.pickle_name]).is_dir():
            self.root.mkdir(parents=True, exist_ok=True)
            download(self.root, self.pickle_name)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        source = self.check_source()
        train, test = load_split(source, "train"), load_split(source, "test")
        self.classes = list(source.classes)
        if self.val_split is not None:
            train, val = hold_out(train, self.val_split)
            self.val_set = ArrayDataset(val.images, val.labels, eval_transform(self.img_size, self.mean, self.std))
        keep_train = slice(None) if self.per_class is None else subset_per_class(
            train.labels, self.per_class, source.classes, "train")
        keep_test = slice(None) if self.test_per_class is None else subset_per_class(
            test.labels, self.test_per_class, source.classes, "test")
        self.train_set = ArrayDataset(train.images[keep_train], train.labels[keep_train],
                                      train_transform(self.img_size, self.mean, self.std, self.aug))
        self.test_set = ArrayDataset(test.images[keep_test], test.labels[keep_test],
                                     eval_transform(self.img_size, self.mean, self.std))

    def shard(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def loader(self, dataset, batch_size: int, sampler, drop_last: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          pin_memory=self.pin_memory and torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        mixing = self.aug["mixup"] > 0 or self.aug["cutmix"] > 0
        if mixing and self.batch_size % 2:
            raise ValueError(f"per-device batch size {self.batch_size} must be even with mixup/cutmix "
                             "(samples are paired i <-> B-1-i)")
        rank, world = self.shard()
        sampler = EpochSampler(len(self.train_set), self.seed, shuffle=True, rank=rank, world=world)
        return self.loader(EpochSeeded(self.train_set, self.seed), self.batch_size, sampler, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        """The held-out `val_split` images, or the test split when there is none (as in the log)."""
        dataset = self.test_set if self.val_set is None else self.val_set
        return self.loader(dataset, self.eval_batch_size, ShardSampler(len(dataset), *self.shard()), False)

    def test_dataloader(self) -> DataLoader:
        return self.loader(self.test_set, self.eval_batch_size, ShardSampler(len(self.test_set), *self.shard()), False)

    def calibration_batch(self, n: int | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """`n` (default: batch size) augmented training images picked by `seed`; the global RNG is left untouched."""
        self.setup()
        n = n or self.batch_size
        pick = torch.randperm(len(self.train_set), generator=torch.Generator().manual_seed(mix(self.seed, seed)))[:n]
        items = EpochSeeded(self.train_set, self.seed)
        xs, ys = zip(*(items[(-1 - seed, i)] for i in pick.tolist()))
        return torch.stack(xs), torch.tensor(ys)
