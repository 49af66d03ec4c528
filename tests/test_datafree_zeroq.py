"""ZeroQ: BN-statistic matching, determinism, the uint8 cache and its sidecar."""
import numpy as np
import pytest
import torch
from torch import nn

from qat.data.transforms import CIFAR10_MEAN, CIFAR10_STD
from qat.datafree.bn_stats import bn_stat_loss
from qat.datafree.cache import load_or_build
from qat.datafree.images import from_uint8, gaussian_images, pixel_bounds, to_uint8
from qat.datafree.zeroq import ZeroQSettings, check_has_bn, zeroq_images
from qat.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: threads only cost on a shared CPU


BOUND = 0.1  # BN-statistic loss of TinyBNNet's ZeroQ images after the default iterations (measured ~0.02)


class TinyBNNet(nn.Module):
    """conv-BN-ReLU x2 -> pool -> fc on 8x8 images; BN statistics of smooth 'natural' images (reachable)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(123)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.fc = nn.Linear(8, 4)
        smooth = nn.functional.interpolate(torch.rand(256, 3, 2, 2) * 3 - 1.5, size=8, mode="bilinear")
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None  # running statistics = the averages over `smooth`
        with torch.no_grad():
            self.train()(smooth)
        self.eval()

    def forward(self, x, return_features=False):
        f = self.body(x)
        logits = self.fc(f.mean((2, 3)))
        return (logits, [f]) if return_features else logits


def make(settings=ZeroQSettings(batch_size=32), n=32, seed=0):
    return zeroq_images(TinyBNNet().eval(), n, 8, CIFAR10_MEAN, CIFAR10_STD, 4, settings, seed=seed)


def test_zeroq_matches_bn_statistics_far_better_than_gaussian():
    x, y = make()
    model = TinyBNNet()
    gauss = bn_stat_loss(model, gaussian_images(32, 8, CIFAR10_MEAN, CIFAR10_STD, seed=0))
    ours = bn_stat_loss(model, x)
    assert ours < BOUND and ours < gauss / 10, (ours, gauss)
    low, high = pixel_bounds(CIFAR10_MEAN, CIFAR10_STD)
    assert x.shape == (32, 3, 8, 8) and (x >= low - 1e-6).all() and (x <= high + 1e-6).all()
    assert y.shape == (32,) and y.dtype == torch.int64


def test_zeroq_is_deterministic_for_a_seed():
    short = ZeroQSettings(batch_size=32, iters=20)
    a, ya = make(short, n=40)  # two batches: 32 + 8
    b, yb = make(short, n=40)
    assert torch.equal(a, b) and torch.equal(ya, yb)
    c, _ = make(short, n=40, seed=1)
    assert not torch.equal(a, c)


def test_zeroq_options_knowledge_within_and_intraq():
    settings = ZeroQSettings(batch_size=32, iters=100, ce_weight=1.0, intra_weight=1.0)
    x, y = make(settings)
    model = TinyBNNet()
    with torch.no_grad():
        agree = (model(x).argmax(-1) == y).float().mean()
    assert agree > 0.9  # CE pulls images to their sampled labels


def test_uint8_round_trip_is_within_half_a_level():
    x = gaussian_images(4, 8, CIFAR10_MEAN, CIFAR10_STD, seed=0)
    back = from_uint8(to_uint8(x, CIFAR10_MEAN, CIFAR10_STD), CIFAR10_MEAN, CIFAR10_STD)
    step = 1 / 255 / torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    assert ((back - x).abs() <= step / 2 + 1e-6).all()


def test_cache_reuses_matching_sidecar_and_rebuilds_another_models(tmp_path, caplog):
    calls = []

    def build():
        calls.append(1)
        return np.full((2, 8, 8, 3), len(calls), np.uint8), np.zeros(2, np.int64)

    path = tmp_path / "zeroq_n2_seed0.npz"
    first, _ = load_or_build(path, {"model_sha256": "aaa", "iters": 5}, build)
    again, _ = load_or_build(path, {"model_sha256": "aaa", "iters": 5}, build)
    assert len(calls) == 1 and np.array_equal(first, again)  # reused: no second synthesis
    other, _ = load_or_build(path, {"model_sha256": "bbb", "iters": 5}, build)
    assert len(calls) == 2 and other[0, 0, 0, 0] == 2 and "made for something else (model_sha256" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zeroq_n2_seed0.json", "zeroq_n2_seed0.npz"]


def test_zeroq_refuses_a_model_without_batchnorm():
    with pytest.raises(ValueError, match="no BatchNorm layer: use data.synthetic.method=psaq.*gaussian"):
        check_has_bn(create_model("vit_2_4_32"))
