"""OmegaConf resolvers used by conf/, registered when `qat` is imported."""
import os
from pathlib import Path

import torch
from omegaconf import OmegaConf


def amp_precision(precision: str) -> str:
    """`${qat_amp:16-mixed}`: the given AMP precision when CUDA is available, else '32-true' (fp32 on CPU)."""
    return str(precision) if torch.cuda.is_available() else "32-true"


def ckpt_model(ref, model_name=None, output_root: str = "outputs") -> str:
    """`${qat_ckpt_model:${ckpt},${oc.select:model.name,null},${paths.output_root}}`: the model of a checkpoint
    reference (model= when given), for the run dir names of eval.py and ptq.py."""
    from qat.runs import model_of  # qat.runs imports models and quant: only when a config resolves this
    return str(model_name) if model_name else model_of(ref, output_root)


def project_root() -> str:
    """`${qat_root:}`: $PROJECT_ROOT, else the checkout holding conf/ and pyproject.toml (rootutils' idea), else the
    working directory: outputs and data then land in the project whatever directory a command runs from."""
    if os.environ.get("PROJECT_ROOT"):
        return os.environ["PROJECT_ROOT"]
    checkout = Path(__file__).resolve().parents[1]
    return str(checkout) if (checkout / "pyproject.toml").is_file() and (checkout / "conf").is_dir() else os.getcwd()


def register_resolvers() -> None:
    """Register the qat resolvers once per process."""
    from qat.runlock import unique_dir  # run dirs created exclusively (conf/hydra/default.yaml)
    resolvers = (("qat_amp", amp_precision), ("qat_ckpt_model", ckpt_model), ("qat_root", project_root),
                 ("qat.unique_dir", unique_dir))
    for name, fn in resolvers:
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
