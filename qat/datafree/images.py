"""Synthetic images in the model's input space: bounds of valid pixels, uint8 round trip, Gaussian baseline."""
import numpy as np
import torch


def pixel_bounds(mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    """(low, high), shaped (1, C, 1, 1): normalized values of pixels 0 and 1."""
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    return -m / s, (1 - m) / s


def to_uint8(x: torch.Tensor, mean, std) -> np.ndarray:
    """Normalized (N, C, H, W) -> uint8 (N, H, W, C), as the CIFAR arrays are stored."""
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    pixels = ((x.detach().cpu() * s + m) * 255).round().clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).numpy()


def from_uint8(images: np.ndarray, mean, std) -> torch.Tensor:
    """uint8 (N, H, W, C) -> normalized float (N, C, H, W)."""
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    return (torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255 - m) / s


def gaussian_images(n: int, img_size: int, mean, std, seed: int) -> torch.Tensor:
    """The baseline: N(0, 1) in normalized space (= noise with the dataset's mean and std), clipped to valid pixels."""
    g = torch.Generator().manual_seed(seed)
    low, high = pixel_bounds(mean, std)
    return torch.max(torch.min(torch.randn(n, len(mean), img_size, img_size, generator=g), high), low)
