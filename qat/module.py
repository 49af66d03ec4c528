"""The LightningModule: student (+ frozen teacher), losses, optimizer, schedule, metrics."""
import random

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn
from torchmetrics import MaxMetric
from torchmetrics.classification import MulticlassAccuracy

from qat.guards import NonFiniteError, non_finite_report
from qat.optim import OptimConfig, build_optimizer, clip_gradients, cosine_schedule, param_groups


class LitClassifier(L.LightningModule):
    """Trains `model` on labels or, with a teacher, on distillation targets.

    Args:
        model: the student (a qat model, possibly quantized).
        optim: optimizer and schedule settings.
        recipe: what `qat.load_model` needs to rebuild the student; stored in every checkpoint.
        mixup: timm Mixup (mixes inputs, returns soft targets) or None.
        mixup_off_epoch: epoch from which mixing stops (0 = never).
        smoothing: label smoothing when mixup is off.
        teacher: frozen teacher; kept out of the state_dict, the optimizer and DDP.
        distill: a qat.distill.DistillLoss, required with a teacher or a label head.
        seed: base seed; each epoch reseeds from (seed, epoch, rank) so resumed runs match.
        erasing: timm RandomErasing applied to the mixed, normalized training batch (qat.data.build_batch_erasing),
            or None.

    Quantizers are initialised and their steps clamped by `qat.quant.QuantizationCallback`, not here.
    """

    def __init__(self, model: nn.Module, optim: OptimConfig, recipe: dict, mixup=None, mixup_off_epoch: int = 0,
                 smoothing: float = 0.0, teacher: nn.Module | None = None, distill: nn.Module | None = None,
                 seed: int = 42, erasing=None):
        super().__init__()
        self.model = model
        self.optim = optim
        self.recipe = recipe
        self.mixup = mixup
        self.mixup_off_epoch = mixup_off_epoch
        self.distill = distill
        self.__dict__["teacher"] = teacher  # not a submodule: never saved, trained or DDP-wrapped
        self.seed = seed
        self.erasing = erasing
        self.base_loss = SoftTargetCrossEntropy() if mixup is not None else (
            LabelSmoothingCrossEntropy(smoothing) if smoothing > 0 else nn.CrossEntropyLoss())
        num_classes = recipe["num_classes"]
        self.val_acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_acc5 = MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro")
        self.val_acc1_best = MaxMetric()
        self.val_acc1_best.persistent(True)  # resumed runs keep their best
        self.test_acc1 = self.val_acc1.clone()
        self.test_acc5 = self.val_acc5.clone()

    # ---- setup -------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        if self.teacher is not None:
            self.teacher.to(self.device)
            self.trainer.precision_plugin.convert_module(self.teacher)
        if self.erasing is not None:
            self.erasing.device = self.device  # its N(0, 1) pixels are drawn where the batch is

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if batch_idx == 0:  # model/mixup randomness of an epoch depends only on (seed, epoch, rank)
            s = (self.seed * 100_003 + self.current_epoch * 1_009 + self.global_rank) % 2**31
            random.seed(s)
            np.random.seed(s)
            torch.manual_seed(s)
        if self.mixup is not None:
            self.mixup.mixup_enabled = self.mixup_off_epoch == 0 or self.current_epoch < self.mixup_off_epoch

    # ---- steps -------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int):
        x, y = batch
        targets = y
        if self.mixup is not None:
            x, targets = self.mixup(x, y)
        if self.erasing is not None:  # after mixing, as the original's GPU erasing (reference §2.3)
            x = self.erasing(x)
        loss, terms, logits = self._loss(x, targets)
        if not torch.isfinite(loss):
            raise NonFiniteError(self._non_finite_report(loss, x))
        for name, value in terms.items():
            self.log(f"train/{name}", value, on_step=True, on_epoch=True)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        labels = targets.argmax(-1) if targets.ndim == 2 else y  # mixed targets: their dominant class
        self.log("train/acc1", (logits.argmax(-1) == labels).float().mean(), on_step=False, on_epoch=True,
                 prog_bar=True)
        return loss

    def _loss(self, x, targets):
        if self.teacher is None and self.distill is None:
            logits = self.model(x)
            return self.base_loss(logits, targets), {}, logits
        need_feats = self.distill.needs_features
        t_logits, t_feats = None, None
        if self.teacher is not None:  # first: its temporaries are freed before the student's activations pile up
            with torch.no_grad():
                t_out = self.teacher(x, return_features=need_feats)
            t_logits, t_feats = t_out if need_feats else (t_out, None)
            if self.global_step == 0 and not torch.isfinite(t_logits).all():
                raise NonFiniteError("the teacher produced non-finite logits on the first batch: "
                                     "check kd.teacher.checkpoint")
        label_logits = None
        pooled, feats = self.model.forward_features(x)
        logits = self.model.forward_head(pooled)
        if self.distill.two_head_alpha is not None:
            label_logits = self.model.forward_head(pooled, label=True)
        loss, terms = self.distill(logits, t_logits, targets, self.base_loss,
                                   student_feats=feats if need_feats else None,
                                   teacher_feats=t_feats, label_logits=label_logits)
        return loss, terms, logits

    def _non_finite_report(self, loss, x) -> str:
        self._save_crash_checkpoint()
        return (f"non-finite loss ({loss.item()}) at global step {self.global_step}, epoch {self.current_epoch}; "
                f"{non_finite_report(self.model, x)}. Saved crash.ckpt in the checkpoint dir.")

    def _save_crash_checkpoint(self) -> None:
        ckpt_cb = getattr(self.trainer, "checkpoint_callback", None)
        if ckpt_cb is None or ckpt_cb.dirpath is None:
            return
        state = {"state_dict": {f"model.{k}": v for k, v in self.model.state_dict().items()}, "qat": self.recipe,
                 "global_step": self.global_step, "epoch": self.current_epoch}
        self.trainer.strategy.checkpoint_io.save_checkpoint(state, f"{ckpt_cb.dirpath}/crash.ckpt")

    def _eval_step(self, batch, stage: str, acc1, acc5):
        x, y = batch
        logits = self.model(x)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), on_epoch=True, sync_dist=True)
        acc1.update(logits, y)
        acc5.update(logits, y)
        self.log(f"{stage}/acc1", acc1, on_epoch=True, prog_bar=True)
        self.log(f"{stage}/acc5", acc5, on_epoch=True)

    def validation_step(self, batch, batch_idx: int):
        self._eval_step(batch, "val", self.val_acc1, self.val_acc5)

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.val_acc1_best.update(self.val_acc1.compute())
            self.log("val/acc1_best", self.val_acc1_best.compute(), sync_dist=True)

    def test_step(self, batch, batch_idx: int):
        self._eval_step(batch, "test", self.test_acc1, self.test_acc5)

    # ---- optimisation ------------------------------------------------------------------------
    def configure_optimizers(self):
        o = self.optim
        groups = param_groups(self.model, o.weight_decay, o.quant_lr, o.decay_embeddings)
        if self.distill is not None:
            groups += [{"params": list(self.distill.parameters()), "weight_decay": 0.0, "name": "distill"}]
            groups = [g for g in groups if g["params"]]
        optimizer = build_optimizer(groups, o)
        scheduler = cosine_schedule(optimizer, o.epochs or self.trainer.max_epochs, o.warmup_epochs, o.warmup_lr,
                                    o.min_lr, o.cooldown_epochs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def lr_scheduler_step(self, scheduler, metric) -> None:
        scheduler.step(epoch=self.current_epoch + 1)  # timm: the lr of the epoch about to start

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        if self.optim.clip_grad is not None:  # runs on unscaled gradients under AMP
            clip_gradients(self.model, self.optim.clip_grad, self.optim.clip_mode)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["qat"] = self.recipe
