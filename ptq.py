"""Post-training quantization: `python ptq.py ckpt=<run dir | .ckpt | zoo:<name>> quant=w4a32 ptq=mse_channel`.

Errors end in one `error:` line (exit 2: bad input, 1: crash; HYDRA_FULL_ERROR=1: traceback), as train.py's.
"""
import logging

import hydra
from omegaconf import DictConfig

from qat import errors
from qat.ptq.pipeline import run

log = logging.getLogger("qat")


@hydra.main(version_base="1.3", config_path="conf", config_name="ptq")
def main(cfg: DictConfig) -> float:
    try:
        with errors.reported():
            return run(cfg)["quant_acc"]
    finally:
        log.info("output dir: %s", cfg.paths.output_dir)


if __name__ == "__main__":
    errors.install_hydra_reporter()
    main()
