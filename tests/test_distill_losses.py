"""Distillation losses against values worked out by hand (reference §4)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qat.distill import DistillLoss, embedding_mse, kd_kl, soft_target_ce

# row 0: teacher uniform over 3 classes, student exp-logits 1, 2, 5 (sum 8)
# row 1: teacher probabilities 0.2, 0.6, 0.2, student uniform
STUDENT = torch.tensor([[0.0, math.log(2), math.log(5)], [0.0, 0.0, 0.0]])
TEACHER = torch.tensor([[0.0, 0.0, 0.0], [0.0, math.log(3), 0.0]])
CE_ROWS = [math.log(8) - math.log(10) / 3, math.log(3)]  # -sum_c p_t log p_s per row
ENTROPY_ROWS = [math.log(3), -(2 * 0.2 * math.log(0.2) + 0.6 * math.log(0.6))]
SOFT_CE = sum(CE_ROWS) / 2
TEACHER_ENTROPY = sum(ENTROPY_ROWS) / 2


def close(actual: torch.Tensor, expected: float) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float32), rtol=1e-6, atol=1e-6)


def test_soft_target_ce_at_t1_is_the_logs_kd_loss():
    close(soft_target_ce(STUDENT, TEACHER), SOFT_CE)


def test_soft_target_ce_at_t4_scales_logits_and_multiplies_by_t_squared():
    close(soft_target_ce(4 * STUDENT, 4 * TEACHER, temperature=4.0), 16 * SOFT_CE)


def test_soft_target_ce_computes_in_float32():
    student, teacher = STUDENT.half(), TEACHER.bfloat16()
    loss = soft_target_ce(student, teacher)
    assert loss.dtype == torch.float32
    assert loss.item() == soft_target_ce(student.float(), teacher.float()).item()


def test_kd_kl_is_soft_ce_minus_teacher_entropy():
    close(kd_kl(STUDENT, TEACHER), SOFT_CE - TEACHER_ENTROPY)
    close(kd_kl(4 * STUDENT, 4 * TEACHER, temperature=4.0), 16 * (SOFT_CE - TEACHER_ENTROPY))
    close(kd_kl(TEACHER, TEACHER), 0.0)


# two feature entries (B=1, T=2, d=2): entry 0 differs by 3 everywhere (MSE 9), entry 1 in one element by 2 (MSE 1)
S_FEATS = [torch.zeros(1, 2, 2), torch.arange(4.0).view(1, 2, 2)]
T_FEATS = [torch.full((1, 2, 2), 3.0), torch.tensor([[[0.0, 1.0], [2.0, 5.0]]])]


def test_embedding_mse_last_and_all():
    assert embedding_mse(S_FEATS, T_FEATS, layers="last").item() == 1.0
    assert embedding_mse(S_FEATS, T_FEATS, layers="all").item() == 5.0


def test_embedding_mse_all_needs_equal_depth():
    with pytest.raises(ValueError, match=r"student features \(2\) as teacher features \(3\)"):
        embedding_mse(S_FEATS, T_FEATS + [T_FEATS[0]], layers="all")


def test_strict_token_mismatch_explains_the_fix():
    with pytest.raises(ValueError, match=r"student \(1, 5, 2\) vs teacher \(1, 4, 2\): token counts differ \(5 vs 4\)"
                       r".*kd.loss.token_match=last.*kd.loss.token_match=pool"):
        embedding_mse([torch.zeros(1, 5, 2)], [torch.zeros(1, 4, 2)])
    with pytest.raises(ValueError, match=r"embedding dims differ \(3 vs 2\): set kd.loss.project=true"):
        embedding_mse([torch.zeros(1, 4, 3)], [torch.zeros(1, 4, 2)], token_match="last")


def test_token_match_last_aligns_the_students_last_tokens():
    teacher = torch.arange(8.0).view(1, 4, 2)
    student = torch.cat([torch.full((1, 1, 2), 100.0), teacher], dim=1)  # extra leading token, e.g. a class token
    assert embedding_mse([student], [teacher], token_match="last").item() == 0.0
    with pytest.raises(ValueError, match=r"needs at least as many student tokens as teacher tokens \(4 < 5\)"):
        embedding_mse([teacher], [student], token_match="last")


def test_token_match_pool_averages_the_longer_sequence():
    long = torch.tensor([1.0, 3.0, 5.0, 7.0]).view(1, 4, 1)
    assert embedding_mse([long], [torch.tensor([2.0, 6.0]).view(1, 2, 1)], token_match="pool").item() == 0.0
    # teacher longer: pooled teacher (2, 6) vs student (2, 7) -> (0 + 1) / 2
    assert embedding_mse([torch.tensor([2.0, 7.0]).view(1, 2, 1)], [long], token_match="pool").item() == 0.5


def test_projection_maps_student_dim_to_teacher_dim():
    proj = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        proj.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 2.0]]))
    student = torch.tensor([[[1.0, 9.0, 2.0]]])  # -> (1, 4)
    assert embedding_mse([student], [torch.tensor([[[1.0, 2.0]]])], proj=proj).item() == 2.0  # (0 + 4) / 2


def ce(logits, targets):
    return F.cross_entropy(logits, targets)


TARGETS = torch.tensor([0, 1])


def test_distill_loss_is_kd_plus_alpha_mse():
    loss = DistillLoss(mse_alpha=2.0)
    assert loss.needs_features
    total, terms = loss(STUDENT, TEACHER, TARGETS, ce, S_FEATS, T_FEATS)
    assert set(terms) == {"kd", "mse"}
    close(terms["kd"], SOFT_CE)
    assert terms["mse"].item() == 1.0
    close(total, SOFT_CE + 2.0)
    total_all, _ = DistillLoss(mse_alpha=2.0, mse_layers="all")(STUDENT, TEACHER, TARGETS, ce, S_FEATS, T_FEATS)
    close(total_all, SOFT_CE + 10.0)


def test_distill_loss_default_ignores_labels_and_kl_kind():
    loss = DistillLoss()
    assert not loss.needs_features
    total, terms = loss(STUDENT, TEACHER, TARGETS, lambda *_: pytest.fail("labels must be unused"))
    assert set(terms) == {"kd"}
    close(total, SOFT_CE)
    total, _ = DistillLoss(kind="kl", temperature=4.0)(4 * STUDENT, 4 * TEACHER, TARGETS, ce)
    close(total, 16 * (SOFT_CE - TEACHER_ENTROPY))


def test_distill_loss_hard_weight_adds_the_label_loss():
    total, terms = DistillLoss(hard_weight=0.5)(STUDENT, TEACHER, TARGETS, lambda logits, y: torch.tensor(3.0))
    assert set(terms) == {"kd", "hard"}
    close(total, SOFT_CE + 1.5)


def test_two_head_weights_kd_head_against_label_head():
    label_logits = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.5, 0.5]], requires_grad=True)
    summed = lambda logits, y: logits.sum()  # noqa: E731  (shows which logits the base loss received)
    total, terms = DistillLoss(two_head_alpha=0.8)(STUDENT, TEACHER, TARGETS, summed, label_logits=label_logits)
    assert set(terms) == {"kd", "label_head"}
    assert terms["label_head"].item() == 7.5
    close(total, 0.8 * SOFT_CE + 0.2 * 7.5)
    with pytest.raises(ValueError, match="model.label_head=true"):
        DistillLoss(two_head_alpha=0.5)(STUDENT, TEACHER, TARGETS, summed)
    # alpha = 1: the label head stays in the graph with a zero gradient (DDP needs every parameter used)
    total, _ = DistillLoss(two_head_alpha=1.0)(STUDENT, TEACHER, TARGETS, summed, label_logits=label_logits)
    total.backward()
    assert torch.equal(label_logits.grad, torch.zeros(2, 3))


def test_projection_is_created_eagerly_only_when_needed():
    loss = DistillLoss(mse_alpha=1.0, project=True, student_dim=3, teacher_dim=2)
    assert isinstance(loss.proj, nn.Linear) and (loss.proj.in_features, loss.proj.out_features) == (3, 2)
    assert [n for n, _ in loss.named_parameters()] == ["proj.weight", "proj.bias"]
    assert DistillLoss(mse_alpha=1.0, project=True, student_dim=2, teacher_dim=2).proj is None
    assert DistillLoss(mse_alpha=0.0, project=True, student_dim=3, teacher_dim=2).proj is None
    student, teacher = [torch.randn(2, 4, 3)], [torch.randn(2, 4, 2)]
    _, terms = loss(STUDENT, TEACHER, TARGETS, ce, student, teacher)
    assert terms["mse"].item() == F.mse_loss(loss.proj(student[0]), teacher[0]).item()


def test_check_reports_shape_problems_before_training():
    loss = DistillLoss(mse_alpha=1.0)
    loss.check(STUDENT, TEACHER, S_FEATS, T_FEATS)
    with pytest.raises(ValueError, match="token counts differ"):
        loss.check(STUDENT, TEACHER, [torch.zeros(1, 5, 2)], [torch.zeros(1, 4, 2)])
    with pytest.raises(ValueError, match=r"student logits \(2, 3\) and teacher logits \(2, 4\) differ.*same classes"):
        loss.check(STUDENT, torch.zeros(2, 4), S_FEATS, T_FEATS)


@pytest.mark.parametrize("kwargs, message", [
    (dict(kind="mse"), r"kd.loss.kind='mse' is not one of \('soft_ce', 'kl'\)"),
    (dict(temperature=0.0), r"kd.loss.temperature=0.0 must be > 0"),
    (dict(mse_alpha=-1.0), r"kd.loss.mse_alpha=-1.0 must be >= 0"),
    (dict(mse_layers="first"), r"kd.loss.mse_layers='first' is not one of \('last', 'all'\)"),
    (dict(token_match="crop"), r"kd.loss.token_match='crop' is not one of \('strict', 'last', 'pool'\)"),
    (dict(two_head_alpha=1.5), r"kd.loss.two_head_alpha=1.5 must be null or in \[0, 1\]"),
    (dict(two_head_alpha=0.5, hard_weight=1.0), r"kd.loss.hard_weight=1.0 and kd.loss.two_head_alpha=0.5 conflict"),
    (dict(project=True, mse_alpha=1.0), r"kd.loss.project=true needs student_dim and teacher_dim"),
])
def test_distill_loss_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DistillLoss(**kwargs)
