"""Seed 003's general form: each learnt set trains exactly its tensors, folding is exact and free, QDrop drops."""
import dataclasses
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from torch import nn

from qat.ptq import pipeline, reconstruct
from qat.ptq.calibrate import calibrate
from qat.ptq.observers import create_observer
from qat.ptq.recon_weight import ReconWeight, attach_, fold_
from qat.ptq.reconstruct import ReconConfig, dropping, fit_unit, reconstruct_, units
from qat.models import create_model
from qat.quant import LSQQuantizer, QuantConfig, quantize_, quantizers_off

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: threads only cost on a shared CPU
CONF = Path(__file__).resolve().parents[1] / "conf"


def toy(kind: str, per_channel: bool, offset: bool = False, act_bits=4):
    """A calibrated one-layer model (Linear 24->12 or Conv 6->8) and its inputs."""
    torch.manual_seed(0)
    layer = nn.Linear(24, 12) if kind == "linear" else nn.Conv2d(6, 8, 3, padding=1, bias=False)
    model = nn.Sequential(layer)
    weight = {"bits": 3, "per_channel": per_channel, "learnable_offset": offset, "symmetric": not offset}
    quantize_(model, QuantConfig(weight=weight, act={"bits": act_bits}, add_bias=True))
    x = torch.randn(64, 24) * torch.linspace(0.2, 3, 24) if kind == "linear" else torch.randn(16, 6, 8, 8)
    calibrate(model, [x], create_observer("mse", grid=20))
    if offset:
        with torch.no_grad():
            model[0].weight_quantizer.offset.fill_(0.01)
    return model, x


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("per_channel,offset", [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize("rounding", ["adaround", "nearest"])
def test_fold_equals_the_unfolded_form_and_adds_nothing(kind, per_channel, offset, rounding):
    model, x = toy(kind, per_channel, offset)
    layer = model[0]
    keys = {k: v.shape for k, v in model.state_dict().items()}
    learn = ("alpha",) * (rounding == "adaround") + ("s_w_dq", "xi", "eta")
    rw = attach_(layer, rounding, learn)
    torch.manual_seed(1)
    with torch.no_grad():
        rw.s_dq.mul_(1 + 0.2 * torch.rand_like(rw.s_dq))
        rw.xi.copy_(0.5 + torch.rand_like(rw.xi))
        rw.eta.copy_(torch.randn_like(rw.eta))
        if rw.alpha is not None:
            rw.alpha.copy_(torch.randn_like(rw.alpha))
        rw.hard = True
        unfolded = model.eval()(x)
    fold_(layer)
    assert isinstance(layer.weight_quantizer, LSQQuantizer) and not layer._forward_hooks
    assert {k: v.shape for k, v in model.state_dict().items()} == keys  # same parameters, same shapes
    with torch.no_grad():
        torch.testing.assert_close(model(x), unfolded, atol=1e-5, rtol=1e-5)
        codes = layer.weight_quantizer.levels(layer.weight)
        torch.testing.assert_close(layer.weight_quantizer(layer.weight), layer.weight, atol=1e-6, rtol=0)
    q = layer.weight_quantizer
    assert float(codes.min()) >= q.qmin and float(codes.max()) <= q.qmax


def test_nearest_rounding_with_learnt_step_has_the_lsq_gradient():
    model, _ = toy("linear", per_channel=False)
    layer = model[0]
    rw = ReconWeight(layer.weight_quantizer, layer, "nearest", ("s_w",))
    rw.s_w.requires_grad_(True)
    rw(layer.weight.detach()).sum().backward()
    v = layer.weight.detach() / rw.s_w.detach()
    inside = (v >= rw.qmin) & (v <= rw.qmax)  # LSQ: d(s * round(clamp(W / s))) / ds = round(v) - v inside
    expected = (v.clamp(rw.qmin, rw.qmax).round() - v * inside).sum()
    torch.testing.assert_close(rw.s_w.grad, expected.reshape(1), atol=1e-4, rtol=1e-5)


LEARNT = {  # learnt set -> (act step, weight step, codes, bias) expected to change
    ("alpha",): (False, False, True, False),
    ("alpha", "s_x"): (True, False, True, False),
    ("alpha", "s_w_dq"): (False, True, True, False),
    ("alpha", "xi", "eta"): (False, True, True, True),
    ("s_x", "b"): (True, False, False, True),
    ("s_w", "w"): (False, True, None, False),
    ("alpha", "s_w"): (False, True, True, False),
}


@pytest.mark.parametrize("learn", list(LEARNT))
def test_each_learnt_set_changes_exactly_its_tensors(learn):
    model, x = toy("linear", per_channel=True)
    layer = model[0]
    with quantizers_off(model):
        y = model(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    codes = layer.weight_quantizer.levels(layer.weight)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    rounding = "adaround" if "alpha" in learn else "nearest"
    with torch.enable_grad():
        fit_unit(model.eval(), x, y, ReconConfig(rounding=rounding, learn=learn, granularity="layer", iters=60,
                                                 batch_size=32, lr=5e-2, step_lr=1e-2, transform_lr=1e-2,
                                                 weight_lr=1e-2, warmup=0.5))
    after = model.state_dict()
    act, step, code, bias = LEARNT[learn]
    assert (not torch.equal(after["0.act_quantizer.step"], before["0.act_quantizer.step"])) == act
    assert (not torch.equal(after["0.weight_quantizer.step"], before["0.weight_quantizer.step"])) == step
    assert (not torch.equal(after["0.bias"], before["0.bias"])) == bias
    if code is not None:
        assert (not torch.equal(layer.weight_quantizer.levels(layer.weight), codes)) == code
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags  # restored


def test_adaqtransform_fits_better_than_adaround_alone():
    losses = {}
    for learn in (("alpha", "s_x"), ("alpha", "s_x", "xi", "eta")):
        model, x = toy("linear", per_channel=True, act_bits=3)
        with quantizers_off(model):
            y = model(x)
        reconstruct_(model, [x], ReconConfig(learn=learn, granularity="layer", iters=300, batch_size=64))
        with torch.no_grad():
            losses[learn] = float((model(x) - y).square().mean())
    assert losses[("alpha", "s_x", "xi", "eta")] < losses[("alpha", "s_x")]


def test_start_and_final_loss_are_the_objective_over_the_whole_calibration_set():
    model, x = toy("linear", per_channel=True, act_bits=3)
    xh = x.half().float()  # what reconstruct_ caches (float16)
    with torch.no_grad(), quantizers_off(model):
        y = model(x).half().float()
    with torch.no_grad():
        start = float(reconstruct.output_error(model(xh), y))
    cfg = ReconConfig(learn=("alpha", "s_x", "xi", "eta"), granularity="layer", iters=300, batch_size=24, drop_prob=0.5)
    result = reconstruct_(model, [x], cfg)["0"]  # 64 inputs: batches of 24, 24, 16
    with torch.no_grad():
        final = float(reconstruct.output_error(model(xh), y))
    assert result["start_loss"] == pytest.approx(start, rel=1e-5)
    assert result["final_loss"] == pytest.approx(final, rel=1e-5)
    assert result["final_loss"] < result["start_loss"]


def test_qdrop_keeps_the_given_fraction_fp_while_active():
    q = LSQQuantizer(2)
    q.initialize_(torch.randn(100))
    x = torch.randn(200_000) * 0.37 + 0.11
    with dropping([q], 0.3, seed=0):
        out = q(x)
    kept = (out == x).float().mean()
    assert abs(float(kept) - 0.3) < 0.01 and not q._forward_hooks
    assert not torch.equal(q(x), out)  # without the context every element is quantized again


def test_network_granularity_and_ce_objective():
    model = quantize_(create_model("vit_2_4_32").eval(), QuantConfig(weight={"bits": 3}, act={"bits": 4}))
    assert units(model, "network") == [("", model)]
    torch.manual_seed(0)
    x, labels = torch.randn(16, 3, 32, 32), torch.randint(10, (16,))
    calibrate(model, [x], create_observer("minmax"))
    cfg = ReconConfig(rounding="nearest", learn=("w", "s_w", "s_x", "b"), granularity="network", objective="ce",
                      iters=20, batch_size=16, weight_lr=1e-3, step_lr=1e-3)
    with torch.no_grad():
        before = float(nn.functional.cross_entropy(model(x), labels))
    report = reconstruct_(model, [(x, labels)], cfg)
    with torch.no_grad():
        assert float(nn.functional.cross_entropy(model(x), labels)) < before
    assert list(report) == ["network"]
    with pytest.raises(ValueError, match=r"objective=ce needs labelled calibration batches"):
        reconstruct_(model, [x], cfg)


@pytest.mark.parametrize("settings,match", [
    ({"learn": ("alpha", "s_x", "w"), "objective": "weight_mse"}, r"weight_mse sees no data: .* not \['s_x', 'w'\]"),
    ({"step_lr": 0.0}, r"ptq.recon.step_lr=0.0 must be > 0; to freeze a parameter, leave it out"),
    ({"granularity": "model"}, r"ptq.recon.granularity='model': choose one of \['layer', 'block', 'network'\]"),
])
def test_bad_settings_name_the_key(settings, match):
    with pytest.raises(ValueError, match=match):
        ReconConfig(**settings)


def test_eta_on_a_layer_without_bias_says_how_to_get_one():
    model = quantize_(nn.Sequential(nn.Linear(4, 3, bias=False)), QuantConfig(weight={"bits": 4}))
    calibrate(model, [torch.randn(8, 4)], create_observer("minmax"))
    with pytest.raises(ValueError, match=r"eta, which folds into the bias, but the layer has none: .*add_bias=True"):
        attach_(model[0], "adaround", ("alpha", "eta"))


def test_weight_mse_needs_no_data_and_lowers_the_weight_error():
    torch.manual_seed(0)
    model = quantize_(nn.Sequential(nn.Linear(64, 32)), QuantConfig(weight={"bits": 3}))
    calibrate(model, [], create_observer("minmax"))  # min/max: far from the L2-best step at 3 bits
    layer = model[0]
    w0 = layer.weight.detach().clone()
    error = lambda: float((layer.weight_quantizer(layer.weight) - w0).square().sum())  # noqa: E731
    before = error()
    reconstruct_(model, [], ReconConfig(rounding="nearest", learn=("s_w",), objective="weight_mse", granularity="layer",
                                        iters=200, step_lr=1e-3))
    assert error() < 0.8 * before


def test_case_2_1_learns_the_quant_step_with_the_dequant_step_frozen():
    model, x = toy("linear", per_channel=True)
    layer = model[0]
    step = layer.weight_quantizer.step.detach().clone()
    rw = attach_(layer, "adaround", ("alpha", "s_w"), decoupled=True)
    assert rw.s_dq is not None and rw.dq_step() is rw.s_dq
    with quantizers_off(model):
        y = model(x)
    layer.weight_quantizer = rw.quantizer[0]  # fit_unit attaches again, from the LSQ quantizer
    with torch.enable_grad():
        fit_unit(model.eval(), x, y, ReconConfig(learn=("alpha", "s_w"), decoupled=True, granularity="layer",
                                                 iters=30, step_lr=1e-2))
    torch.testing.assert_close(layer.weight_quantizer.step.detach(), step)  # de-quant step = the frozen s_w'


PRESETS = {  # seed 003's cases: what the optimizer trains, the unit, QDrop
    "brecq": ({"alpha"}, "block", 0.0), "adaround": ({"alpha", "s_x"}, "block", 0.0),
    "qdrop": ({"alpha", "s_x"}, "block", 0.5), "nwq": ({"alpha", "s_x"}, "network", 0.5),
    "case2_2": ({"alpha", "s_x", "s_w_dq"}, "network", 0.5),
    "adaqtransform": ({"alpha", "s_x", "xi", "eta"}, "block", 0.5),
    "adaqtransform_nwq": ({"alpha", "s_x", "xi", "eta"}, "network", 0.5),
}


@pytest.mark.parametrize("preset", list(PRESETS))
def test_each_preset_trains_exactly_its_set(preset, monkeypatch):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = pipeline.recon_config(compose("ptq", overrides=[f"ptq={preset}", "ckpt=x"]).ptq)
    learn, granularity, drop = PRESETS[preset]
    assert (cfg.granularity, cfg.drop_prob, cfg.rounding) == (granularity, drop, "adaround")
    seen = []
    monkeypatch.setattr(reconstruct.torch.optim, "Adam", lambda groups: seen.append(groups) or torch.optim.SGD(
        groups, lr=0.0))
    model, x = toy("linear", per_channel=True)
    with quantizers_off(model):
        y = model(x)
    with torch.enable_grad():
        fit_unit(model.eval(), x, y, dataclasses.replace(cfg, iters=1))
    groups = {g["name"]: g["params"] for g in seen[0]}
    assert set(groups) == learn
    shapes = {"alpha": (12, 24), "s_x": (1,), "s_w_dq": (12, 1), "xi": (12, 1), "eta": (12,)}
    for name, params in groups.items():
        assert [tuple(p.shape) for p in params] == [shapes[name]], name
    if "s_x" in groups:
        assert groups["s_x"][0] is model[0].act_quantizer.step  # LSQ on the layer's own input step


def test_identity_transform_reproduces_adaround_exactly():
    model, x = toy("linear", per_channel=True)
    layer, q = model[0], model[0].weight_quantizer
    plain = ReconWeight(q, layer, "adaround", ("alpha",))
    general = ReconWeight(q, layer, "adaround", ("alpha", "xi", "eta", "s_w_dq"))  # xi = 1, eta = 0, s_w' = s_w
    torch.manual_seed(3)
    with torch.no_grad():
        general.alpha.copy_(torch.randn_like(general.alpha))
        plain.alpha.copy_(general.alpha)
        assert torch.equal(general(layer.weight), plain(layer.weight))
        layer.weight_quantizer = plain
        out = model(x)
        general.handle = layer.register_forward_hook(general._add_eta)
        layer.weight_quantizer = general
        assert torch.equal(model(x), out)


def test_output_error_sums_channels_and_averages_the_rest():
    from qat.ptq.reconstruct import output_error
    assert float(output_error(torch.ones(2, 3, 4, 5), torch.zeros(2, 3, 4, 5))) == 3.0  # conv maps: C = dim 1
    assert float(output_error(torch.full((2, 7, 6), 2.0), torch.zeros(2, 7, 6))) == 24.0  # tokens: C last


def test_a_diverged_unit_keeps_its_calibrated_start(monkeypatch):
    model, x = toy("linear", per_channel=True)
    start = {k: v.clone() for k, v in model.state_dict().items()}

    def blow_up(unit, inputs, targets, cfg):
        with torch.no_grad():
            unit.weight.fill_(float("nan"))
        return {"rec_loss": float("nan"), "undecided": 0.0}
    monkeypatch.setattr(reconstruct, "fit_unit", blow_up)
    report = reconstruct_(model, [x], ReconConfig(granularity="layer", iters=1))
    assert report == {"0": {"rec_loss": pytest.approx(float("nan"), nan_ok=True), "undecided": 0.0, "diverged": True}}
    assert all(torch.equal(v, start[k]) for k, v in model.state_dict().items())


def test_capture_fills_one_float16_tensor_over_uneven_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    batches = [(torch.randn(n, 6), torch.zeros(n, dtype=torch.long)) for n in (4, 3, 5)]
    x = torch.cat([b[0] for b in batches])
    inputs = reconstruct.capture(model, model[2], batches, output=False)
    outputs = reconstruct.capture(model, model[2], batches, output=True)
    with torch.no_grad():
        hidden = model[1](model[0](x))
        assert torch.equal(inputs, hidden.half()) and torch.equal(outputs, model[2](hidden).half())


def test_later_units_fit_to_the_fp_model_not_to_earlier_folds(monkeypatch):
    """Unit 1's targets are the FP model's outputs, although unit 0 was folded to hard-rounded 2-bit weights first."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 8))
    x = torch.randn(64, 16)
    with torch.no_grad():
        fp_targets = model(x)
    quantize_(model, QuantConfig(weight={"bits": 2}, act={"bits": 4}))
    calibrate(model, [x], create_observer("mse", grid=20))
    seen = {}
    real_fit = reconstruct.fit_unit

    def spy(unit, inputs, targets, cfg):
        seen[unit] = targets
        return real_fit(unit, inputs, targets, cfg)
    monkeypatch.setattr(reconstruct, "fit_unit", spy)
    reconstruct_(model, [x], ReconConfig(granularity="layer", iters=20, batch_size=16))
    torch.testing.assert_close(seen[model[1]].float(), fp_targets, atol=1e-2, rtol=1e-2)  # float16 cache
    with quantizers_off(model), torch.no_grad():  # the folded model with FP inputs is far from them
        assert (model(x) - fp_targets).abs().max() > 0.1
