"""Knowledge distillation: losses (reference §4) and frozen, possibly quantized, teachers (§3.9, §4.3)."""
from qat.distill.losses import DistillLoss, embedding_mse, kd_kl, soft_target_ce
from qat.distill.teacher import (check_teacher_outputs, load_teacher, normalize_quant, resolve_teacher_checkpoint,
                                 sha256_file)

__all__ = ["DistillLoss", "check_teacher_outputs", "embedding_mse", "kd_kl", "load_teacher", "normalize_quant",
           "resolve_teacher_checkpoint", "sha256_file", "soft_target_ce"]
