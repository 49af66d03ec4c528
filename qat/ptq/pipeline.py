"""One PTQ run from a composed config: load the FP model, quantize, calibrate, transform, evaluate, write a run dir.

The run dir has summary.json and checkpoints/best.ckpt in the run checkpoint format, so `qat.load_model`,
`train.py init_from=<run>` and `kd.checkpoint=<run>` read it as they read a training run.
"""
import copy
import dataclasses
import logging
import time
from pathlib import Path

import torch
from PIL import Image
from omegaconf import DictConfig

from qat.callbacks import AtomicCheckpointIO, write_json_atomic
from qat.builders import as_dict, build, build_quant
from qat.checkpoint import build_from_recipe
from qat.datafree.bn_bias import bn_bias_correct_
from qat.evaluate import score
from qat.ptq.awq import awq_
from qat.ptq.bias_correction import bias_correct_
from qat.ptq.calibrate import calibrate
from qat.ptq.dfq import check_datafree, fold_and_equalize_, folds
from qat.ptq.observers import create_observer
from qat.ptq.reconstruct import ReconConfig, reconstruct_, units
from qat.quant import QuantConfig, quantize_
from qat.runs import load_checkpoint, model_state, resolve

log = logging.getLogger(__name__)
PTQ_BITS = range(2, 9)
DEFAULT_EPS = 1e-5  # LSQQuantizer's step floor


def load_fp_checkpoint(ref: str, output_root: str | Path) -> tuple[Path, dict]:
    """(checkpoint file, checkpoint) of an FP run; errors for a quantized or foreign checkpoint."""
    path = resolve(ref, output_root)
    checkpoint = load_checkpoint(path)
    if "qat" not in checkpoint:
        raise ValueError(f"ckpt={ref}: {path} is not a qat run checkpoint (no 'qat' recipe); train the FP model "
                         "with train.py and pass its run dir")
    quant = checkpoint["qat"].get("quant")
    if build_quant(quant) is not None:
        raise ValueError(f"ckpt={ref} is already quantized (quant={quant}); PTQ starts from an FP checkpoint: "
                         "give the FP run it was trained from")
    return path, checkpoint


def quant_config(cfg: DictConfig) -> QuantConfig:
    """The QuantConfig of the run: cfg.quant with ptq.granularity, ptq.eps, the seed-004 keys (head_stem_8bit,
    n_groups, dynamic_groups) and, for bias correction, add_bias."""
    quant = as_dict(cfg.quant)
    granularity = {"weight": cfg.ptq.granularity, "act": cfg.ptq.get("act_granularity") or cfg.ptq.granularity}
    for key, value in (("granularity", granularity["weight"]), ("act_granularity", granularity["act"])):
        if value not in ("layer", "channel"):
            raise ValueError(f"ptq.{key}={value!r}: choose 'layer' or 'channel'")
    eps = cfg.ptq.get("eps", DEFAULT_EPS)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"ptq.eps={eps!r}: the step floor must be a number > 0, e.g. ptq.eps=1e-4")
    for key in ("weight", "act", "attn"):
        if quant.get(key) is None:
            continue
        if key in granularity:
            quant[key]["per_channel"] = granularity[key] == "channel"
        quant[key]["eps"] = float(eps)
        if quant[key]["bits"] not in PTQ_BITS:
            raise ValueError(f"quant.{key}.bits={quant[key]['bits']}: PTQ supports {PTQ_BITS.start}.."
                             f"{PTQ_BITS.stop - 1} bits (1-bit sign quantizers have no observer)")
    if cfg.ptq.bias_correct == "variance" and quant.get("weight") is not None and granularity["weight"] != "channel":
        raise ValueError(f"ptq.bias_correct=variance scales each output channel's weight step: ptq.granularity="
                         f"{granularity['weight']!r} has one step per layer; set ptq.granularity=channel "
                         "(e.g. ptq=mse_channel) or ptq.bias_correct=empirical")
    quant.update(seed004_keys(cfg.ptq, quant.get("head_stem_bits")))
    recon = recon_config(cfg.ptq)
    learns_bias = recon is not None and bool({"eta", "b"} & set(recon.learn))
    quant["add_bias"] = bool(cfg.ptq.bias_correct) or folds(cfg.ptq) or learns_bias
    config = build_quant(quant)
    if config is None:
        raise ValueError("quant=fp quantizes nothing: choose a bit width, e.g. quant=w4a32 or quant=w32a8")
    return config


