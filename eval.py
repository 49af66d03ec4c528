"""Evaluate or use a trained model: `python eval.py ckpt=<run dir | .ckpt | experiment:<name> | zoo:<name>>`.

Errors end in one `error:` line (exit 2: bad input, 1: crash; HYDRA_FULL_ERROR=1: traceback), as train.py's.
"""
import hydra
from omegaconf import DictConfig

from qat import errors


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> dict:
    from qat.evaluate import evaluate  # after Hydra has parsed the command line: --help stays fast
    from qat.predict import predict
    with errors.reported():
        return predict(cfg) if cfg.predict.input else evaluate(cfg)


if __name__ == "__main__":
    errors.install_hydra_reporter()
    main()
