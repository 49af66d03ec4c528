"""One training run from a composed Hydra config: build data, student, teacher, callbacks, trainer; fit; test."""
import dataclasses
import json
import logging
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

from qat.builders import as_dict, build, build_quant
from qat.callbacks import AtomicCheckpointIO, LastCheckpoint, RunSummary
from qat.checkpoint import fold_bn, folds_bn, init_from
from qat.data import build_batch_erasing, build_mixup
from qat.distill import load_teacher
from qat.extras import apply_extras
from qat.model_summary import quant_summary
from qat.module import LitClassifier
from qat.optim import OptimConfig
from qat.quant import compile_quantizers, quantize_, quantizers, quantizers_off
from qat.quant.callback import QuantizationCallback
from qat.runs import load_checkpoint, resolve, sha256_file
from qat.telemetry import QuantTelemetry

log = logging.getLogger(__name__)

COMPILE_MODES = (False, True, "quantizers")


def hydra_facts() -> dict:
    if not HydraConfig.initialized():
        return {"overrides": [], "choices": {}}
    hc = HydraConfig.get()
    return {"overrides": list(hc.overrides.task), "choices": dict(hc.runtime.choices)}


def check_compile(mode) -> None:
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile={mode!r}: use one of {list(COMPILE_MODES)} (true: the whole student; "
                         "quantizers: only the LSQ math, as compiled kernels, the model stays eager)")


def build_student(cfg: DictConfig, init_checkpoint=None) -> tuple[torch.nn.Module, dict]:
    """The student (quantized by cfg.quant) and the recipe `qat.load_model` rebuilds it from. A student
    initialised from a BN-folded run (a DFQ / CLE PTQ run; `init_checkpoint`: the loaded init_from file) is
    folded too, so every tensor loads."""
    model = build(cfg.model)
    folded = folds_bn(init_checkpoint)
    if folded:
        fold_bn(model)
    quant = build_quant(cfg.quant)
    if quant is not None:
        quantize_(model, quant)
    recipe = {"model": as_dict(cfg.model), "quant": as_dict(cfg.quant) if quant is not None else None,
              "num_classes": int(cfg.data.num_classes), **({"fold_bn": True} if folded else {})}
    return model, recipe


def build_distillation(cfg: DictConfig, student: torch.nn.Module) -> tuple:
    """Teacher (frozen) + loss from cfg.kd, or (None, None, {}) without KD."""
    teacher_cfg, loss_cfg = cfg.kd.teacher, cfg.kd.loss
    if teacher_cfg.model is None:
        if loss_cfg.two_head_alpha is not None:
            raise ValueError("kd.loss.two_head_alpha needs a teacher: choose one with kd=<teacher config>")
        return None, None, {}
    model_cfg, quant = as_dict(teacher_cfg.model), build_quant(teacher_cfg.quant)
    path = resolve(teacher_cfg.checkpoint, cfg.paths.output_root, model=model_cfg["name"], quant=quant)
    log.info("teacher: kd.teacher.checkpoint=%s -> %s", teacher_cfg.checkpoint, path)
    teacher = load_teacher(model_cfg, path, quant=quant, num_classes=int(cfg.data.num_classes))
    s_out, t_out = dry_run(student, teacher, int(cfg.data.img_size))
    distill = build(loss_cfg)(student_dim=s_out[1][-1].shape[-1], teacher_dim=t_out[1][-1].shape[-1])
    distill.check(s_out[0], t_out[0], s_out[1], t_out[1])  # shape mismatches fail before training starts
    meta = {"teacher": {"model": model_cfg["name"], "quant": as_dict(teacher_cfg.quant) if quant else None,
                        "checkpoint": str(path), "sha256": sha256_file(path)}}
    return teacher, distill, meta


def dry_run(student, teacher, img_size: int) -> tuple:
    """(logits, features) of student (quantizers bypassed: not initialised yet) and teacher on a zero batch."""
    x = torch.zeros(2, 3, img_size, img_size)
    with quantizers_off(student):  # also no_grad
        return student(x, return_features=True), teacher(x, return_features=True)


def run_meta(cfg: DictConfig, model, recipe: dict, kd_meta: dict, init_info: dict | None) -> dict:
    """The run facts summary.json starts with (sweep tables and teacher lookups read them)."""
    facts = hydra_facts()
    return {"name": cfg.name, "description": cfg.description, "expected_acc": cfg.expected_acc,
            "model": cfg.model.name, "quant": recipe["quant"], "quant_choice": facts["choices"].get("quant"),
            "kd": facts["choices"].get("kd", "none" if not kd_meta else "custom"), **kd_meta,
            "init_from": init_info["checkpoint"] if init_info else None, "overrides": facts["overrides"],
            "output_dir": cfg.paths.output_dir, "seed": cfg.seed, "tags": list(cfg.tags),
            "best_selected_on": "validation split" if cfg.data.get("val_split") else
            "test split (as in the log, which had no validation split: val/* metrics are test-set metrics)",
            "params": sum(p.numel() for p in model.parameters())}


