"""Train one model: `python train.py model=vit_6_4_32 quant=act2b kd=vit` (see README)."""
import logging

import hydra
from omegaconf import DictConfig

from qat.run import train

log = logging.getLogger("qat")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = train(cfg)
    finally:
        log.info("output dir: %s", cfg.paths.output_dir)
        close_wandb()
        close_process_group()
    return metrics.get(cfg.get("optimized_metric") or "val/acc1_best")


def close_wandb() -> None:
    """Finish the W&B run so each job of a multirun gets its own."""
    import sys
    if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
        sys.modules["wandb"].finish()


def close_process_group() -> None:
    """Destroy the DDP process group so the next job of a multirun starts its own."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
