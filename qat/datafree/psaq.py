"""PSAQ-ViT (Li et al. 2022): images for BN-free vision transformers from patch-similarity diversity.

For every attention block, the patch tokens of its output (class token dropped) give a cosine-similarity matrix
per image; a Gaussian kernel density estimate of those similarities (bandwidth 0.01, evaluated on a grid of
`grid` points between the batch's min and max similarity) gives a differential entropy (trapezoidal rule over
-p log p). Images maximise the summed entropy (diverse patch similarities, as real images have) plus
cross-entropy towards sampled labels. Like the reference code, inputs get a random roll and flip each step.
"""
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qat.data.sampler import mix
from qat.datafree.images import pixel_bounds
from qat.models.layers import Attention


@dataclass(frozen=True)
class PSAQSettings:
    iters: int = 200
    lr: float = 0.2
    batch_size: int = 64
    ce_weight: float = 1.0
    bandwidth: float = 0.01
    grid: int = 10
    jitter: int = 2  # max roll in pixels

    def as_dict(self) -> dict:
        return asdict(self)


def patch_similarity_entropy(tokens: torch.Tensor, bandwidth: float = 0.01, grid: int = 10) -> torch.Tensor:
    """(B, N, d) patch tokens -> (B,) differential entropy of the KDE of their pairwise cosine similarities."""
    unit = F.normalize(tokens, dim=-1)
    sims = (unit @ unit.transpose(1, 2)).flatten(1)  # (B, N*N) cosine similarities, one matmul: no (B, N, N, d)
    lo, hi = sims.min().detach(), sims.max().detach()
    xs = torch.linspace(0, 1, grid, device=tokens.device) * (hi - lo) + lo  # (grid,)
    kernel = torch.exp(-(xs[None, :, None] - sims[:, None, :]) ** 2 / (2 * bandwidth ** 2))
    pdf = kernel.mean(-1) / math.sqrt(2 * math.pi * bandwidth ** 2) + 1e-4  # (B, grid)
    return torch.trapezoid(-pdf * pdf.log(), xs, dim=-1)


class AttentionOutputs:
    """Context manager collecting the output tokens of every Attention block (class token dropped)."""

    def __init__(self, model: nn.Module):
        self.blocks = [m for m in model.modules() if isinstance(m, Attention)]
        if not self.blocks:
            raise ValueError(f"data.synthetic.method=psaq needs a vision transformer with attention blocks; "
                             f"{type(model).__name__} has none: use data.synthetic.method=zeroq (BN models) "
                             "or gaussian")
        classifier = getattr(model, "classifier", None)
        self.skip = 1 if getattr(classifier, "class_emb", None) is not None else 0
        self.outputs, self.handles = [], []

    def __enter__(self) -> "AttentionOutputs":
        self.handles = [b.register_forward_hook(lambda m, i, o: self.outputs.append(o[:, self.skip:]))
                        for b in self.blocks]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()

    def entropy(self, s: PSAQSettings) -> torch.Tensor:
        """Summed mean entropy over the blocks of the last forward (then cleared)."""
        total = sum(patch_similarity_entropy(o, s.bandwidth, s.grid).mean() for o in self.outputs)
        self.outputs = []
        return total


def _jitter(x: torch.Tensor, s: PSAQSettings, g: torch.Generator) -> torch.Tensor:
    off = int(torch.randint(-s.jitter, s.jitter + 1, (1,), generator=g)) if s.jitter else 0
    x = torch.roll(x, shifts=(off, off), dims=(2, 3))
    return torch.flip(x, dims=(3,)) if torch.rand(1, generator=g).item() > 0.5 else x


def psaq_batch(model, hooks, n: int, img_size: int, mean, std, num_classes: int, s: PSAQSettings, seed: int):
    g = torch.Generator().manual_seed(seed)
    low, high = pixel_bounds(mean, std)
    x = torch.randn(n, len(mean), img_size, img_size, generator=g).clamp(low, high).requires_grad_(True)
    labels = torch.randint(num_classes, (n,), generator=g)
    opt = torch.optim.Adam([x], lr=s.lr, betas=(0.5, 0.9))
    for _ in range(s.iters):
        opt.zero_grad(set_to_none=True)
        logits = model(_jitter(x, s, g))
        loss = -hooks.entropy(s) + s.ce_weight * F.cross_entropy(logits, labels)
        loss.backward()
        opt.step()
        with torch.no_grad():
            x.copy_(torch.max(torch.min(x, high), low))
    return x.detach(), labels


def psaq_images(model: nn.Module, num_images: int, img_size: int, mean, std, num_classes: int,
                settings: PSAQSettings = PSAQSettings(), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`num_images` PSAQ images (normalized) + their sampled labels; batch i is seeded by (seed, i)."""
    hooks = AttentionOutputs(model)
    was, grads = model.training, [p.requires_grad for p in model.parameters()]
    model.eval().requires_grad_(False)
    xs, ys = [], []
    try:
        with hooks:
            for i, start in enumerate(range(0, num_images, settings.batch_size)):
                n = min(settings.batch_size, num_images - start)
                x, y = psaq_batch(model, hooks, n, img_size, mean, std, num_classes, settings, mix(seed, i))
                xs.append(x)
                ys.append(y)
    finally:
        model.train(was)
        for p, g in zip(model.parameters(), grads):
            p.requires_grad_(g)
    return torch.cat(xs), torch.cat(ys)
