"""Distillation losses: soft-target CE / KL on logits, token-embedding MSE, and `DistillLoss` (reference §4).

The log's KD loss is `soft_target_ce` at T=1 with no label term (§4.1); "mse, alpha A" adds A times
`embedding_mse` (§4.2); "two head A" mixes a KD head and a label head (§4.5).
"""
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("soft_ce", "kl")
LAYERS = ("last", "all")
TOKEN_MATCH = ("strict", "last", "pool")


def soft_target_ce(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                   temperature: float = 1.0) -> torch.Tensor:
    """T^2 * mean_b(-sum_c softmax(t/T)_c * log_softmax(s/T)_c), in float32 (at T=1: the log's KD loss)."""
    p_teacher = torch.softmax(teacher_logits.float() / temperature, dim=-1)
    log_p_student = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    loss = -(p_teacher * log_p_student).sum(dim=-1).mean()
    return temperature**2 * loss


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over the batch, in float32."""
    log_p_teacher = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    log_p_student = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    loss = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return temperature**2 * loss


def _pool_tokens(x: torch.Tensor, count: int) -> torch.Tensor:
    """(B, T, d) -> (B, count, d) by adaptive average pooling over the tokens."""
    return F.adaptive_avg_pool1d(x.transpose(1, 2), count).transpose(1, 2)


def _align(s: torch.Tensor, t: torch.Tensor, token_match: str, proj: nn.Module | None,
           index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring one student feature to the teacher feature's shape (B, T, d), or explain why not."""
    where = f"embedding MSE, feature {index}: student {tuple(s.shape)} vs teacher {tuple(t.shape)}"
    if s.ndim != t.ndim or s.shape[0] != t.shape[0]:
        raise ValueError(f"{where}: ranks or batch sizes differ; student and teacher features are not comparable")
    if proj is not None and s.shape[-1] != t.shape[-1]:
        s = proj(s)
    if s.shape == t.shape:
        return s, t
    if s.ndim != 3:
        raise ValueError(f"{where}: shapes differ; token matching and projection need (B, T, d) features")
    problems = []
    if s.shape[1] != t.shape[1]:
        if token_match == "strict":
            problems.append(f"token counts differ ({s.shape[1]} vs {t.shape[1]}): set kd.loss.token_match=last "
                            "(student's last N tokens) or kd.loss.token_match=pool (average-pool the longer sequence)")
        elif token_match == "last":
            if s.shape[1] < t.shape[1]:
                problems.append(f"kd.loss.token_match=last needs at least as many student tokens as teacher tokens "
                                f"({s.shape[1]} < {t.shape[1]}): use kd.loss.token_match=pool")
            else:
                s = s[:, -t.shape[1]:]
        elif s.shape[1] > t.shape[1]:
            s = _pool_tokens(s, t.shape[1])
        else:
            t = _pool_tokens(t, s.shape[1])
    if s.shape[-1] != t.shape[-1]:
        problems.append(f"embedding dims differ ({s.shape[-1]} vs {t.shape[-1]}): set kd.loss.project=true "
                        "(learned linear map student -> teacher dim)")
    if problems:
        raise ValueError(f"{where}: " + "; ".join(problems))
    return s, t


def embedding_mse(student_feats: list[torch.Tensor], teacher_feats: list[torch.Tensor],
                  layers: Literal["last", "all"] = "last", token_match: Literal["strict", "last", "pool"] = "strict",
                  proj: nn.Module | None = None) -> torch.Tensor:
    """Mean squared error between student and teacher token features (reference §4.2), in float32.

    Args:
        student_feats, teacher_feats: lists of (B, T, d) tensors (the models' `features`).
        layers: 'last' compares the last entries; 'all' averages the per-entry MSE over all entries.
        token_match: 'strict' (shapes must agree), 'last' (student's last N tokens, N = teacher tokens),
            'pool' (adaptive average pooling of the longer sequence to the shorter one).
        proj: module applied to student features whose dim differs from the teacher's (e.g. Linear d_s -> d_t).
    """
    if layers == "last":
        pairs = [(student_feats[-1], teacher_feats[-1])]
    elif len(student_feats) != len(teacher_feats):
        raise ValueError(f"layers='all' needs as many student features ({len(student_feats)}) as teacher features "
                         f"({len(teacher_feats)}); use kd.loss.mse_layers=last for models of different depth")
    else:
        pairs = list(zip(student_feats, teacher_feats))
    losses = []
    for i, (s, t) in enumerate(pairs):
        s, t = _align(s, t, token_match, proj, len(student_feats) - 1 if layers == "last" else i)
        losses.append(F.mse_loss(s.float(), t.float()))
    return torch.stack(losses).mean()


