"""PSAQ-ViT: patch-similarity entropy, images for BN-free ViTs, the psaq data module."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from qat.data.transforms import CIFAR10_MEAN, CIFAR10_STD
from qat.datafree.images import gaussian_images
from qat.datafree.psaq import AttentionOutputs, PSAQSettings, patch_similarity_entropy, psaq_images
from qat.models import create_model
from test_datafree_synthetic import fp_resnet20, fp_vit, module  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: threads only cost on a shared CPU


def test_entropy_is_higher_for_diverse_patch_similarities():
    g = torch.Generator().manual_seed(0)
    same = torch.randn(1, 1, 8, generator=g).expand(4, 64, 8) + 0.05 * torch.randn(4, 64, 8, generator=g)
    diverse = torch.randn(4, 64, 8, generator=g)  # measured: about 0.37 vs -1.6
    assert (patch_similarity_entropy(diverse) > patch_similarity_entropy(same) + 0.5).all()


def entropy_of(model, x, s=PSAQSettings()) -> float:
    with torch.no_grad(), AttentionOutputs(model) as hooks:
        model(x)
        return hooks.entropy(s).item()


def test_entropy_uses_the_cosine_similarities_of_every_token_pair():
    torch.manual_seed(0)
    tokens = torch.randn(3, 16, 8)
    sims = F.cosine_similarity(tokens.unsqueeze(1), tokens.unsqueeze(2), dim=-1).flatten(1)  # textbook (B, N*N)
    lo, hi = sims.min(), sims.max()
    xs = torch.linspace(0, 1, 10) * (hi - lo) + lo
    pdf = torch.exp(-(xs[None, :, None] - sims[:, None, :]) ** 2 / (2 * 0.01 ** 2)).mean(-1) / math.sqrt(
        2 * math.pi * 0.01 ** 2) + 1e-4
    torch.testing.assert_close(patch_similarity_entropy(tokens), torch.trapezoid(-pdf * pdf.log(), xs, dim=-1))


def test_psaq_images_raise_patch_similarity_entropy_over_gaussian():
    torch.manual_seed(0)
    model = create_model("vit_2_4_32").eval()
    settings = PSAQSettings(iters=5, batch_size=4, lr=0.1)
    x, y = psaq_images(model, 4, 32, CIFAR10_MEAN, CIFAR10_STD, 10, settings, seed=0)
    gauss = gaussian_images(4, 32, CIFAR10_MEAN, CIFAR10_STD, seed=0)
    assert entropy_of(model, x) > entropy_of(model, gauss)
    assert x.shape == (4, 3, 32, 32) and y.shape == (4,)
    short = PSAQSettings(iters=1, batch_size=2)
    again, _ = psaq_images(model, 2, 32, CIFAR10_MEAN, CIFAR10_STD, 10, short, seed=0)
    assert torch.equal(again, psaq_images(model, 2, 32, CIFAR10_MEAN, CIFAR10_STD, 10, short, seed=0)[0])


def test_psaq_module_caches_images_of_a_vit(fp_vit, tmp_path):
    dm = module(fp_vit, tmp_path, method="psaq", num_images=8, psaq={"iters": 1, "batch_size": 8})
    dm.setup()
    sidecar = json.loads(dm.cache_path.with_suffix(".json").read_text())
    assert sidecar["method"] == "psaq" and sidecar["model_sha256"] == dm.teacher_sha256
    assert dm.train_set.images.shape == (8, 32, 32, 3)


def test_psaq_refuses_a_model_without_attention(fp_resnet20, tmp_path):
    with pytest.raises(ValueError, match="psaq needs a vision transformer.*use data.synthetic.method=zeroq"):
        module(fp_resnet20, tmp_path, method="psaq")
