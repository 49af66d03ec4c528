"""Model zoo: every registered model end to end, exact parameter counts, attention paths, spec details."""
import fnmatch
import math

import pytest
import torch
from torch import nn

from qat.models import (CCT, CifarResNet, CompactTransformer, QatModel, QuantPoint, TimmModel, ViTLite, create_model,
                        list_models)
from qat.models.layers import TokenBatchNorm, TransformerEncoderLayer, sinusoidal_embedding
from qat.models.resnet_cifar import BasicBlock

SEED = 123


def images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(SEED))


def expected_feature_shapes(name: str) -> list[tuple[int, ...]]:
    if name.startswith("resnet"):
        return [(2, 16, 32, 32), (2, 32, 16, 16), (2, 64, 8, 8)]
    layers = int(name.split("_")[1])
    dim = 128 if layers in (2, 4) else 256
    tokens = 65 if name.startswith("vit") else {"3x1": 256, "3x2": 64}[name.split("_")[2]]
    return [(2, tokens, dim)] * (layers + 1)


@pytest.mark.parametrize("name", list_models())
def test_registered_model_forward_backward(name):
    torch.manual_seed(SEED)
    model = create_model(name)
    logits, features = model(images(), return_features=True)
    assert logits.shape == (2, 10)
    assert torch.isfinite(logits).all()
    assert [tuple(f.shape) for f in features] == expected_feature_shapes(name)
    logits.logsumexp(-1).sum().backward()
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name}: no gradient for {pname}"
            assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient for {pname}"
    modules = dict(model.named_modules())
    for pattern in model.default_quant_modules:
        matched = fnmatch.filter(modules, pattern)
        assert matched, f"{name}: quant pattern {pattern!r} matches nothing"
        assert all(isinstance(modules[m], (nn.Linear, nn.Conv2d)) for m in matched)


def test_every_family_implements_the_protocol_once():
    for name in ("vit_2_4_32", "cct_2_3x2_32", "resnet20", "resnet10t"):
        model = create_model(name)
        assert isinstance(model, QatModel) and type(model).forward is QatModel.forward
        assert isinstance(model.default_quant_modules, list) and isinstance(model.non_negative_inputs, list)

    class HeadMissing(QatModel):
        def forward_features(self, x):
            return x, [x]

    with pytest.raises(TypeError, match="abstract method.*forward_head"):
        HeadMissing()


@pytest.mark.parametrize("name, num_classes, total, trainable", [
    ("vit_2_4_32", 10, 214_666, 214_666),
    ("vit_4_4_32", 10, 413_066, 413_066),
    ("vit_6_4_32", 10, 3_190_538, 3_190_538),
    ("vit_6_4_32_sine", 10, 3_190_538, 3_173_898),
    ("vit_7_4_32", 10, 3_716_874, 3_716_874),
    ("vit_6_4_32", 100, 3_213_668, 3_213_668),
    ("cct_2_3x2_32", 10, 283_723, 283_723),
    ("cct_4_3x2_32", 10, 482_123, 482_123),
    ("cct_6_3x1_32", 10, 3_233_803, 3_233_803),
    ("cct_6_3x2_32", 10, 3_326_923, 3_326_923),
    ("cct_7_3x1_32", 10, 3_760_139, 3_760_139),
    ("cct_7_3x2_32", 10, 3_853_259, 3_853_259),
    ("cct_7_3x1_32", 100, 3_783_269, 3_783_269),
    ("resnet20", 10, 269_722, 269_722),
    ("resnet56", 10, 853_018, 853_018),  # option A; 855,770 would need 1x1-conv (option B) shortcuts
])
def test_parameter_counts(name, num_classes, total, trainable):
    model = create_model(name, num_classes=num_classes)
    assert sum(p.numel() for p in model.parameters()) == total
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable


