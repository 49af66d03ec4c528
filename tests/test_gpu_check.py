"""scripts/gpu_check.sh without a GPU: every CUDA part is skipped with a one-line message and it exits 0."""
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_without_cuda_skips_every_part(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # hide any GPU of the machine running the tests
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "gpu_check: SKIP CUDA tests (pytest -m cuda): no CUDA device",
        "gpu_check: SKIP step-time and memory benchmark on CUDA: no CUDA device",
        "gpu_check: SKIP 2-epoch FP + W2A2 vit_6_4_32 runs on CIFAR-10: no CUDA device",
    ]
    assert not (tmp_path / "out").exists()  # nothing ran