class DistillLoss(nn.Module):
    """KD loss of a student against a frozen teacher, plus optional label, token-MSE and two-head terms.

    total = kd + hard_weight * base(student, targets) + mse_alpha * mse                  (one head)
    total = a * kd + (1 - a) * base(label head, targets) + mse_alpha * mse               (two_head_alpha = a)
    where kd = `soft_target_ce` or `kd_kl` at `temperature` and base is the caller's non-KD loss.

    Args:
        kind: 'soft_ce' (the log's loss) or 'kl' (differs by the constant teacher entropy).
        temperature: softening temperature T; the KD term is scaled by T^2.
        hard_weight: weight of the label loss on the KD head; 0 = labels unused (the log).
        mse_alpha: weight of the token-embedding MSE; 0 = off (features not needed).
        mse_layers: 'last' or 'all' feature entries for the MSE.
        token_match: 'strict', 'last' or 'pool' token alignment (see `embedding_mse`).
        two_head_alpha: None (one head) or a in [0, 1], the KD head's weight against the label head.
        project: learn a Linear student_dim -> teacher_dim for the MSE when the dims differ
            (one map shared by all compared entries).
        student_dim, teacher_dim: feature widths; required with project=True.
    """

    def __init__(self, kind: Literal["soft_ce", "kl"] = "soft_ce", temperature: float = 1.0, hard_weight: float = 0.0,
                 mse_alpha: float = 0.0, mse_layers: Literal["last", "all"] = "last",
                 token_match: Literal["strict", "last", "pool"] = "strict", two_head_alpha: float | None = None,
                 project: bool = False, student_dim: int | None = None, teacher_dim: int | None = None):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kd.loss.kind={kind!r} is not one of {KINDS}")
        if not temperature > 0:
            raise ValueError(f"kd.loss.temperature={temperature!r} must be > 0")
        for field, value in (("hard_weight", hard_weight), ("mse_alpha", mse_alpha)):
            if not value >= 0:
                raise ValueError(f"kd.loss.{field}={value!r} must be >= 0")
        if mse_layers not in LAYERS:
            raise ValueError(f"kd.loss.mse_layers={mse_layers!r} is not one of {LAYERS}")
        if token_match not in TOKEN_MATCH:
            raise ValueError(f"kd.loss.token_match={token_match!r} is not one of {TOKEN_MATCH}")
        if two_head_alpha is not None and not 0 <= two_head_alpha <= 1:
            raise ValueError(f"kd.loss.two_head_alpha={two_head_alpha!r} must be null or in [0, 1]")
        if two_head_alpha is not None and hard_weight > 0:
            raise ValueError(f"kd.loss.hard_weight={hard_weight} and kd.loss.two_head_alpha={two_head_alpha} conflict: "
                             "with two heads the labels train the label head; set kd.loss.hard_weight=0")
        if project and (student_dim is None or teacher_dim is None):
            raise ValueError(f"kd.loss.project=true needs student_dim and teacher_dim (got {student_dim}, "
                             f"{teacher_dim})")
        self.kind = kind
        self.temperature = float(temperature)
        self.hard_weight = float(hard_weight)
        self.mse_alpha = float(mse_alpha)
        self.mse_layers = mse_layers
        self.token_match = token_match
        self.two_head_alpha = None if two_head_alpha is None else float(two_head_alpha)
        # only a projection that takes part in every step (DDP rejects parameters without gradients)
        use_proj = project and self.mse_alpha > 0 and student_dim != teacher_dim
        self.proj = nn.Linear(student_dim, teacher_dim) if use_proj else None

    @property
    def needs_features(self) -> bool:
        return self.mse_alpha > 0

    def extra_repr(self) -> str:
        return (f"kind={self.kind}, temperature={self.temperature}, hard_weight={self.hard_weight}, "
                f"mse_alpha={self.mse_alpha}, mse_layers={self.mse_layers}, token_match={self.token_match}, "
                f"two_head_alpha={self.two_head_alpha}")

    def kd_loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        fn = soft_target_ce if self.kind == "soft_ce" else kd_kl
        return fn(student_logits, teacher_logits, self.temperature)

    def check(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
              student_feats: list[torch.Tensor] | None = None, teacher_feats: list[torch.Tensor] | None = None) -> None:
        """Raise the error a training step would raise for these outputs (a dry run before training); the steps
        themselves do not re-check."""
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                             f"{tuple(teacher_logits.shape)} differ: teacher and student must predict the same classes")
        self.kd_loss(student_logits, teacher_logits)
        if self.needs_features:
            embedding_mse(student_feats, teacher_feats, self.mse_layers, self.token_match, self.proj)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                base_loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                student_feats: list[torch.Tensor] | None = None, teacher_feats: list[torch.Tensor] | None = None,
                label_logits: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and its unweighted terms {'kd', 'mse', 'hard', 'label_head'} (only the active ones, detached)."""
        if teacher_logits is None:
            raise ValueError("DistillLoss needs teacher logits (kd.teacher.model is set but no teacher output was "
                             "given)")
        terms = {"kd": self.kd_loss(student_logits, teacher_logits)}
        if self.two_head_alpha is None:
            total = terms["kd"]
            if self.hard_weight > 0:
                terms["hard"] = base_loss_fn(student_logits, targets).float()
                total = total + self.hard_weight * terms["hard"]
        else:
            if label_logits is None:
                raise ValueError("kd.loss.two_head_alpha is set but no label-head logits were given: build the student "
                                 "with model.label_head=true")
            a = self.two_head_alpha
            terms["label_head"] = base_loss_fn(label_logits, targets).float()
            total = a * terms["kd"] + (1 - a) * terms["label_head"]
        if self.needs_features:
            if student_feats is None or teacher_feats is None:
                raise ValueError(f"kd.loss.mse_alpha={self.mse_alpha} needs student and teacher features")
            terms["mse"] = embedding_mse(student_feats, teacher_feats, self.mse_layers, self.token_match, self.proj)
            total = total + self.mse_alpha * terms["mse"]
        return total, {name: value.detach() for name, value in terms.items()}
