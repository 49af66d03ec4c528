"""Equality checks of exported models against the fake-quant model on test images."""
from pathlib import Path

import torch
from torch import nn

from qat.data import CIFARDataModule


def test_images(data: str, n: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` test images (eval transform), evenly spaced over the split so every class appears, and their labels;
    `data` is 'cifar10_sample' or a CIFAR root folder."""
    if data == "cifar10_sample":
        dm = CIFARDataModule(name="cifar10_sample", num_workers=0)
    else:
        if not Path(data).is_dir():
            raise FileNotFoundError(f"--data={data!r}: not 'cifar10_sample' and not a folder; pass cifar10_sample "
                                    "or a CIFAR root (pickles or train/ and test/ image folders)")
        dm = CIFARDataModule(name="cifar100" if num_classes == 100 else "cifar10", root=data, num_workers=0)
    dm.setup()
    picks = torch.linspace(0, len(dm.test_set) - 1, min(n, len(dm.test_set))).long().unique()
    xs, ys = zip(*(dm.test_set[i] for i in picks.tolist()))
    return torch.stack(xs), torch.tensor(ys)


@torch.no_grad()
def batched(fn, x: torch.Tensor, batch: int = 64) -> torch.Tensor:
    return torch.cat([fn(x[i:i + batch]).float() for i in range(0, len(x), batch)])


def compare(reference: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """Max |difference|, top-1 agreement with the reference and accuracy of `logits`."""
    return {"max_abs_diff": float((logits - reference).abs().max()),
            "top1_agreement": float((logits.argmax(1) == reference.argmax(1)).float().mean()),
            "accuracy": float((logits.argmax(1) == labels).float().mean())}


def run_checks(model: nn.Module, exported: dict, x: torch.Tensor, y: torch.Tensor) -> dict:
    """{'n', 'fake_quant': {'accuracy'}, name: compare(...)} for every callable in `exported` (name -> fn(x))."""
    reference = batched(model.eval(), x)
    result = {"n": len(x), "fake_quant": {"accuracy": float((reference.argmax(1) == y).float().mean())}}
    for name, fn in exported.items():
        result[name] = compare(reference, batched(fn, x), y)
    return result


def format_checks(result: dict) -> str:
    lines = [f"check on {result['n']} test images: fake-quant accuracy {result['fake_quant']['accuracy']:.4f}"]
    for name, r in result.items():
        if isinstance(r, dict) and "max_abs_diff" in r:
            lines.append(f"  {name:5s} vs fake-quant: max |diff| {r['max_abs_diff']:.3g}, top-1 agreement "
                         f"{r['top1_agreement']:.4f}, accuracy {r['accuracy']:.4f}")
    return "\n".join(lines)
