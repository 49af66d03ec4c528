"""One signedness rule for every activation quantizer (layer input or QuantPoint): the last matching
quant.signed_overrides pattern, else quant.act.signed / quant.attn.signed, else the model's non-negativity flags."""
import pytest
from hydra.utils import instantiate
from torch import nn

from conftest import compose_config
from qat.models import QuantPoint, create_model
from qat.quant import QuantConfig, quantize_, quantizers

LINEAR1, LINEAR2 = "classifier.blocks.*.linear1", "classifier.blocks.*.linear2"


def unsigned_act_layers(model) -> set[str]:
    return {n.split(".")[-2] for n, q in quantizers(model) if n.endswith("act_quantizer") and not q.signed}


@pytest.mark.parametrize("extra,unsigned_layers", [
    ({}, {"linear2"}),  # the model says linear2's input is post-ReLU
    ({"signed_overrides": {LINEAR1: False}}, {"linear1", "linear2"}),  # reference §3.6 (every 'linear')
    ({"signed_overrides": {LINEAR2: True}}, set()),
])
def test_activation_signedness(extra, unsigned_layers):
    model = create_model("vit_2_4_32", use_relu=True)
    quantize_(model, QuantConfig(act={"bits": 2}, **extra))
    assert unsigned_act_layers(model) == unsigned_layers


def test_explicit_act_signed_applies_everywhere_but_overrides_win():
    model = quantize_(create_model("vit_2_4_32", use_relu=True), QuantConfig(act={"bits": 2, "signed": False}))
    assert {q.signed for _, q in quantizers(model)} == {False}
    model = quantize_(create_model("vit_2_4_32", use_relu=True),
                      QuantConfig(act={"bits": 2, "signed": False}, signed_overrides={"*.0.linear1": True}))
    assert [n for n, q in quantizers(model) if q.signed] == ["classifier.blocks.0.linear1.act_quantizer"]


def test_the_last_matching_override_wins():
    model = quantize_(create_model("vit_2_4_32"),
                      QuantConfig(act={"bits": 2}, signed_overrides={"*": False, LINEAR1: True}))
    assert unsigned_act_layers(model) == {"qkv", "proj", "linear2"}


@pytest.mark.parametrize("extra,probs,q", [
    ({}, (0, 2), (-1, 1)),  # auto: the softmax QuantPoint is non_negative
    ({"attn": {"bits": 2, "signed": True}}, (-1, 1), (-1, 1)),  # the log's first 'attn q' runs
    ({"signed_overrides": {"*.attn_quant": True}}, (-1, 1), (-1, 1)),
    ({"signed_overrides": {"*.q_quant": False}}, (0, 2), (0, 2)),
])
def test_attention_points_follow_the_same_rule(extra, probs, q):
    model = quantize_(create_model("vit_2_4_32"), QuantConfig(**{"attn": {"bits": 2}, **extra}))
    attn = model.classifier.blocks[1].self_attn
    assert (attn.attn_quant.qmin, attn.attn_quant.qmax) == probs
    assert (attn.q_quant.qmin, attn.q_quant.qmax) == q and (attn.k_quant.qmin, attn.k_quant.qmax) == (-1, 1)


def test_quant_point_flag_not_its_kind_decides():
    model = nn.Sequential(QuantPoint("v", non_negative=True), QuantPoint("attn_probs"))
    quantize_(model, QuantConfig(attn={"bits": 4}))
    assert [(model[0].qmin, model[0].qmax), (model[1].qmin, model[1].qmax)] == [(0, 14), (-7, 7)]


@pytest.mark.parametrize("kwargs,match", [
    ({"unsigned": [LINEAR1]}, r"quant.unsigned was replaced by quant.signed_overrides: write "
                              r"quant.signed_overrides=\{classifier.blocks.\*.linear1: false\}"),
    ({"signed": ["*.linear2"]}, r"quant.signed was replaced by .*=\{\*.linear2: true\}"),
    ({"attn": {"bits": 2, "probs_signed": True}}, r"quant.attn.probs_signed was replaced by quant.attn.signed"),
])
def test_removed_keys_name_the_new_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantConfig(**kwargs)


def test_old_default_values_still_load():
    # recipes of runs written before the change hold unsigned: [], signed: [], attn.probs_signed: false
    cfg = QuantConfig(act={"bits": 2}, attn={"bits": 2, "probs_signed": False}, unsigned=[], signed=[])
    assert cfg.signed_overrides == {} and cfg.attn.signed is None


def test_override_errors():
    with pytest.raises(ValueError, match=r"quant.signed_overrides: pattern '\*.linear3' matches no Linear/Conv2d "
                                         r"module or attention QuantPoint"):
        quantize_(create_model("vit_2_4_32"), QuantConfig(act={"bits": 2}, signed_overrides={"*.linear3": False}))
    with pytest.raises(TypeError, match=r"quant.signed_overrides must map fnmatch patterns to true/false"):
        QuantConfig(act={"bits": 2}, signed_overrides={LINEAR1: "no"})


def test_command_line_override(tmp_path):
    cfg = compose_config(["quant=act2b", "quant.signed_overrides={classifier.blocks.*.linear1:false}"], tmp_path)
    model = quantize_(create_model("vit_2_4_32"), instantiate(cfg.quant, _convert_="all"))
    assert unsigned_act_layers(model) == {"linear1"}
