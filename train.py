"""Train one model: `python train.py model=vit_6_4_32 quant=act2b kd=vit` (see README).

Errors end in one `error:` line (exit 2: bad input, 1: crash; HYDRA_FULL_ERROR=1 or debug=<config>: traceback).
"""
import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import qat.run
from qat import errors, moved_keys, runlock, validate
from qat.callbacks import mark_run

log = logging.getLogger("qat")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    output_dir, lock = Path(cfg.paths.output_dir), None
    try:
        validate.check(cfg, list(HydraConfig.get().overrides.task))
        lock = runlock.acquire(output_dir) if is_rank_zero() else None
        metrics = qat.run.train(cfg)
    except KeyboardInterrupt:
        if lock is not None:
            mark_run(output_dir, "interrupted", "KeyboardInterrupt")
        raise
    except Exception as exc:
        if lock is not None:  # only the process that holds the dir marks it
            mark_run(output_dir, "failed", errors.one_line(exc))
        if errors.full_errors():
            raise
        raise SystemExit(errors.report(exc)) from None
    finally:
        if lock is not None:
            runlock.release(lock)
        log.info("output dir: %s", output_dir)
        close_wandb()
        close_process_group()
    return metrics.get(cfg.get("optimized_metric") or "val/acc1_best")


def is_rank_zero() -> bool:
    """False in the DDP/SLURM worker processes of a run (they share rank 0's dir and lock)."""
    return all(int(os.environ.get(k, 0)) == 0 for k in ("RANK", "LOCAL_RANK", "SLURM_PROCID"))


def close_wandb() -> None:
    """Finish the W&B run so each job of a multirun gets its own."""
    if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
        sys.modules["wandb"].finish()


def close_process_group() -> None:
    """Destroy the DDP process group so the next job of a multirun starts its own."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    with errors.reported():
        moved_keys.check(sys.argv[1:])
    errors.install_hydra_reporter()
    main()
