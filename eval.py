"""Evaluate or use a trained model: `python eval.py ckpt=<run dir | .ckpt | experiment:<name>>` (see README)."""
import json

import hydra
from omegaconf import DictConfig, OmegaConf

from qat.runs import resolve


def run_dir_model(ckpt, model_name, output_root) -> str:
    """The model name for the eval run dir: model=, else the run's summary.json, else 'model'."""
    if model_name:
        return str(model_name)
    try:
        summary = resolve(str(ckpt), output_root).parent.parent / "summary.json"  # <run>/checkpoints/<file>
        return str(json.loads(summary.read_text()).get("model") or "model")
    except (OSError, ValueError, AttributeError):  # FileNotFoundError included; eval.py reports it later
        return "model"


OmegaConf.register_new_resolver("run_dir_model", run_dir_model, replace=True)


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