def test_original_module_names():
    vit = create_model("vit_2_4_32", label_head=True).state_dict()
    for key in ["tokenizer.conv_layers.0.0.weight", "tokenizer.conv_layers.0.0.bias", "classifier.class_emb",
                "classifier.positional_emb", "classifier.blocks.1.pre_norm.weight",
                "classifier.blocks.1.self_attn.qkv.weight", "classifier.blocks.1.self_attn.proj.bias",
                "classifier.blocks.1.linear1.weight", "classifier.blocks.1.norm1.weight",
                "classifier.blocks.1.linear2.weight", "classifier.norm.weight", "classifier.fc.weight",
                "classifier.fc_label.weight"]:
        assert key in vit
    assert "classifier.blocks.0.self_attn.qkv.bias" not in vit
    assert vit["classifier.class_emb"].shape == (1, 1, 128)
    cct = create_model("cct_2_3x2_32").state_dict()
    assert {"tokenizer.conv_layers.1.0.weight", "classifier.attention_pool.weight"} <= set(cct)
    assert "tokenizer.conv_layers.0.0.bias" not in cct and "classifier.class_emb" not in cct


def test_dropout_rates_and_init():
    torch.manual_seed(SEED)
    model = create_model("vit_6_4_32")
    c = model.classifier
    assert c.dropout.p == 0.0
    assert [b.self_attn.attn_drop.p for b in c.blocks] == [0.1] * 6
    assert [b.dropout1.p for b in c.blocks] == [0.0] * 6 and c.blocks[0].self_attn.proj_drop.p == 0.0
    assert isinstance(c.blocks[0].drop_path, nn.Identity)
    assert [b.drop_path.drop_prob for b in c.blocks[1:]] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1])
    assert torch.equal(c.class_emb, torch.zeros(1, 1, 256))
    qkv, fc1 = c.blocks[0].self_attn.qkv, c.blocks[0].linear1
    assert qkv.bias is None and torch.equal(fc1.bias, torch.zeros(512))
    assert qkv.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert c.positional_emb.std().item() == pytest.approx(0.2, rel=0.05)
    assert torch.equal(c.blocks[0].pre_norm.weight, torch.ones(256))
    conv = model.tokenizer.conv_layers[0][0]
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / 48), rel=0.05)


class PassThrough(nn.Module):
    """Not a QuantPoint, so attention takes the explicit path; records the probabilities it sees."""

    def forward(self, x):
        self.seen = x
        return x


def test_fused_and_explicit_attention_agree(monkeypatch):
    torch.manual_seed(SEED)
    model = create_model("vit_2_4_32").eval()
    sdpa_calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: sdpa_calls.append(1) or sdpa(*a, **k))
    x = images()
    fused = model(x)
    assert len(sdpa_calls) == 2
    for block in model.classifier.blocks:
        block.self_attn.attn_quant = PassThrough()
    explicit = model(x)
    assert len(sdpa_calls) == 2
    torch.testing.assert_close(explicit, fused, atol=1e-6, rtol=0)
    probs = model.classifier.blocks[0].self_attn.attn_quant.seen
    assert probs.shape == (2, 2, 65, 65) and probs.min() >= 0
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, 65))


def test_attention_quant_points():
    attn = create_model("cct_2_3x2_32").classifier.blocks[0].self_attn
    kinds = {n: (m.kind, m.non_negative) for n, m in attn.named_children() if isinstance(m, QuantPoint)}
    assert kinds == {"q_quant": ("q", False), "k_quant": ("k", False), "v_quant": ("v", False),
                     "attn_quant": ("attn_probs", True)}


def test_sine_table_values_and_frozen():
    pe = sinusoidal_embedding(4, 8)[0]
    assert pe.shape == (4, 8)
    assert pe[0].tolist() == [0.0, 1.0] * 4
    expected = {(1, 0): math.sin(1.0), (1, 1): math.cos(1.0), (2, 2): math.sin(0.2), (3, 5): math.cos(0.03),
                (3, 7): math.cos(3 / 10000 ** 0.75)}
    for (p, i), value in expected.items():
        assert pe[p, i].item() == pytest.approx(value, abs=1e-7), (p, i)
    model = create_model("vit_2_4_32_sine")
    emb = model.classifier.positional_emb
    assert isinstance(emb, nn.Parameter) and not emb.requires_grad
    assert torch.equal(emb, sinusoidal_embedding(65, 128))