def seed004_keys(ptq: DictConfig, head_stem_bits: int | None = None) -> dict:
    """The QuantConfig fields set by ptq.head_stem_8bit, ptq.n_groups and ptq.dynamic_groups. Without
    head_stem_8bit the stem and head keep quant.head_stem_bits (null: FP; e.g. 4: at the other layers' bits)."""
    head_stem = ptq.get("head_stem_8bit", False)
    if not isinstance(head_stem, bool):
        raise ValueError(f"ptq.head_stem_8bit={head_stem!r}: choose true (stem and head at 8 bits) or false")
    if head_stem and head_stem_bits not in (None, 8):
        raise ValueError(f"ptq.head_stem_8bit=true puts the stem and head at 8 bits but quant.head_stem_bits="
                         f"{head_stem_bits}: drop one of the two (ptq.head_stem_8bit=false keeps {head_stem_bits})")
    groups, dynamic = ptq.get("n_groups"), ptq.get("dynamic_groups", False)
    if groups is not None and (isinstance(groups, bool) or not isinstance(groups, int) or groups < 1):
        raise ValueError(f"ptq.n_groups={groups!r}: use an integer >= 1 (seed 004: 8) or null")
    if not isinstance(dynamic, bool):
        raise ValueError(f"ptq.dynamic_groups={dynamic!r}: choose true (per-instance groups) or false")
    return {"head_stem_bits": 8 if head_stem else head_stem_bits, "n_groups": groups, "dynamic_groups": dynamic}


def recon_config(ptq: DictConfig) -> ReconConfig | None:
    """ReconConfig of `ptq.recon` (null when ptq.recon.enabled is false)."""
    recon = ptq.get("recon")
    if not isinstance(recon, DictConfig):
        raise ValueError(f"ptq.recon={recon!r}: reconstruction is the ptq.recon.* group now; pick a preset "
                         "(ptq=adaround, brecq, qdrop, nwq, case2_2, adaqtransform) or set ptq.recon.enabled=true")
    settings = as_dict(recon)
    if not settings.pop("enabled"):
        asked = [k for k in ("xi", "eta", "s_w_dq") if k in settings.get("learn", ())]
        if asked:
            raise ValueError(f"ptq.recon.learn has {asked} but ptq.recon.enabled=false: they are only learnt by "
                             "reconstruction; set ptq.recon.enabled=true (e.g. ptq=adaqtransform) or drop them")
        return None
    valid = [f.name for f in dataclasses.fields(ReconConfig)]
    unknown = sorted(set(settings) - set(valid))
    if unknown:
        raise ValueError(f"ptq.recon: unknown keys {unknown}; valid keys are {['enabled'] + valid}")
    return ReconConfig(**settings)


def check_method(recipe: dict, config: QuantConfig, ptq: DictConfig) -> None:
    """Errors of the method on this model (observers, recon, awq), on a throwaway quantized copy."""
    observers(ptq)
    check_datafree(build_from_recipe(recipe), ptq)
    recon = recon_config(ptq)
    probe = quantize_(build_from_recipe(recipe), config)
    if recon is not None and not units(probe, recon.granularity):
        raise ValueError(f"ptq.recon: {recipe['model']['name']} has no quantized layer with a weight quantizer to "
                         "reconstruct; set quant.weight (e.g. quant=w4a32) or ptq.recon.enabled=false")
    if ptq.awq and config.weight is None:
        raise ValueError("ptq.awq=true scales weights: set quant.weight (e.g. quant=w4a32) or ptq.awq=false")


def observers(ptq: DictConfig):
    weight = create_observer(**as_dict(ptq.observer))
    act = create_observer(**as_dict(ptq.act_observer)) if ptq.act_observer is not None else weight
    return weight, act


