"""One training run from a composed Hydra config: build, fit, test, summarise."""
import logging
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from qat.callbacks import AtomicCheckpointIO, RunSummary, Throughput
from qat.checkpoint import init_from, resolve_checkpoint, resolve_reference
from qat.data import build_mixup
from qat.distill import DistillLoss, load_teacher, resolve_teacher_checkpoint, sha256_file
from qat.module import LitClassifier, OptimConfig
from qat.quant import QuantConfig, compile_quantizers, quantize_, quantizers
from qat.telemetry import QuantTelemetry

log = logging.getLogger(__name__)


def plain(node) -> dict | None:
    """A config node as a plain dict without Hydra's `_target_`, or None."""
    if node is None:
        return None
    return {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k != "_target_"}


def build(node, **kwargs):
    """hydra.utils.instantiate, raising the target's own error (e.g. the list of valid model names) unwrapped."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        raise (e.__cause__ or e) from None


@contextmanager
def quantizers_bypassed(model: torch.nn.Module):
    """Run `model` in eval mode with its quantizers off: shape checks before steps are initialised from data."""
    qs = [q for _, q in quantizers(model)]
    states, was_training = [q.enabled for q in qs], model.training
    for q in qs:
        q.enabled = False
    try:
        with torch.no_grad():
            yield model.eval()
    finally:
        for q, enabled in zip(qs, states):
            q.enabled = enabled
        model.train(was_training)


def hydra_facts() -> dict:
    if not HydraConfig.initialized():
        return {"overrides": [], "choices": {}}
    hc = HydraConfig.get()
    return {"overrides": list(hc.overrides.task), "choices": dict(hc.runtime.choices)}


COMPILE_MODES = (False, True, "quantizers")


def build_student(cfg: DictConfig) -> tuple[torch.nn.Module, dict]:
    model = build(cfg.model)
    quant = plain(cfg.quant)
    if quant is not None and not QuantConfig(**quant).is_fp:
        quantize_(model, QuantConfig(**quant))
    else:
        quant = None
    recipe = {"model": plain(cfg.model), "quant": quant, "num_classes": int(cfg.data.num_classes)}
    return model, recipe


def build_distillation(cfg: DictConfig, student: torch.nn.Module) -> tuple:
    """Teacher (frozen) + loss from cfg.kd, or (None, None, {}) without KD."""
    kd = cfg.kd
    if kd.model is None:
        if kd.two_head_alpha is not None:
            raise ValueError("kd.two_head_alpha needs a teacher: choose one with kd=<teacher config>")
        return None, None, {}
    teacher_cfg, teacher_quant = plain(kd.model), plain(kd.quant)
    if teacher_quant is not None and QuantConfig(**teacher_quant).is_fp:
        teacher_quant = None
    quant_choice = HydraConfig.get().runtime.choices.get("kd/quant") if HydraConfig.initialized() else None
    hint = f"python train.py model={teacher_cfg['name']}" + (f" quant={quant_choice}" if quant_choice else "")
    path, info = resolve_teacher_checkpoint(resolve_reference(kd.checkpoint, cfg.paths.output_root), teacher_cfg["name"], teacher_quant,
                                            cfg.paths.output_root, train_hint=hint)
    log.info("teacher: %s", info)
    teacher = load_teacher(teacher_cfg, str(path), quant=teacher_quant, num_classes=int(cfg.data.num_classes))
    s_out, t_out = dry_run(student, teacher, int(cfg.data.img_size))
    distill = DistillLoss(kind=kd.kind, temperature=kd.temperature, hard_weight=kd.hard_weight,
                          mse_alpha=kd.mse_alpha, mse_layers=kd.mse_layers, token_match=kd.token_match,
                          two_head_alpha=kd.two_head_alpha, project=kd.project,
                          student_dim=s_out[1][-1].shape[-1], teacher_dim=t_out[1][-1].shape[-1])
    distill.check(s_out[0], t_out[0], s_out[1], t_out[1])  # shape mismatches fail before training starts
    meta = {"teacher": {"model": teacher_cfg["name"], "quant": teacher_quant, "checkpoint": str(path),
                        "sha256": sha256_file(path)}}
    return teacher, distill, meta


def dry_run(student, teacher, img_size: int) -> tuple:
    """(logits, features) of student (quantizers bypassed: not initialised yet) and teacher on a zero batch."""
    x = torch.zeros(2, 3, img_size, img_size)
    with quantizers_bypassed(student):  # also no_grad
        return student(x, return_features=True), teacher(x, return_features=True)


def resume_path(cfg: DictConfig, output_dir: Path) -> str | None:
    if cfg.ckpt_path:
        return str(resolve_checkpoint(cfg.ckpt_path, prefer="last"))
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


def train(cfg: DictConfig) -> dict:
    """Build data, student, teacher, module and trainer from `cfg`; fit; test; return final metrics."""
    output_dir = Path(cfg.paths.output_dir)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = build(cfg.data, _convert_="all")
    model, recipe = build_student(cfg)
    init_info = init_from(model, resolve_reference(cfg.init_from, cfg.paths.output_root)) if cfg.init_from else None
    teacher, distill, kd_meta = build_distillation(cfg, model)

    facts = hydra_facts()
    meta = {"name": cfg.name, "description": cfg.description, "expected_acc": cfg.expected_acc,
            "model": cfg.model.name, "quant": recipe["quant"], "quant_choice": facts["choices"].get("quant"),
            "kd": facts["choices"].get("kd", "none" if teacher is None else "custom"), **kd_meta,
            "init_from": init_info["checkpoint"] if init_info else None, "overrides": facts["overrides"],
            "output_dir": str(output_dir), "seed": cfg.seed,
            "params": sum(p.numel() for p in model.parameters())}
    checkpointing = ModelCheckpoint(dirpath=output_dir / "checkpoints", filename="best", monitor="val/acc1",
                                    mode="max", save_last=True, save_top_k=1, enable_version_counter=False,
                                    auto_insert_metric_name=False)
    summary = RunSummary(output_dir, meta)
    loggers = [instantiate(c) for c in cfg.logger.values()] if cfg.logger else False
    callbacks = [checkpointing, summary, Throughput()]
    if recipe["quant"] is not None and cfg.telemetry.every_n_steps:
        callbacks.append(QuantTelemetry(**plain(cfg.telemetry)))
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    compile_mode = trainer_cfg.pop("compile", False)
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"trainer.compile={compile_mode!r}: use one of {list(COMPILE_MODES)} (true: the whole "
                         "student; quantizers: only the LSQ math, as compiled kernels, the model stays eager)")
    trainer = instantiate(trainer_cfg, callbacks=callbacks, logger=loggers,
                          plugins=[AtomicCheckpointIO()], default_root_dir=str(output_dir))
    if compile_mode == "quantizers":
        count = sum(compile_quantizers(m) for m in (model, teacher) if m is not None)
        log.info("compiled LSQ kernels for %d quantizers (student and teacher)", count)
    elif compile_mode:
        model.compile()  # in place: state_dict keys and checkpoints stay those of the plain model

    optim = OptimConfig(**plain(cfg.optim))
    global_batch = int(cfg.data.batch_size)
    world = trainer.world_size
    if global_batch % world:
        raise ValueError(f"data.batch_size={global_batch} (global) is not divisible by the world size {world}")
    datamodule.batch_size = global_batch // world
    if optim.lr_scale_rule == "linear":
        optim.lr = optim.lr * global_batch / 128
    elif optim.lr_scale_rule != "none":
        raise ValueError(f"optim.lr_scale_rule={optim.lr_scale_rule!r} is not one of ('none', 'linear')")
    log.info("global batch %d = %d device(s) x %d; lr %.3g (scale rule %s); %d parameters",
             global_batch, world, global_batch // world, optim.lr, optim.lr_scale_rule, meta["params"])

    module = LitClassifier(model, optim, recipe, mixup=build_mixup(cfg.data.aug, cfg.data.num_classes),
                           mixup_off_epoch=cfg.data.aug.mixup_off_epoch, smoothing=cfg.data.aug.smoothing,
                           teacher=teacher, distill=distill, calibration=datamodule.calibration_batch,
                           seed=cfg.seed)
    params = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
    for logger in trainer.loggers:
        logger.log_hyperparams(params)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_path(cfg, output_dir))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if checkpointing.best_model_score is not None:  # captured now: trainer.test() clears callback_metrics
        metrics["val/acc1_best"] = float(checkpointing.best_model_score)
    if cfg.test_after_fit and not trainer.fast_dev_run and checkpointing.best_model_path:
        trainer.test(module, datamodule=datamodule, ckpt_path="best")
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    return metrics