def test_encoder_block_layernorm_quirk():
    torch.manual_seed(SEED)
    block = TransformerEncoderLayer(8, 2, 16).eval()
    x = torch.randn(2, 5, 8)
    h = block.norm1(x + block.self_attn(block.pre_norm(x)))  # the residual stream becomes norm1(...)
    expected = h + block.linear2(nn.functional.gelu(block.linear1(h)))
    torch.testing.assert_close(block(x), expected, atol=0, rtol=0)


@pytest.mark.parametrize("cls", [ViTLite, CCT])
def test_options(cls):
    kw = dict(embedding_dim=32, num_layers=1, num_heads=2, mlp_ratio=1)
    relu = cls(use_relu=True, **kw)
    assert isinstance(relu.classifier.blocks[0].activation, nn.ReLU)
    assert relu.non_negative_inputs == ["classifier.blocks.*.linear2"]
    assert cls(**kw).non_negative_inputs == []
    bn = cls(norm="bn", label_head=True, **kw)
    assert sum(isinstance(m, TokenBatchNorm) for m in bn.modules()) == 3
    pooled, _ = bn.forward_features(images())
    assert bn.forward_head(pooled, label=True).shape == (2, 10)
    with pytest.raises(ValueError, match="label_head=True"):
        cls(**kw).forward_head(pooled, label=True)
    assert cls(positional_embedding="none", **kw).classifier.positional_emb is None
    with pytest.raises(ValueError, match="positional_embedding='sinus'.*'learnable', 'sine' or 'none'"):
        cls(positional_embedding="sinus", **kw)
    with pytest.raises(ValueError, match="norm='gn'.*'ln' or 'bn'"):
        cls(norm="gn", **kw)


def test_resnet_option_a_shortcut_and_quant_modules():
    block = BasicBlock(16, 32, stride=2)
    x = torch.randn(2, 16, 8, 8)
    short = block.shortcut(x)
    assert short.shape == (2, 32, 4, 4)
    assert torch.equal(short[:, 8:24], x[:, :, ::2, ::2])
    assert short[:, :8].abs().sum() == 0 and short[:, 24:].abs().sum() == 0
    model = create_model("resnet20")
    assert isinstance(model, CifarResNet)
    convs = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)} - {"conv1"}
    quantized = {n for n, _ in model.named_modules() if any(fnmatch.fnmatch(n, p) for p in model.default_quant_modules)}
    assert quantized == convs and len(convs) == 18
    with pytest.raises(ValueError, match="depth=21"):
        CifarResNet(depth=21)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        create_model("vit_6_4_23")
    msg = str(err.value)
    assert "Did you mean 'vit_6_4_32'" in msg
    assert all(name in msg for name in list_models()) and "timm" in msg
    with pytest.raises(ValueError, match="pretrained=True"):
        create_model("vit_2_4_32", pretrained=True)


def test_list_models_pattern():
    assert list_models("cct_7_*") == ["cct_7_3x1_32", "cct_7_3x1_32_sine", "cct_7_3x2_32", "cct_7_3x2_32_sine"]
    assert isinstance(create_model("cct_2_3x2_32_sine", num_classes=100), CompactTransformer)


def test_timm_fallback_with_blocks():
    torch.manual_seed(SEED)
    model = create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=2).eval()
    assert isinstance(model, TimmModel)
    x = images()
    logits, features = model(x, return_features=True)
    assert logits.shape == (2, 10)
    assert [tuple(f.shape) for f in features] == [(2, 65, 192)] * 2
    torch.testing.assert_close(logits, model.model(x), atol=0, rtol=0)
    assert model.default_quant_modules == [f"model.blocks.{i}.{layer}" for i in range(2)
                                           for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    with pytest.raises(ValueError, match="label"):
        model.forward_head(logits, label=True)


def test_timm_fallback_without_blocks():
    model = create_model("resnet10t", num_classes=7).eval()
    pooled, features = model.forward_features(images())
    assert pooled.shape == (2, 512) and len(features) == 1 and features[0] is pooled
    assert model.forward_head(pooled).shape == (2, 7)
    assert "model.conv1.0" not in model.default_quant_modules and "model.fc" not in model.default_quant_modules
    assert "model.layer1.0.conv1" in model.default_quant_modules