def calibration_batches(datamodule, n: int, seed: int, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`n` (image, label) pairs of the training split picked by `seed`, eval transform (no augmentation), in batches."""
    train = datamodule.train_set
    if n > len(train):
        raise ValueError(f"ptq.calib_size={n} is larger than the training split ({len(train)} images of "
                         f"{datamodule.name}); use ptq.calib_size<={len(train)}")
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n]
    transform = datamodule.test_set.transform
    images = torch.stack([transform(Image.fromarray(train.images[i])) for i in pick.tolist()])
    labels = torch.as_tensor(train.labels)[pick].long()
    return list(zip(images.split(batch_size), labels.split(batch_size)))


def calib_data(datamodule) -> str:
    """summary.json's calibration source: `real` (the training split) or the synthetic method with its settings."""
    s = getattr(datamodule, "synthetic", None)
    if s is None:
        return "real"
    options = ", ".join(f"{k}={v}" for k, v in sorted((s.get(s["method"]) or {}).items()))
    return f"{s['method']}({options})" if options else s["method"]


@torch.no_grad()
def evaluate(model: torch.nn.Module, datamodule) -> float:
    """Top-1 accuracy (%) on the test split (`qat.evaluate.score`, as eval.py computes it)."""
    return score(model.eval(), datamodule.test_dataloader(), datamodule.num_classes)["acc1"]


def quantize_model(model, config: QuantConfig, batches: list, cfg: DictConfig) -> dict:
    """Quantize `model` in place by the ptq config; returns the facts for summary.json."""
    ptq, recon = cfg.ptq, recon_config(cfg.ptq)
    weight_obs, act_obs = observers(ptq)
    stats = fold_and_equalize_(model, ptq)
    quantize_(model, config)
    facts, start = {}, time.perf_counter()
    if ptq.awq:
        facts["awq_alpha"] = awq_(model, batches, weight_obs, int(ptq.awq_grid))
        facts["awq_time_s"] = time.perf_counter() - start
    t = time.perf_counter()
    facts["quant_mse"] = calibrate(model, batches, weight_obs, act_obs, int(ptq.max_samples))
    facts["calibration_time_s"] = time.perf_counter() - t
    # reconstruction's FP targets: the weights and biases as they are before bias correction changes them
    reference = copy.deepcopy(model) if recon is not None and recon.objective == "output_mse" else None
    if ptq.bias_correct:  # true | empirical | variance | bn_stats (checked by check_datafree)
        t = time.perf_counter()
        bn_stats, variance = ptq.bias_correct == "bn_stats", ptq.bias_correct == "variance"
        facts["bias_correction"] = bn_bias_correct_(model, stats) if bn_stats else \
            bias_correct_(model, batches, variance=variance)
        facts["bias_correction_time_s"] = time.perf_counter() - t
    if recon is not None:
        t = time.perf_counter()
        report = reconstruct_(model, batches, recon, reference)
        facts["recon"] = {**dataclasses.asdict(recon), "units": report,
                          "time_s": time.perf_counter() - t}
    facts["total_time_s"] = time.perf_counter() - start  # quantization work, without the two evaluations
    return facts


def save_run(output_dir: Path, model, recipe: dict, summary: dict) -> None:
    """checkpoints/best.ckpt (run checkpoint format) and summary.json, each written atomically."""
    ckpt = output_dir / "checkpoints" / "best.ckpt"
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    AtomicCheckpointIO().save_checkpoint({"state_dict": state, "qat": recipe}, ckpt)
    write_json_atomic(output_dir / "summary.json", {**summary, "best_ckpt": str(ckpt), "finished": True})


def test_first(ptq: DictConfig) -> bool:
    """ptq.test_before_calibration: evaluate the FP model before quantizing (default true)."""
    value = ptq.get("test_before_calibration", True)
    if not isinstance(value, bool):
        raise ValueError(f"ptq.test_before_calibration={value!r}: choose true (evaluate FP first) or false")
    return value


def run(cfg: DictConfig) -> dict:
    """The PTQ run of `cfg` (conf/ptq.yaml); returns the summary."""
    output_dir = Path(cfg.paths.output_dir)
    source, checkpoint = load_fp_checkpoint(cfg.ckpt, cfg.paths.output_root)
    config, test_fp = quant_config(cfg), test_first(cfg.ptq)
    check_method(checkpoint["qat"], config, cfg.ptq)
    datamodule = build(cfg.data, _convert_="all")
    datamodule.setup()
    batches = calibration_batches(datamodule, int(cfg.ptq.calib_size), int(cfg.ptq.calib_seed),
                                  int(cfg.ptq.calib_batch_size))
    recipe = checkpoint["qat"]
    model = build_from_recipe(recipe)
    model.load_state_dict(model_state(checkpoint), strict=True)
    fp_acc = evaluate(model, datamodule) if test_fp else None
    facts = quantize_model(model, config, batches, cfg)
    acc = evaluate(model, datamodule)
    quant = dataclasses.asdict(config)
    summary = {"name": cfg.name, "model": recipe["model"]["name"], "quant": quant, "source_ckpt": str(source),
               "method": as_dict(cfg.ptq), "bits": {
                   k: None if getattr(config, k) is None else getattr(config, k).bits for k in ("weight", "act")},
               "fp_acc": fp_acc, "quant_acc": acc, "best_val_acc": acc, "test_acc": acc,
               "calib_size": sum(len(images) for images, _ in batches),
               "calib_data": calib_data(datamodule),
               "calib_transform": "eval (no augmentation), training split",
               "output_dir": str(output_dir), **facts}
    save_run(output_dir, model, {**recipe, "quant": quant, **({"fold_bn": True} if folds(cfg.ptq) else {})}, summary)
    log.info("PTQ %s: FP %s -> %.2f%% (calibration %.1fs) -> %s", summary["model"],
             "not evaluated" if fp_acc is None else f"{fp_acc:.2f}%", acc, facts["calibration_time_s"], output_dir)
    return summary
