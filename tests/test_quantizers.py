"""LSQQuantizer: state from birth, initialisation, step floor, errors, helpers."""
import math

import pytest
import torch
from torch import nn

from qat.guards import non_finite_report
from qat.quant import LSQQuantizer, QuantizerConfig, clamp_steps_, lsq_fake_quant, quantizers

SEED = 123


def randn(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(SEED))


def test_state_exists_from_birth():
    q = LSQQuantizer(4)
    assert {k: tuple(v.shape) for k, v in q.state_dict().items()} == {"step": (1,), "initialized": ()}
    q = LSQQuantizer(2, per_channel=True, channels=8, ch_axis_ndim=4, learnable_offset=True)
    assert {k: tuple(v.shape) for k, v in q.state_dict().items()} == {
        "step": (8, 1, 1, 1), "offset": (8, 1, 1, 1), "initialized": ()}
    assert not q.is_initialized and q.initialized.dtype == torch.float32


def test_attributes_and_repr():
    q = LSQQuantizer(2, signed=False, per_channel=True, channels=3, learnable_offset=True)
    assert (q.qmin, q.qmax, q.binary) == (0, 2, False)
    assert LSQQuantizer(1).binary and not LSQQuantizer(1, signed=False).binary
    assert repr(q) == ("LSQQuantizer(bits=2, levels=[0, 2], signed=False, symmetric=True, init='lsq', "
                       "per_channel=3, learnable_offset=True)")
    q.enabled = False
    assert repr(q).endswith("enabled=False)")


def test_lsq_init_per_tensor():
    x = randn(4, 10, 16)
    q = LSQQuantizer(4).train()
    q(x)
    assert torch.allclose(q.step, 2 * x.abs().mean() / math.sqrt(7), rtol=1e-6, atol=0)
    assert q.initialized.item() == 1 and q.is_initialized


def test_lsq_init_per_channel_rows():
    w = randn(6, 3, 3, 3) * torch.arange(1, 7.0).view(6, 1, 1, 1)
    q = LSQQuantizer(2, per_channel=True, channels=6, ch_axis_ndim=4).train()
    q(w)
    assert q.step.shape == (6, 1, 1, 1)
    expected = 2 * w.abs().mean(dim=(1, 2, 3)) / math.sqrt(1)
    assert torch.allclose(q.step.flatten(), expected, rtol=1e-6, atol=0)


def test_minmax_init():
    x = torch.tensor([-3.0, -1.0, 0.5, 6.0])
    q = LSQQuantizer(4, init="minmax").train()
    q(x)
    assert torch.allclose(q.step, torch.tensor([6.0 / 7]))  # max(6 / 7, -3 / -7)
    q = LSQQuantizer(2, signed=False, symmetric=False, learnable_offset=True, init="minmax").train()
    y = q(x)
    assert torch.allclose(q.step, torch.tensor([9.0 / 3])) and torch.allclose(q.offset, torch.tensor([-3.0]))
    assert torch.allclose(y[[0, 3]], x[[0, 3]])  # min and max are levels


def test_mse_init_beats_lsq_init():
    x = randn(2000)
    q = LSQQuantizer(8, init="mse").train()
    q(x)
    lsq_step = 2 * x.abs().mean() / math.sqrt(127)
    mse = lambda s: (lsq_fake_quant(x, s.reshape(1), -127, 127) - x).square().mean()  # noqa: E731
    assert mse(q.step.detach()) < mse(lsq_step) / 2  # 8-bit lsq init is far too coarse
    ratio = (q.step / lsq_step).log2() * 8
    assert torch.allclose(ratio, ratio.round(), atol=1e-3)  # a point of the 1/8-octave grid


def test_initialised_once_and_uninitialised_eval_raises():
    q = LSQQuantizer(4)
    q.name = "blocks.0.linear1.act_quantizer"
    with pytest.raises(RuntimeError, match=r"blocks\.0\.linear1\.act_quantizer is not initialised.*train mode"):
        q.eval()(randn(8))
    q.train()(randn(8))
    step = q.step.detach().clone()
    q(randn(8) * 100)
    assert torch.equal(q.step, step)


