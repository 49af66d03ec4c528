"""On a CUDA device (skipped without one; scripts/gpu_check.sh runs them): compiled quantizer kernels == eager,
AMP fp16 / bf16 training steps of a quantized ViT stay finite, a checkpoint saved on CUDA reloads on CPU."""
import copy

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from qat import load_model
from qat.models import create_model
from qat.module import LitClassifier
from qat.optim import OptimConfig
from qat.quant import QuantConfig, QuantizationCallback, calibrate_, compile_quantizers, kernels, lsq_fake_quant
from qat.quant import quantize_, quantizers

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

QUANT = {"weight": {"bits": 2}, "act": {"bits": 2}, "attn": {"bits": 2}}
RECIPE = {"model": {"name": "vit_2_4_32"}, "quant": QUANT, "num_classes": 10}


@pytest.fixture
def fresh_kernels(monkeypatch):
    monkeypatch.setattr(kernels, "_compiled", {})
    monkeypatch.setattr(kernels, "_failed", set())
    return kernels


def quantized_vit(device="cuda"):
    torch.manual_seed(0)
    return quantize_(create_model("vit_2_4_32"), QuantConfig(**QUANT)).to(device)


def images(n=8, device="cuda"):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qmin,qmax,offset,binary", [(-1, 1, False, False), (0, 3, True, False), (-1, 1, False, True),
                                                    (-8, 7, True, False)])
def test_compiled_fake_quant_matches_eager(fresh_kernels, dtype, qmin, qmax, offset, binary):
    gen = torch.Generator().manual_seed(0)
    x, grad = (torch.randn(64, 65, 96, generator=gen).to("cuda", dtype) for _ in range(2))
    leaves = [x, torch.tensor([0.125], device="cuda")] + ([torch.tensor([0.0625], device="cuda")] if offset else [])

    def run(compiled):
        inputs = [t.clone().requires_grad_() for t in leaves]
        y = lsq_fake_quant(inputs[0], inputs[1], qmin, qmax, inputs[2] if offset else None, binary,
                           compiled=compiled)
        return (y.detach(),) + torch.autograd.grad(y, inputs, grad)

    eager, fused = run(False), run(True)
    assert kernels._fake_quant in fresh_kernels._compiled and not fresh_kernels._failed
    assert torch.equal(fused[0], eager[0]) and torch.equal(fused[1], eager[1])  # values and dx bit for bit
    for a, b in zip(fused[2:], eager[2:], strict=True):  # step / offset sums: another summation order
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_compiled_quantized_vit_matches_eager(fresh_kernels):
    eager = quantized_vit()
    calibrate_(eager, [images()])
    compiled = copy.deepcopy(eager)
    assert compile_quantizers(compiled) == len(list(quantizers(eager)))
    outs = []
    for model in (eager, compiled):
        torch.manual_seed(1)  # same dropout draws
        out = model.train()(images())
        out.square().mean().backward()
        outs.append((out.detach(), [p.grad for p in model.parameters()]))
    assert not fresh_kernels._failed
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(outs[1][1], outs[0][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def fit(precision: str, tmp_path, steps: int = 4) -> tuple[L.Trainer, LitClassifier]:
    data = TensorDataset(images(32, "cpu"), torch.arange(32) % 10)
    lit = LitClassifier(quantized_vit("cpu"), OptimConfig(lr=1e-3, epochs=1, warmup_epochs=0, cooldown_epochs=0),
                        RECIPE)
    calibration = lambda: (data.tensors[0][:16], data.tensors[1][:16])  # noqa: E731
    trainer = L.Trainer(accelerator="gpu", devices=1, precision=precision, max_steps=steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, callbacks=[QuantizationCallback(calibration)])
    trainer.fit(lit, DataLoader(data, batch_size=8))
    return trainer, lit


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_amp_training_steps_of_a_quantized_vit_are_finite(precision, tmp_path):
    trainer, lit = fit(precision, tmp_path)
    assert trainer.global_step == 4 and torch.isfinite(trainer.callback_metrics["train/loss_step"])
    assert all(torch.isfinite(p).all() for p in lit.model.parameters())
    named = list(quantizers(lit.model))
    assert len(named) == 2 * 12  # per block: 4 layers x (weight, input) + q, k, v, probabilities
    assert all(q.is_initialized and (q.step >= q.eps).all() for _, q in named)


def test_quantized_checkpoint_saved_on_cuda_reloads_on_cpu(tmp_path):
    trainer, lit = fit("16-mixed", tmp_path, steps=2)
    assert next(lit.model.parameters()).is_cuda
    path = tmp_path / "cuda.ckpt"
    trainer.save_checkpoint(path)
    reloaded = load_model(path)
    assert not next(reloaded.parameters()).is_cuda
    x = images(8, "cpu")
    with torch.no_grad():
        on_cuda = lit.model.eval()(x.cuda()).cpu()
        moved = lit.model.cpu()(x)
        assert torch.equal(reloaded(x), moved)  # same weights, steps and flags: bit for bit on the same device
    torch.testing.assert_close(moved, on_cuda, rtol=1e-3, atol=1e-3)
