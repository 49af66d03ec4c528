"""The seeded reproduction rows (conf/experiment/repro/<row>_s<seed>): per-row seed tables and the log's findings.

A finding compares two rows, `a` expected above `b`. Its verdict uses the seed spread: the largest range
(max - min over the seeds) of the two rows' test accuracies. With diff = mean(a) - mean(b) + margin, it
'holds' when diff > 2 * spread, 'does not hold' when diff < -2 * spread, and is 'not resolved' in between
(a difference of exactly twice the spread included). `margin` turns "a is at most `margin` points below b"
into the same test (W2 costs little).
"""
import re
from dataclasses import dataclass

SEEDS = (0, 1)  # every row runs as <row>_s0 and <row>_s1
SEEDED = re.compile(r"repro/(?P<row>.+)_s(?P<seed>\d+)")


@dataclass(frozen=True)
class Finding:
    claim: str
    log: str              # the log's evidence
    a: str | None = None  # the row expected higher (repro/<a>_s<seed>); None = no rows for it in this set
    b: str | None = None
    margin: float = 0.0


FINDINGS = (
    Finding("KD helps A2", "24259 90.83 vs 15133 89.48", "act2b_kd", "act2b"),
    Finding("embedding MSE helps on top of KD", "39173 92.32 vs 28353 91.11", "act2b_kd_mse2", "act2b_kd"),
    Finding("4-bit > 2-bit activations (with KD)", "25878 93.02 vs 24259 90.83", "act4b_kd", "act2b_kd"),
    Finding("two-step W2A2 > one-step", "25863 91.38 vs 14510 85.33 (14510: one step without KD, baseline recipe)",
            "w2a2_kd_twostep", "w2a2_kd_onestep"),
    Finding("W2 costs little: W2 + KD at most 1 point below FP", "24220 92.56 vs 14289 93.03", "w2_kd", "fp", 1.0),
    Finding("unsigned attention levels help", "25997 90.53 vs 25911 89.87", "act2b_attn_unsigned_kd",
            "act2b_attn_signed_kd"),
    Finding("a stronger teacher helps weight-quantized students", "W2: 24221 92.99 (cct) vs 24220 92.56 (vit)",
            "w2_kd_resnet", "w2_kd"),
    Finding("a stronger teacher does not help activation-quantized students (the ViT teacher's A2 student at "
            "least as good)", "A2: 24259 90.83 (vit) vs 24222 90.36 (cct)", "act2b_kd", "act2b_kd_resnet"),
)


def spread_of(a: list[float], b: list[float]) -> float:
    """The seed spread: the larger of the two rows' ranges (max - min over seeds)."""
    return max(max(a) - min(a), max(b) - min(b))


def verdict(a: list[float], b: list[float], margin: float = 0.0) -> tuple[str, float, float]:
    """(label, mean(a) - mean(b), spread) of the claim "a is above b - margin" from per-seed accuracies."""
    diff = sum(a) / len(a) - sum(b) / len(b)
    spread = spread_of(a, b)
    if diff + margin > 2 * spread:
        return "holds", diff, spread
    if diff + margin < -2 * spread:
        return "does not hold", diff, spread
    return "not resolved", diff, spread


def seed_rows(runs: list[dict]) -> dict[str, dict[int, dict]]:
    """row -> seed -> the newest summary of repro/<row>_s<seed> among `runs` (newest first)."""
    rows: dict[str, dict[int, dict]] = {}
    for summary in runs:
        match = SEEDED.fullmatch(str(summary.get("name") or ""))
        if match:
            rows.setdefault(match["row"], {}).setdefault(int(match["seed"]), summary)
    return rows


def accuracies(seeds: dict[int, dict]) -> list[float] | None:
    """The test accuracy of every seed in SEEDS, or None while one of them has not finished."""
    done = [seeds.get(s) for s in SEEDS]
    if any(s is None or not s.get("finished") or s.get("test_acc") is None for s in done):
        return None
    return [float(s["test_acc"]) for s in done]


def cell(summary: dict | None) -> tuple[str, str]:
    """(test accuracy, wall time) of one seed's run for the table."""
    if summary is None:
        return "not run", ""
    minutes = f"{summary['train_seconds'] / 60:.0f} min" if summary.get("train_seconds") is not None else ""
    if not summary.get("finished"):
        return f"epoch {summary.get('epochs_completed') or 0}, unfinished", minutes
    if summary.get("test_acc") is None:
        return "finished, no test_acc (test_after_fit=false?)", minutes
    return f"{float(summary['test_acc']):.2f}", minutes


def seed_table(rows: dict[str, dict[int, dict]]) -> str:
    """Markdown: per row, the mean and every seed's test accuracy and wall time."""
    head = ["Row", "Mean"] + [f"Seed {s}" for s in SEEDS] + [f"Wall time seed {s}" for s in SEEDS]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for row in sorted(rows):
        accs = accuracies(rows[row])
        cells = [cell(rows[row].get(s)) for s in SEEDS]
        mean = f"{sum(accs) / len(accs):.2f}" if accs else ""
        lines.append("| " + " | ".join([row, mean] + [c[0] for c in cells] + [c[1] for c in cells]) + " |")
    return "\n".join(lines)


def finding_line(finding: Finding, rows: dict[str, dict[int, dict]]) -> str:
    """One verdict line: holds / does not hold / not resolved with diff and spread, or 'not run'."""
    pair = f" ({finding.a} vs {finding.b})" if finding.a else ""
    head = f"- {finding.claim}{pair}: "
    a, b = (accuracies(rows.get(r, {})) if r else None for r in (finding.a, finding.b))
    if a is None or b is None:
        return head + f"not run (log: {finding.log})"
    label, diff, spread = verdict(a, b, finding.margin)
    return head + f"{label}, diff {diff:+.2f}, seed spread {spread:.2f} (log: {finding.log})"


def findings_text(rows: dict[str, dict[int, dict]]) -> str:
    return "\n".join(finding_line(f, rows) for f in FINDINGS)
