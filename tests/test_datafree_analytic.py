"""Analytic data-free PTQ: BN folding, cross-layer equalization, bias absorption, BN-statistic bias correction."""
import pytest
import torch
from torch import nn

from qat.datafree import (OutputStats, absorb_bias_, bn_bias_correct_, channel_ranges, cross_layer_equalize_,
                          equalizable_links, find_links, fold_bn_, init_weight_quantizers_, rectified_gaussian_mean)
from qat.datafree.dfq import dfq_
from qat.models import create_model
from qat.quant import QuantConfig, quantize_, quantizers


def randomize_bn_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, so folding and equalizing have something to do."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.2)
            m.weight.data.copy_(torch.rand(n, generator=g) * 3 + 0.1)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.5)
    return model.eval()


class ToyConvBNConv(nn.Sequential):
    """conv 3x3 (no padding) -> BN -> ReLU -> conv 1x1: every pixel of the second conv sees the first's output."""

    def __init__(self):
        super().__init__(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 1))

    def forward(self, x, return_features=False):
        return super().forward(x)


def test_fold_bn_preserves_resnet20_eval_function():
    torch.manual_seed(0)
    model = randomize_bn_(create_model("resnet20"))
    x = torch.randn(4, 3, 32, 32)
    before = model(x)
    stats = fold_bn_(model)
    assert len(stats) == 19 and not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-4)


def test_cle_preserves_resnet20_and_equalizes_every_pair():
    torch.manual_seed(0)
    model = randomize_bn_(create_model("resnet20"))
    fold_bn_(model)
    x = torch.randn(4, 3, 32, 32)
    before = model(x)
    links = cross_layer_equalize_(model)
    assert [lk.first for lk in links] == [f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)]
    torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-4)
    for link in links:
        r1, r2 = channel_ranges(model, link)
        torch.testing.assert_close(r1, r2, rtol=1e-5, atol=0)


def test_cle_chain_converges_on_a_relu_mlp():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 9), nn.ReLU(), nn.Linear(9, 4))
    mlp.forward = lambda x, return_features=False, f=mlp.forward: f(x)  # the trace passes return_features
    with torch.no_grad():
        mlp[2].weight.mul_(torch.logspace(-2, 2, 9)[:, None])  # badly balanced channels
    x = torch.randn(16, 5)
    before = mlp(x)
    links = cross_layer_equalize_(mlp, max_iters=200, tol=1e-7)
    assert len(links) == 2  # 0 -> 2 and 2 -> 4: layer 2 is in both
    torch.testing.assert_close(mlp(x), before, rtol=1e-4, atol=1e-5)
    for link in links:
        r1, r2 = channel_ranges(mlp, link)
        torch.testing.assert_close(r1, r2, rtol=1e-4, atol=0)


def test_cle_rule_for_gelu_vits():
    with pytest.raises(ValueError, match="no conv/linear -> ReLU.*GELU.*use_relu=true"):
        cross_layer_equalize_(create_model("vit_2_4_32").eval())
    model = create_model("vit_2_4_32", use_relu=True).eval()
    links = equalizable_links(model)
    assert [lk.second for lk in links] == ["classifier.blocks.0.linear2", "classifier.blocks.1.linear2"]
    x = torch.randn(2, 3, 32, 32)
    before = model(x)
    cross_layer_equalize_(model)
    torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-4)


def test_bias_absorption_is_exact_where_activations_exceed_c():
    torch.manual_seed(0)
    model = randomize_bn_(ToyConvBNConv())
    model[1].bias.data.add_(4.0)  # mostly positive pre-activations: something to absorb
    stats = fold_bn_(model)
    x = torch.randn(8, 3, 10, 10)
    before = model(x)
    with torch.no_grad():
        z_min = model[0](x).amin(dim=(0, 2, 3))
    stats["0"] = OutputStats(z_min + 3.0, torch.ones(8))  # c = max(0, min z): ReLU(z - c) + c = ReLU(z) exactly
    absorbed = absorb_bias_(model, stats)
    assert absorbed["0"].gt(0).any()
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


def test_rectified_gaussian_mean_matches_sampling():
    mean, std = torch.tensor([-1.0, 0.0, 2.0, 0.5]), torch.tensor([1.0, 2.0, 0.5, 0.0])
    z = mean + std * torch.randn(400_000, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(rectified_gaussian_mean(mean, std), z.relu().mean(0), rtol=0, atol=1e-2)


def test_bn_stat_bias_correction_reduces_expected_output_error():
    torch.manual_seed(0)
    model = ToyConvBNConv()
    x = torch.randn(512, 3, 6, 6)
    model[1].momentum = None  # running stats = exact averages of the batch
    model.train()(x)
    with torch.no_grad():  # non-trivial affine BN so that E[x] of the second conv is far from 0
        model[1].weight.uniform_(0.5, 2.0)
        model[1].bias.uniform_(-0.5, 1.5)
    model.eval()
    stats = fold_bn_(model)
    reference = model(x).detach()
    quantize_(model, QuantConfig(weight={"bits": 3}, modules=["3"]))
    assert init_weight_quantizers_(model) == 1
    err_before = (model(x) - reference).mean(dim=(0, 2, 3)).abs()
    assert bn_bias_correct_(model, stats) == ["3"]
    err_after = (model(x) - reference).mean(dim=(0, 2, 3)).abs()
    assert err_before.max() > 0.05
    assert err_after.max() < 0.2 * err_before.max()


def test_links_of_resnet20():
    model = create_model("resnet20")
    links = find_links(model)
    # conv1 -> bn1 -> relu -> conv2 inside each block; the stem's output also feeds a shortcut (not exclusive)
    exclusive = [lk for lk in links if lk.exclusive]
    assert len(exclusive) == 9 and all(lk.bn == lk.first.replace("conv1", "bn1") for lk in exclusive)
    assert [lk.second for lk in links if not lk.exclusive] == ["layer1.0.conv1"]


def test_dfq_pipeline_preserves_the_fp_function_and_quantizes_the_weights():
    torch.manual_seed(0)
    fp = randomize_bn_(create_model("resnet20"))
    x = torch.randn(4, 3, 32, 32)
    reference = fp(x).detach()
    model, stats = dfq_(fp, QuantConfig(weight={"bits": 8, "init": "minmax"}), bias_correct=False)
    named = list(quantizers(model))
    assert len(named) == 18 and all(q.is_initialized for _, q in named) and len(stats) == 19
    for _, q in named:
        q.enabled = False
    # folding + CLE are exact; absorption is exact but at the zero-padded border (c is tiny with these statistics)
    torch.testing.assert_close(model(x), reference, rtol=1e-3, atol=1e-3)
    for _, q in named:
        q.enabled = True
    assert ((model(x) - reference).norm() / reference.norm()).item() < 0.15
