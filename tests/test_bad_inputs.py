"""Every bad input to train.py ends in exit code 2, no traceback, one `error:` line naming the problem, and no run
dir that resume or sweep would trust (issue 14). The cases run as subprocesses, two at a time."""
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from qat.models import create_model
from conftest import ROOT, TINY

SAMPLE = ROOT / "qat" / "data" / "sample" / "cifar10"
STUDENT_W2A2 = ["quant=w2a2"]
KD = ["kd=vit_2_4_32"]
TEACHER = KD + ["kd.teacher.checkpoint={files}/teacher.pt"]

# (overrides, text the error line must contain); {files} is a folder of prepared bad files
CASES = [
    # the unclear cases of the issue
    (["ckpt_path={files}/notes.ckpt"], "ckpt_path={files}/notes.ckpt is not a PyTorch checkpoint"),
    (["optim.lr=abc"], "optim.lr='abc' is not a number"),
    (["trainer.max_epochs=0"], "trainer.max_epochs=0 must be at least 1"),
    (["seed=abc"], "seed='abc' is not an integer"),
    (["data.root={files}/cifar10"], "cannot decode image {files}/cifar10/train/airplane/"),
    (["ckpt_path={files}/resnet20.ckpt"], "is a checkpoint of resnet20 (float), but this run builds vit_2_4_32"),
    (["optim.clip_mode=foo"], "optim.clip_mode='foo'"),
    (["paths.output_root=/sys/qat"], "/sys/qat"),
    (["model.use_relu=maybe"], "model.use_relu='maybe' is not a boolean"),
    (["trainer.precision=16-mixed"], "trainer.precision=bf16-mixed"),
    # Hydra's own errors
    (["foo=1"], "Could not override 'foo'"),
    (["model=nosuch"], "Could not find 'model/nosuch'"),
    (["experiment=nosuch"], "Could not find 'experiment/nosuch'"),
    (["optim.nosuch=1"], "Could not override 'optim.nosuch'"),
    # types and ranges
    (["deterministic=maybe"], "deterministic='maybe' is not a boolean"),
    (["test_after_fit=yes"], "test_after_fit='yes' is not a boolean"),
    (["model.label_head=1"], "model.label_head=1 is not a boolean"),
    (["data.batch_size=0"], "data.batch_size=0 must be at least 1"),
    (["data.batch_size=abc"], "data.batch_size='abc' is not an integer"),
    (["trainer.max_epochs=2.5"], "trainer.max_epochs=2.5 is not an integer"),
    (["optim.weight_decay=abc"], "optim.weight_decay='abc' is not a number"),
    (["optim.betas=3"], "optim.betas=3 is not a list"),
    (["optim.lr=-1"], "optim.lr=-1 must be > 0"),
    (["optim.lr_scale_rule=foo"], "optim.lr_scale_rule='foo'"),
    (["compile=fast"], "compile='fast'"),
    (["compile=quantizers", "optim.lr=-1"], "optim.lr=-1 must be > 0"),  # a string for a boolean default: valid
    (["resume=yes"], "resume='yes'"),
    # renamed keys
    (["kd.checkpoint=x"], "kd.checkpoint was renamed to kd.teacher.checkpoint"),
    (["trainer.compile=true"], "trainer.compile was renamed to compile"),
    # checkpoints and references
    (["ckpt_path={files}/missing.ckpt"], "{files}/missing.ckpt does not exist"),
    (["init_from={files}/missing.ckpt"], "{files}/missing.ckpt does not exist"),
    (["init_from={files}/notes.ckpt"], "init_from={files}/notes.ckpt is not a PyTorch checkpoint"),
    (["init_from=experiment:nosuch"], "no finished run of experiment 'nosuch'"),
    (KD + ["kd.teacher.checkpoint={files}/notes.ckpt"], "kd.teacher.checkpoint={files}/notes.ckpt is not a PyTorch"),
    (KD, "auto: no finished"),
    # quantization
    (STUDENT_W2A2 + ["quant.weight.bits=9"], "bits=9 is not supported"),
    (STUDENT_W2A2 + ["quant.act.bits=abc"], "quant.act.bits='abc' is not an integer"),
    (STUDENT_W2A2 + ["quant.weight.init=foo"], "init='foo' is not supported"),
    (STUDENT_W2A2 + ["quant.weight.learnable_offset=maybe"], "quant.weight.learnable_offset='maybe' is not a boolean"),
    (STUDENT_W2A2 + ["telemetry.every_n_steps=-1"], "every_n_steps=-1"),
    (["quant=act2b_attn", "quant.attn.probs_signed=true"], "quant.attn.probs_signed was renamed to quant.attn.signed"),
    (["callbacks=fulll"], "Could not find 'callbacks/fulll'"),
    (["callbacks=lr_monitor"], "has no model_checkpoint"),
    (["extras=nosuch"], "Could not find 'extras/nosuch'"),  # (a debug=<x> override asks for tracebacks)
    # models
    (["model.name=nosuch"], "unknown model name='nosuch'"),
    (["model.norm=foo"], "norm='foo' is not supported"),
    (["model.positional_embedding=foo"], "positional_embedding='foo' is not supported"),
    # data
    (["data.root={files}/nowhere"], "{files}/nowhere does not exist"),
    (["data.name=foo"], "data.name='foo' is not one of"),
    (["data.num_classes=100"], "data.num_classes=100 but"),
    (["data.aug.mixup=0.8", "data.batch_size=15"], "batch size 15 must be even"),
    (["+data.aug.foo=1"], "unknown aug keys ['foo']"),
    # distillation
    (["kd.loss.two_head_alpha=0.5"], "two_head_alpha"),
    (TEACHER + ["kd.loss.kind=foo"], "kd.loss.kind='foo' is not one of"),
    (TEACHER + ["kd.loss.temperature=0"], "kd.loss.temperature=0 must be > 0"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bad_files")
    (folder / "notes.ckpt").write_text("hello, this is not a checkpoint\n")
    torch.save({"qat": {"model": {"name": "resnet20"}, "quant": None}, "state_dict": {}}, folder / "resnet20.ckpt")
    torch.save(create_model("vit_2_4_32", num_classes=10).state_dict(), folder / "teacher.pt")
    shutil.copytree(SAMPLE, folder / "cifar10")
    jpg = sorted((folder / "cifar10" / "train" / "airplane").glob("*.jpg"))[0]
    jpg.write_bytes(jpg.read_bytes()[:300])  # a truncated download
    return folder


def run_case(index: int, overrides: list[str], files: Path, root: Path) -> subprocess.CompletedProcess:
    out = root / f"case{index}"
    args = [o.format(files=files) for o in overrides]
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "train.py", *TINY, f"paths.output_root={out}", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def results(files, tmp_path_factory) -> list[subprocess.CompletedProcess]:
    root = tmp_path_factory.mktemp("bad_runs")
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(run_case, i, overrides, files, root) for i, (overrides, _) in enumerate(CASES)]
        return [(f.result(), root / f"case{i}") for i, f in enumerate(futures)]


def test_at_least_40_cases():
    assert len(CASES) >= 40


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(CASES)), ids=[" ".join(o) for o, _ in CASES])
def test_bad_input_is_one_line_and_exit_2(results, files, index):
    proc, out = results[index]
    expected = CASES[index][1].format(files=files)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(errors) == 1 and errors[0] == proc.stderr.splitlines()[-1], proc.stderr[-3000:]
    assert expected in errors[0]
    for summary in out.rglob("summary.json"):  # a dir whose run started: marked failed, never finished
        assert json.loads(summary.read_text())["status"] == "failed"
    for log in out.rglob("train.log"):  # the run's log records the error
        assert errors[0] in log.read_text()
    assert not [s for s in out.rglob("summary.json") if json.loads(s.read_text()).get("finished")]


@pytest.mark.parametrize("command, text", [
    (["eval.py", "ckpt={files}/missing.ckpt"], "does not exist"),
    (["eval.py", "ckpt={files}/notes.ckpt", "data=cifar10_sample"], "is not a readable torch checkpoint"),
    (["eval.py", "ckpt={files}/resnet20.ckpt"], "is not inside a run dir with .hydra/config.yaml: say which data"),
    (["ptq.py", "ckpt={files}/missing.ckpt"], "does not exist"),
    (["ptq.py", "ckpt={files}/teacher.pt", "ptq=nosuch"], "Could not find 'ptq/nosuch'"),
    (["-m", "qat.export", "{files}/notes.ckpt"], "is not a readable torch checkpoint"),
    (["-m", "qat.export", "{files}/missing.ckpt", "--format", "bin"], "invalid choice: 'bin'"),
])
@pytest.mark.slow
def test_other_commands_report_bad_input_in_one_line(files, command, text):
    done = subprocess.run([sys.executable, *[c.format(files=files) for c in command]], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert text.format(files=files) in lines[-1], lines[-1]
