"""Knowledge distillation: losses (reference §4) and frozen, possibly quantized, teachers (§3.9, §4.3)."""
from qat.distill.losses import DistillLoss, embedding_mse, kd_kl, soft_target_ce
from qat.distill.teacher import load_teacher

__all__ = ["DistillLoss", "embedding_mse", "kd_kl", "load_teacher", "soft_target_ce"]
