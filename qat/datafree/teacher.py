"""The FP model synthetic data is made from: `synthetic.teacher` resolved like any checkpoint reference."""
from pathlib import Path

from torch import nn

from qat.distill import load_teacher
from qat.runs import load_checkpoint, resolve, sha256_file


def resolve_teacher(ref, output_root, model_name: str | None) -> Path:
    """The checkpoint file of `ref` (run dir | .ckpt | experiment:<name> | zoo:<name> | auto); errors name the key."""
    if ref is None:
        raise ValueError("data.synthetic.teacher is not set: data=synthetic makes images from an FP model; pass "
                         "kd.teacher.checkpoint=<run dir | .ckpt | zoo:<name>> or data.synthetic.teacher=<same>")
    try:
        return resolve(ref, output_root, model=model_name)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"data.synthetic.teacher={ref}: {e}") from None


def load_fp_teacher(path: Path, model_name: str | None, num_classes: int) -> tuple[nn.Module, str]:
    """(frozen FP model, sha256 of its checkpoint file); the model name comes from the run's recipe if not given."""
    if model_name is None:
        loaded = load_checkpoint(path)
        if not (isinstance(loaded, dict) and "qat" in loaded):
            raise ValueError(f"data.synthetic.teacher={path} is a plain state_dict: "
                             "set data.synthetic.teacher_model=<model name>")
        model_name = loaded["qat"]["model"]["name"]
    model = load_teacher({"name": model_name}, path, num_classes=num_classes)
    return model, sha256_file(path)
