"""calibrate_ and QuantizationCallback: initialise pending quantizers, check ranks agree, clamp every step."""
import copy
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from qat.models import create_model
from qat.module import LitClassifier
from qat.optim import OptimConfig
from qat.quant import LSQQuantizer, QuantConfig, QuantizationCallback, calibrate_, quantize_, quantizers
from qat.quant.callback import check_steps_match_across_ranks


def images(n=4, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def quantized_vit():
    torch.manual_seed(0)
    return quantize_(create_model("vit_2_4_32"), QuantConfig(weight={"bits": 2},
                                                            act={"bits": 2, "init": "minmax"}, attn={"bits": 4}))


def test_calibrate_equals_one_train_mode_forward_and_restores_eval_mode():
    model = quantized_vit().eval()
    reference = copy.deepcopy(model)
    torch.manual_seed(1)  # same dropout draws in both forwards
    with torch.no_grad():  # what LitClassifier.on_fit_start did before the callback existed
        reference.train()(images())
    torch.manual_seed(1)
    names = calibrate_(model, [(images(), torch.zeros(4)), (images(seed=1), torch.zeros(4))])
    assert names == [n for n, _ in quantizers(model)] and len(names) == 8 * 2 + 2 * 4
    assert not model.training
    ref = reference.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())


def test_calibrate_closed_form_and_leaves_initialised_quantizers_alone():
    model = nn.Sequential(LSQQuantizer(2), nn.ReLU(), LSQQuantizer(3, signed=False, init="minmax"))
    x = torch.tensor([[-3.0, 1.0, 2.0, 4.0]])
    assert calibrate_(model, [x]) == ["0", "2"]  # a plain tensor batch
    assert model[0].step.item() == 2 * 2.5 / 1  # 2 mean|x| / sqrt(qmax), qmax = 1
    assert torch.equal(model[2].step, torch.tensor([5.0]) / 6)  # sees relu(Q(x)) = [0, 0, 0, 5]; max / qmax (6)
    assert calibrate_(model, [x * 100]) == [] and model[0].step.item() == 5.0


def test_calibrate_without_batches_is_refused():
    with pytest.raises(ValueError, match=r"^calibrate_: batches is empty but 2 quantizers need initialising"):
        calibrate_(nn.Sequential(LSQQuantizer(2), LSQQuantizer(2)), [])


def test_steps_that_differ_across_ranks_are_named():
    model = nn.Sequential(LSQQuantizer(2), LSQQuantizer(2, per_channel=True, channels=3))
    with torch.no_grad():
        model[1].step.copy_(torch.tensor([[1.0], [2.0], [3.0]]))
    same = lambda t: torch.stack([t, t])  # noqa: E731
    check_steps_match_across_ranks(model, same)
    other = lambda t: torch.stack([t, t + (torch.arange(len(t)) == 2)])  # noqa: E731  rank 1: channel 1 differs
    with pytest.raises(RuntimeError, match=r"steps differ across ranks after initialisation: 1$"):
        check_steps_match_across_ranks(model, other)


class StepRecorder:
    """Forward hook: the step each call of a quantizer used."""

    def __init__(self, quantizer):
        self.seen = []
        quantizer.register_forward_hook(lambda q, args, out: self.seen.append(q.step.item()))


@pytest.mark.parametrize("with_callback", [True, False])
def test_callback_calibrates_at_fit_start_and_clamps_before_every_forward(with_callback):
    model = quantized_vit()
    data = TensorDataset(images(8), torch.arange(8) % 10)
    calls = []
    calibration = lambda: calls.append(1) or (images(8, seed=3), torch.zeros(8))  # noqa: E731
    expected = copy.deepcopy(model)
    calibrate_(expected, [images(8, seed=3)])
    qkv = model.classifier.blocks[0].self_attn.qkv.act_quantizer  # its input has no dropout before it
    recorder = StepRecorder(qkv)
    optim = OptimConfig(lr=1e-3, quant_lr=10.0, epochs=1, warmup_epochs=0, cooldown_epochs=0)  # steps go < 0
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[QuantizationCallback(calibration)] if with_callback else [])
    trainer.fit(LitClassifier(model, optim, {"num_classes": 10}), DataLoader(data, batch_size=4))
    if not with_callback:  # the control: without the callback, steps go negative and nothing was calibrated
        assert min(recorder.seen) < 0
        return
    assert len(calls) == 1 and len(recorder.seen) == 4  # calibration forward + 3 training steps
    assert recorder.seen[0] == recorder.seen[1] == expected.classifier.blocks[0].self_attn.qkv.act_quantizer.step
    eps = torch.tensor(qkv.eps).item()  # in float32
    assert recorder.seen[2:] == [eps, eps]  # each step went negative and was clamped before the forward
    assert all((q.step >= q.eps).all() for _, q in quantizers(model))


def test_callback_skips_calibration_when_every_quantizer_is_initialised():
    model = quantized_vit()
    calibrate_(model, [images()])
    calls = []
    callback = QuantizationCallback(lambda: calls.append(1))
    callback.on_fit_start(SimpleNamespace(world_size=2), SimpleNamespace(model=model))  # no gather either
    assert not calls


DDP_DRIVER = """
import logging
import sys
from pathlib import Path

import torch
from lightning.pytorch import Callback

sys.path.insert(0, {tests!r})
import qat.run
from conftest import TINY, compose_config
from qat.quant import quantizers


class StepsOfThisRank(Callback):
    def on_train_end(self, trainer, pl_module):
        steps = {{n: q.step.detach().clone() for n, q in quantizers(pl_module.model)}}
        torch.save(steps, Path({out!r}) / f"steps.{{trainer.global_rank}}.pt")


build_callbacks = qat.run.build_callbacks
qat.run.build_callbacks = lambda *args, **kwargs: build_callbacks(*args, **kwargs) + [StepsOfThisRank()]
# minmax: steps start too large; quant_lr 10: the first Adam step (10 x sign of the gradient) takes them below 0
overrides = TINY + ["quant=act2b", "trainer=ddp_cpu", "quant.act.init=minmax", "optim.quant_lr=10.0"]
logging.basicConfig(level=logging.INFO)
qat.run.train(compose_config(overrides, Path({out!r})))
"""


@pytest.mark.slow
def test_quickstart_on_two_gloo_ranks_initialises_clamps_and_agrees(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DDP_DRIVER.format(tests=str(Path(__file__).parent), out=str(tmp_path)))
    done = subprocess.run([sys.executable, str(driver)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "quantizer steps identical on all 2 ranks after initialisation" in output, output[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"steps.{r}.pt") for r in (0, 1))
    assert rank0.keys() == rank1.keys() and len(rank0) == 2 * 4  # act2b: the 4 linears of each block
    assert all(torch.equal(rank0[n], rank1[n]) for n in rank0)
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    eps = torch.tensor(1e-5)
    for name, step in rank0.items():
        assert torch.equal(state[f"model.{name}.step"], step) and state[f"model.{name}.initialized"] == 1
        assert (step >= eps).all(), name
    assert any(torch.equal(step, eps.view(1)) for step in rank0.values()), rank0  # went below 0, was clamped