def build_callbacks(cfg: DictConfig, output_dir: Path, meta: dict, quantized: bool, calibration) -> list:
    """The configured callbacks (conf/callbacks: best checkpoint, lr, throughput, ...), then qat's own: last.ckpt
    every epoch, summary.json, the quantizer lifecycle and telemetry."""
    callbacks = [build(c) for c in (cfg.callbacks or {}).values()]
    if not cfg.logger:  # logger=none: Lightning's LearningRateMonitor refuses a trainer without a logger
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    if not any(type(c) is ModelCheckpoint for c in callbacks):
        raise ValueError(f"callbacks={list(cfg.callbacks or {})} has no model_checkpoint: best.ckpt, testing and "
                         "summary.json need it; keep callbacks=default (or full) and add to it")
    last = LastCheckpoint(output_dir / "checkpoints")  # every epoch; Lightning's save_last follows best only
    callbacks += [last, RunSummary(output_dir, meta)]
    if quantized:
        callbacks.append(QuantizationCallback(calibration))
        if cfg.telemetry.every_n_steps:
            callbacks.append(QuantTelemetry(**as_dict(cfg.telemetry)))
    return callbacks


def build_trainer(cfg: DictConfig, output_dir: Path, callbacks: list) -> L.Trainer:
    loggers = [build(c) for c in cfg.logger.values()] if cfg.logger else False
    return build(cfg.trainer, callbacks=callbacks, logger=loggers, plugins=[AtomicCheckpointIO()],
                 default_root_dir=str(output_dir))


def compile_models(mode, model: torch.nn.Module, teacher: torch.nn.Module | None) -> None:
    if mode == "quantizers":
        count = sum(compile_quantizers(m) for m in (model, teacher) if m is not None)
        log.info("compiled LSQ kernels for %d quantizers (student and teacher)", count)
    elif mode:
        model.compile()  # in place: state_dict keys and checkpoints stay those of the plain model


def scaled_optim(cfg: DictConfig, world: int) -> tuple[OptimConfig, int]:
    """The optimizer settings with the lr scaled to the global batch, and the per-device batch size."""
    optim = OptimConfig(**as_dict(cfg.optim))
    global_batch = int(cfg.data.batch_size)
    if global_batch % world:
        raise ValueError(f"data.batch_size={global_batch} (global) is not divisible by the world size {world}")
    if optim.lr_scale_rule == "linear":
        optim = dataclasses.replace(optim, lr=optim.lr * global_batch / 128)
    log.info("global batch %d = %d device(s) x %d; lr %.3g (scale rule %s)", global_batch, world,
             global_batch // world, optim.lr, optim.lr_scale_rule)
    return optim, global_batch // world


def resume_path(cfg: DictConfig, output_dir: Path) -> str | None:
    if cfg.ckpt_path:
        return str(resolve(cfg.ckpt_path, cfg.paths.output_root, prefer="last"))
    if cfg.resume is None:
        return None
    if cfg.resume != "auto":
        raise ValueError(f"resume={cfg.resume!r}: use resume=auto (with the run's hydra.run.dir) or ckpt_path=<file>")
    last = output_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        log.info("resume=auto: continuing from %s", last)
        return str(last)
    log.info("resume=auto: no %s yet, starting fresh", last)
    return None


def fit_and_test(cfg: DictConfig, trainer: L.Trainer, module: LitClassifier, datamodule, output_dir: Path) -> dict:
    """Fit, keep the metrics as they are after training (test clears them), then test best.ckpt."""
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_path(cfg, output_dir))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if cfg.test_after_fit and not trainer.fast_dev_run and trainer.checkpoint_callback.best_model_path:
        trainer.test(module, datamodule=datamodule, ckpt_path=trainer.checkpoint_callback.best_model_path)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")})
    publish_summary(trainer, output_dir / "summary.json")
    return metrics


def publish_summary(trainer: L.Trainer, path: Path) -> None:
    """summary.json's values as the W&B run summary, so a dashboard compares runs by experiment-log row."""
    wandb_loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
    if wandb_loggers and trainer.is_global_zero and path.is_file():
        summary = json.loads(path.read_text())
        for logger in wandb_loggers:
            logger.experiment.summary.update({k: v for k, v in summary.items() if not isinstance(v, (dict, list))})


def train(cfg: DictConfig) -> dict:
    """Build data, student, teacher, module and trainer from `cfg`; fit; test; return the final metrics."""
    output_dir = Path(cfg.paths.output_dir)
    check_compile(cfg.compile)
    apply_extras(cfg)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = build(cfg.data, _convert_="all")
    init_path = resolve(cfg.init_from, cfg.paths.output_root) if cfg.init_from else None
    init_checkpoint = load_checkpoint(init_path) if init_path else None
    model, recipe = build_student(cfg, init_checkpoint)
    init_info = init_from(model, init_path, init_checkpoint) if init_path else None
    teacher, distill, kd_meta = build_distillation(cfg, model)
    meta = run_meta(cfg, model, recipe, kd_meta, init_info)
    callbacks = build_callbacks(cfg, output_dir, meta, recipe["quant"] is not None, datamodule.calibration_batch)
    trainer = build_trainer(cfg, output_dir, callbacks)
    compile_models(cfg.compile, model, teacher)
    optim, datamodule.batch_size = scaled_optim(cfg, trainer.world_size)
    aug = cfg.data.aug
    module = LitClassifier(model, optim, recipe, mixup=build_mixup(aug, cfg.data.num_classes),
                           mixup_off_epoch=aug.mixup_off_epoch, smoothing=aug.smoothing, teacher=teacher,
                           distill=distill, seed=cfg.seed, erasing=build_batch_erasing(aug))
    params = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
    for logger in trainer.loggers:
        logger.log_hyperparams(params)
    log.info("%d parameters; %d quantizers\n%s", meta["params"], sum(1 for _ in quantizers(model)),
             quant_summary(model))
    return fit_and_test(cfg, trainer, module, datamodule, output_dir)
