"""GDFQ (Xu et al. 2020): a class-conditional generator trained against the FP model while the student trains.

Generator loss: cross-entropy of the FP model on the generated image towards its label + `bn_weight` x the
BN-statistic loss (the FP model's BatchNorm running statistics). Qimera (Choi et al. 2021) option:
`boundary_fraction` of each batch uses superposed label embeddings lam * e_a + (1 - lam) * e_b with soft
targets (lam on a, 1 - lam on b), samples near the decision boundary. Every training step of the student
draws a fresh batch after one generator step (`GDFQStream`), so the generator keeps changing with training.
"""
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import IterableDataset

from qat.data.sampler import mix
from qat.datafree.bn_stats import BNStatLoss
from qat.datafree.images import pixel_bounds


@dataclass(frozen=True)
class GDFQSettings:
    latent_dim: int = 100
    lr: float = 1e-3
    betas: tuple[float, float] = (0.5, 0.999)
    bn_weight: float = 0.1
    boundary_fraction: float = 0.0  # Qimera: share of each batch made of superposed-embedding samples

    def as_dict(self) -> dict:
        return asdict(self)


class Generator(nn.Module):
    """GDFQ's CIFAR generator: (noise * label embedding) -> fc -> 2x (upsample, conv, BN, LeakyReLU) -> conv.

    The output is squashed into the valid normalized pixel range [low, high] of the dataset (`pixel_bounds`).
    """

    def __init__(self, num_classes: int, img_size: int, mean, std, latent_dim: int = 100):
        super().__init__()
        self.latent_dim, self.init_size = latent_dim, img_size // 4
        self.label_emb = nn.Embedding(num_classes, latent_dim)
        self.fc = nn.Linear(latent_dim, 128 * self.init_size ** 2)
        self.body = nn.Sequential(
            nn.BatchNorm2d(128), nn.Upsample(scale_factor=2), nn.Conv2d(128, 128, 3, padding=1),
            nn.BatchNorm2d(128), nn.LeakyReLU(0.2), nn.Upsample(scale_factor=2), nn.Conv2d(128, 64, 3, padding=1),
            nn.BatchNorm2d(64), nn.LeakyReLU(0.2), nn.Conv2d(64, len(mean), 3, padding=1))
        low, high = pixel_bounds(mean, std)
        self.register_buffer("low", low, persistent=False)
        self.register_buffer("high", high, persistent=False)

    def forward(self, z: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        h = self.fc(z * embedding).view(len(z), 128, self.init_size, self.init_size)
        return self.low + (self.high - self.low) * (torch.tanh(self.body(h)) + 1) / 2

    def sample(self, n: int, num_classes: int, boundary_fraction: float, g: torch.Generator):
        """(images, soft targets (n, classes)): labels uniform; the first boundary_fraction * n superposed."""
        device = self.fc.weight.device
        z = torch.randn(n, self.latent_dim, generator=g).to(device)
        a, b = torch.randint(num_classes, (2, n), generator=g).to(device)
        lam = torch.ones(n, device=device)
        k = int(round(boundary_fraction * n))
        lam[:k] = torch.rand(k, generator=g).to(device)
        emb = lam[:, None] * self.label_emb(a) + (1 - lam[:, None]) * self.label_emb(b)
        targets = lam[:, None] * F.one_hot(a, num_classes) + (1 - lam[:, None]) * F.one_hot(b, num_classes)
        return self(z, emb), targets


def generator_loss(teacher: nn.Module, hooks: BNStatLoss, x: torch.Tensor, targets: torch.Tensor,
                   bn_weight: float) -> torch.Tensor:
    """CE of the FP model towards the (soft) targets + bn_weight x its BN-statistic loss on `x`."""
    logits = teacher(x)
    return F.cross_entropy(logits, targets) + bn_weight * hooks.loss()


class GDFQStream(IterableDataset):
    """`steps` batches per epoch; each: one generator step against the teacher, then a fresh batch (no grad).

    Noise and labels of (epoch, step) come from seed (seed, epoch, step), so a run resumed at an epoch boundary
    with the generator and optimizer restored draws the same batches as an uninterrupted one.
    """

    def __init__(self, owner, steps: int):
        self.owner, self.steps = owner, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        dm = self.owner
        epoch, rank = (dm.trainer.current_epoch, dm.trainer.global_rank) if dm.trainer is not None else (0, 0)
        for step in range(self.steps):
            yield dm.gdfq_batch(mix(dm.synthetic["seed"], epoch, step, rank))
