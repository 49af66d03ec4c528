"""`data=synthetic`: training images made from an FP model (no training data), the real test split for evaluation.

Methods (`synthetic.method`): gaussian (noise with the dataset's mean/std), zeroq (BN-statistic matching, cached),
psaq (patch-similarity diversity for BN-free ViTs, cached), gdfq (a generator trained alongside QAT: a fresh batch
every step). The interface is CIFARDataModule's: train/val/test loaders, `calibration_batch(n, seed)`,
`num_classes`, a settable `batch_size`.
"""
import logging
from pathlib import Path

import numpy as np
import torch
from torchvision import transforms as T

from qat.data.cifar import load_split, subset_per_class
from qat.data.datamodule import ArrayDataset, CIFARDataModule
from qat.data.transforms import eval_transform
from qat.datafree.cache import as_labels, load_or_build
from qat.datafree.images import gaussian_images, to_uint8
from qat.datafree.teacher import load_fp_teacher, resolve_teacher
from qat.datafree.zeroq import ZeroQSettings, check_has_bn, zeroq_images

log = logging.getLogger(__name__)

METHODS = ("gaussian", "zeroq", "gdfq", "psaq")
DEFAULTS = {"method": "gaussian", "teacher": None, "teacher_model": None, "output_root": "outputs",
            "num_images": 1024, "seed": 0, "cache_dir": None, "zeroq": {}, "gdfq": {}, "psaq": {}}


def check_synthetic(synthetic: dict | None) -> dict:
    """`synthetic` merged over DEFAULTS; bad keys and values fail in one line naming the key."""
    s = dict(synthetic or {})
    unknown = sorted(set(s) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown synthetic keys {unknown}; valid: {sorted(DEFAULTS)}")
    s = DEFAULTS | s
    if s["method"] not in METHODS:
        raise ValueError(f"data.synthetic.method={s['method']!r} is not valid: use one of {list(METHODS)}")
    if not isinstance(s["num_images"], int) or s["num_images"] < 1:
        raise ValueError(f"data.synthetic.num_images={s['num_images']!r}: it must be a positive integer "
                         "(images to synthesize), e.g. data.synthetic.num_images=1024")
    return s


def settings(cls, values: dict, key: str):
    """A method's settings dataclass from its config dict; unknown keys fail naming data.synthetic.<key>."""
    valid = list(cls.__dataclass_fields__)
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ValueError(f"unknown data.synthetic.{key} keys {unknown}; valid: {valid}")
    return cls(**values)


class SyntheticDataModule(CIFARDataModule):
    """Synthetic training images from `synthetic.teacher`; evaluation on the real test split of `name`/`root`.

    Args:
        synthetic: method, teacher (a checkpoint reference), teacher_model (model name, for plain state_dicts),
            output_root (for experiment:/auto references), num_images, seed, cache_dir (default
            <output_root>/synthetic), and the method's settings under zeroq / gdfq / psaq.
        **data: as CIFARDataModule (the evaluation data, batch sizes, loader settings).
    """

    def __init__(self, synthetic: dict | None = None, **data):
        super().__init__(**data)
        self.synthetic = s = check_synthetic(synthetic)
        self.teacher_path = resolve_teacher(s["teacher"], s["output_root"], s["teacher_model"])
        self.cache_dir = Path(s["cache_dir"] or Path(s["output_root"]) / "synthetic")
        self.zeroq = settings(ZeroQSettings, s["zeroq"], "zeroq") if s["method"] == "zeroq" else None
        self.teacher, self.teacher_sha256 = load_fp_teacher(self.teacher_path, s["teacher_model"], self.num_classes)
        if s["method"] in ("zeroq", "gdfq"):
            check_has_bn(self.teacher, s["method"])
        self.train_transform = T.Compose([T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(self.mean, self.std)])

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        source = self.check_source()
        test = load_split(source, "test")
        keep = slice(None) if self.test_per_class is None else subset_per_class(
            test.labels, self.test_per_class, source.classes, "test")
        self.test_set = ArrayDataset(test.images[keep], test.labels[keep],
                                     eval_transform(self.img_size, self.mean, self.std))
        images, labels = self.make_images()
        self.train_set = ArrayDataset(images, labels, self.train_transform)

    def make_images(self) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (N, H, W, C) images + labels of the fixed-bank methods (cached for zeroq / psaq)."""
        s, teacher = self.synthetic, self.teacher
        if s["method"] == "gaussian":
            x = gaussian_images(s["num_images"], self.img_size, self.mean, self.std, s["seed"])
            with torch.no_grad():
                y = torch.cat([teacher(b).argmax(-1) for b in x.split(256)])
            return to_uint8(x, self.mean, self.std), as_labels(y)
        settings = self.zeroq
        sidecar = {"method": s["method"], "model_sha256": self.teacher_sha256, "num_images": s["num_images"],
                   "seed": s["seed"], "img_size": self.img_size, "mean": self.mean, "std": self.std,
                   **settings.as_dict()}

        def build():
            x, y = zeroq_images(teacher, s["num_images"], self.img_size, self.mean, self.std, self.num_classes,
                                settings, s["seed"])
            return to_uint8(x, self.mean, self.std), as_labels(y)

        path = self.cache_dir / f"{s['method']}_n{s['num_images']}_seed{s['seed']}.npz"
        return load_or_build(path, sidecar, build)

    def train_dataloader(self):
        if len(self.train_set) < self.batch_size:
            raise ValueError(f"data.synthetic.num_images={len(self.train_set)} is smaller than the per-device batch "
                             f"{self.batch_size}: raise data.synthetic.num_images or lower data.batch_size")
        return super().train_dataloader()
