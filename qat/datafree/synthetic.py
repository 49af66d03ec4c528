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
from torch.utils.data import DataLoader
from torchvision import transforms as T

from qat.data.cifar import load_split, subset_per_class
from qat.data.datamodule import ArrayDataset, CIFARDataModule
from qat.data.sampler import mix
from qat.data.transforms import eval_transform
from qat.datafree.bn_stats import BNStatLoss
from qat.datafree.cache import as_labels, cache_name, load_or_build
from qat.datafree.generator import Generator, GDFQSettings, GDFQStream, generator_loss
from qat.datafree.images import gaussian_images, to_uint8
from qat.datafree.psaq import AttentionOutputs, PSAQSettings, psaq_images
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
        self.bank = self.cache_path = None  # (settings, synthesis function) of the cached methods; their file
        if s["method"] == "zeroq":
            self.bank = settings(ZeroQSettings, s["zeroq"], "zeroq"), zeroq_images
        elif s["method"] == "psaq":
            self.bank = settings(PSAQSettings, s["psaq"], "psaq"), psaq_images
        self.teacher, self.teacher_sha256 = load_fp_teacher(self.teacher_path, s["teacher_model"], self.num_classes)
        if s["method"] in ("zeroq", "gdfq"):
            check_has_bn(self.teacher, s["method"])
        if s["method"] == "psaq":
            AttentionOutputs(self.teacher)  # raises for a model without attention blocks
        self.train_transform = T.Compose([T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(self.mean, self.std)])
        self.gdfq = self.generator = None
        if s["method"] == "gdfq":
            self.gdfq = g = settings(GDFQSettings, s["gdfq"], "gdfq")
            self.generator = Generator(self.num_classes, self.img_size, self.mean, self.std, g.latent_dim)
            self.generator_optimizer = torch.optim.Adam(self.generator.parameters(), lr=g.lr, betas=tuple(g.betas))

    def setup(self, stage: str | None = None) -> None:
        if self.test_set is not None:
            return
        source = self.check_source()
        test = load_split(source, "test")
        keep = slice(None) if self.test_per_class is None else subset_per_class(
            test.labels, self.test_per_class, source.classes, "test")
        self.test_set = ArrayDataset(test.images[keep], test.labels[keep],
                                     eval_transform(self.img_size, self.mean, self.std))
        if self.generator is None:
            images, labels = self.make_images()
            self.train_set = ArrayDataset(images, labels, self.train_transform)
            log.info("data.synthetic: %d %s images from %s", len(labels), self.synthetic["method"], self.teacher_path)

    def make_images(self) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (N, H, W, C) images + labels of the image-bank methods (cached for zeroq / psaq)."""
        s, teacher = self.synthetic, self.teacher
        if s["method"] == "gaussian":
            x = gaussian_images(s["num_images"], self.img_size, self.mean, self.std, s["seed"])
            with torch.no_grad():
                y = torch.cat([teacher(b).argmax(-1) for b in x.split(256)])
            return to_uint8(x, self.mean, self.std), as_labels(y)
        settings, synthesize = self.bank
        sidecar = {"method": s["method"], "model_sha256": self.teacher_sha256, "num_images": s["num_images"],
                   "seed": s["seed"], "img_size": self.img_size, "mean": self.mean, "std": self.std,
                   **settings.as_dict()}

        def build():
            x, y = synthesize(teacher, s["num_images"], self.img_size, self.mean, self.std, self.num_classes,
                                settings, s["seed"])
            return to_uint8(x, self.mean, self.std), as_labels(y)

        self.cache_path = self.cache_dir / cache_name(s["method"], s["num_images"], s["seed"], settings)
        return load_or_build(self.cache_path, sidecar, build)

    # ---- gdfq: a generator trained alongside the student -----------------------------------------
    def _device(self) -> torch.device:
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        self.generator.to(device)
        self.teacher.to(device)
        return device

    def gdfq_batch(self, seed: int, n: int | None = None, train_generator: bool = True):
        """One generator step against the teacher (if `train_generator`), then a fresh batch (x, labels)."""
        n, g, k = n or self.batch_size, torch.Generator().manual_seed(seed), self.num_classes
        self._device()
        self.generator.train()
        if train_generator:
            with torch.enable_grad(), BNStatLoss(self.teacher) as hooks:
                x, targets = self.generator.sample(n, k, self.gdfq.boundary_fraction, g)
                loss = generator_loss(self.teacher, hooks, x, targets, self.gdfq.bn_weight)
                self.generator_optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.generator_optimizer.step()
        with torch.no_grad():
            x, targets = self.generator.sample(n, k, self.gdfq.boundary_fraction, g)
        return x, targets.argmax(-1)

    def state_dict(self) -> dict:
        """Saved in the Lightning checkpoint: the gdfq generator and its optimizer (nothing for image banks)."""
        if self.generator is None:
            return {}
        return {"generator": self.generator.state_dict(), "optimizer": self.generator_optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.generator is not None:
            self.generator.load_state_dict(state["generator"])
            self.generator_optimizer.load_state_dict(state["optimizer"])

    # ---- loaders -----------------------------------------------------------------------------
    def calibration_batch(self, n: int | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """`n` training images picked (image banks) or generated (gdfq, no generator step) by `seed`."""
        if self.generator is None:
            return super().calibration_batch(n, seed)
        x, y = self.gdfq_batch(mix(self.synthetic["seed"], -1 - seed), n, train_generator=False)
        return x.cpu(), y.cpu()

    def train_dataloader(self):
        if self.generator is not None:
            steps = self.synthetic["num_images"] // self.batch_size
            if steps < 1:
                raise ValueError(f"data.synthetic.num_images={self.synthetic['num_images']} (images per epoch) is "
                                 f"smaller than the per-device batch {self.batch_size}: raise it")
            return DataLoader(GDFQStream(self, steps), batch_size=None, num_workers=0)
        if len(self.train_set) < self.batch_size:
            raise ValueError(f"data.synthetic.num_images={len(self.train_set)} is smaller than the per-device batch "
                             f"{self.batch_size}: raise data.synthetic.num_images or lower data.batch_size")
        return super().train_dataloader()
