"""Evaluate or use a trained model: `python eval.py ckpt=<run dir | .ckpt | experiment:<name> | zoo:<name>>`."""
import hydra
from omegaconf import DictConfig

import qat  # noqa: F401  (registers the resolvers conf/eval.yaml uses)


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> dict:
    from qat.evaluate import evaluate  # after Hydra has parsed the command line: --help stays fast
    from qat.predict import predict
    try:
        return predict(cfg) if cfg.predict.input else evaluate(cfg)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"eval.py: {e}") from None


if __name__ == "__main__":
    main()
