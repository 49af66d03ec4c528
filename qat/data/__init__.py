"""CIFAR data: readers + cache, the log's augmentation, epoch-seeded samplers, the bundled sample."""
from qat.data.datamodule import SAMPLE_ROOT, CIFARDataModule, batch_images
from qat.data.sample import make_sample
from qat.data.transforms import build_batch_erasing, build_mixup, eval_transform, train_transform

__all__ = ["SAMPLE_ROOT", "CIFARDataModule", "batch_images", "build_batch_erasing", "build_mixup", "eval_transform",
           "make_sample", "train_transform"]