def test_loaded_state_is_not_reinitialised():
    trained = LSQQuantizer(4, learnable_offset=True).train()
    trained(randn(16))
    fresh = LSQQuantizer(4, learnable_offset=True).train()
    fresh(randn(16) * 50)  # fresh caches "initialised" too: loading must refresh the cache
    fresh.load_state_dict(LSQQuantizer(4, learnable_offset=True).state_dict())
    assert not fresh.is_initialized
    fresh.load_state_dict(trained.state_dict())
    fresh(randn(16) * 50)
    assert fresh.is_initialized and torch.equal(fresh.step, trained.step)


def test_disabled_is_identity():
    q = LSQQuantizer(2)
    q.enabled = False
    x = randn(5)
    assert q.eval()(x) is x


def test_step_floor_and_clamp_steps():
    model = nn.Sequential(LSQQuantizer(4), LSQQuantizer(4))
    for q in model:
        q.initialized.fill_(1)
    with torch.no_grad():
        model[0].step.fill_(-0.1)
        model[1].step.fill_(0.3)
    x = (torch.tensor([1.0, 3.0, 1e5]) * 1e-5).requires_grad_()
    y = model[0](x)
    assert torch.equal(y, torch.tensor([1.0, 3.0, 7.0]) * 1e-5)  # the forward used eps = 1e-5
    y.sum().backward()
    assert model[0].step.grad is not None
    clamp_steps_(model)
    assert torch.equal(model[0].step, torch.tensor([1e-5])) and torch.equal(model[1].step, torch.tensor([0.3]))


def test_non_finite_report_names_the_quantizer_and_the_first_layer():
    model = nn.Sequential(LSQQuantizer(4), LSQQuantizer(4, learnable_offset=True))
    for q in model:
        q.initialized.fill_(1)
    x = torch.ones(3)
    assert non_finite_report(model, x) == ("quantizers with non-finite step/offset: none; first layer with "
                                           "non-finite output: none (check the loss inputs)")
    with torch.no_grad():
        model[1].offset.fill_(float("nan"))
    assert non_finite_report(model, x) == ("quantizers with non-finite step/offset: ['1']; first layer with "
                                           "non-finite output: 1 (LSQQuantizer)")
    assert [n for n, _ in quantizers(model)] == ["0", "1"]


def test_init_is_averaged_across_ranks(monkeypatch):
    other_rank = torch.tensor([0.5, 0.0])  # (step, offset) computed on a second rank
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t: t.add_(other_rank))
    x = randn(100)
    q = LSQQuantizer(2).train()
    q(x)
    assert torch.allclose(q.step, (2 * x.abs().mean() + 0.5) / 2)


def test_from_config():
    cfg = QuantizerConfig(bits=3, symmetric=False, per_channel=True, learnable_offset=True, init="minmax")
    q = LSQQuantizer.from_config(cfg, signed=False, channels=5, ch_axis_ndim=2)
    assert (q.qmin, q.qmax, q.init, q.step.shape, q.offset.shape) == (0, 7, "minmax", (5, 1), (5, 1))


@pytest.mark.parametrize("kwargs,match", [({"bits": 0}, r"bits=0 .* 1\.\.8"), ({"bits": 9}, r"bits=9 .* 1\.\.8"),
                                          ({"bits": 2, "init": "max"}, r"init='max'.*\['lsq', 'minmax', 'mse'\]")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LSQQuantizer(**kwargs)


def _init_on_rank(rank: int, init_file: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    q = LSQQuantizer(4, learnable_offset=True, init="minmax").train()
    q(torch.arange(8.0) * (rank + 1))  # different data per rank
    torch.save(q.state_dict(), f"{out}.{rank}")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_init_identical_on_two_gloo_ranks(tmp_path):
    torch.multiprocessing.spawn(_init_on_rank, args=(str(tmp_path / "init"), str(tmp_path / "q")), nprocs=2)
    states = [torch.load(tmp_path / f"q.{rank}") for rank in (0, 1)]
    # per rank: step = (max - min) / (7 - -7) = 0.5 | 1.0, offset = min + 7 * step = 3.5 | 7.0; both get the mean
    for state in states:
        assert torch.equal(state["step"], torch.tensor([0.75])) and torch.equal(state["offset"], torch.tensor([5.25]))
