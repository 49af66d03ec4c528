"""OmegaConf resolvers used by conf/, registered when `qat` is imported."""
import torch
from omegaconf import OmegaConf


def amp_precision(precision: str) -> str:
    """`${qat_amp:16-mixed}`: the given AMP precision when CUDA is available, else '32-true' (fp32 on CPU)."""
    return str(precision) if torch.cuda.is_available() else "32-true"


def register_resolvers() -> None:
    """Register the qat resolvers once per process."""
    if not OmegaConf.has_resolver("qat_amp"):
        OmegaConf.register_new_resolver("qat_amp", amp_precision)
