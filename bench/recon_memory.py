"""Peak memory of block reconstruction vs FP inference (issue 16: <= 2x at the calibration batch size).

    python -m bench.recon_memory            # vit_6_4_32, 1024 calibration images; bench/results/recon_memory.*
    python -m bench.recon_memory --smoke    # vit_2_4_32, 64 images

Each phase runs in a fresh process (spawn) that samples its own resident set every 2 ms: the peak above the
phase's start is the memory the phase needs on top of the model and the calibration images, which both
phases hold. FP inference: no-grad forwards of the FP model at ptq.calib_batch_size. Reconstruction: the whole
`reconstruct_` of the calibrated W4A4 model (block granularity, BRECQ set, ptq.recon.batch_size), with its
float16 caches of every block's inputs and FP outputs over all calibration images. Random weights: memory
does not depend on training. One intra-op thread.
"""
import argparse
import json
import multiprocessing as mp
import os
import threading
import time
from pathlib import Path

import torch

OUT = Path(__file__).parent / "results"
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    """Highest resident set seen while the block runs, minus the resident set at its start (bytes)."""

    def __enter__(self):
        self.start = self.peak = rss()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, rss())
        self.extra = self.peak - self.start


def _phase(kind: str, name: str, n: int, calib_batch: int, recon_batch: int, iters: int, queue) -> None:
    from qat.models import create_model
    from qat.ptq.calibrate import calibrate
    from qat.ptq.observers import create_observer
    from qat.ptq.reconstruct import ReconConfig, reconstruct_
    from qat.quant import QuantConfig, quantize_

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = create_model(name).eval()
    batches = list(torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1)).split(calib_batch))
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if kind == "fp":
        with torch.no_grad(), PeakRSS() as peak:
            for x in batches:
                model(x)
    else:
        config = QuantConfig(weight={"bits": 4, "per_channel": True}, act={"bits": 4}, add_bias=True)
        model = quantize_(model, config)
        calibrate(model, batches, create_observer("minmax"))
        labelled = [(x, torch.zeros(len(x), dtype=torch.long)) for x in batches]
        with PeakRSS() as peak:
            reconstruct_(model, labelled, ReconConfig(granularity="block", learn=("alpha",), iters=iters,
                                                      batch_size=recon_batch))
    queue.put({"phase": kind, "model_bytes": weights, "extra_bytes": peak.extra})


def measure(name: str, n: int, calib_batch: int, recon_batch: int, iters: int) -> dict:
    ctx = mp.get_context("spawn")
    rows = {}
    for kind in ("fp", "recon"):
        queue = ctx.Queue()
        proc = ctx.Process(target=_phase, args=(kind, name, n, calib_batch, recon_batch, iters, queue))
        proc.start()
        rows[kind] = queue.get()
        proc.join()
    weights = rows["fp"]["model_bytes"]
    fp, recon = weights + rows["fp"]["extra_bytes"], weights + rows["recon"]["extra_bytes"]
    mb = lambda b: round(b / 2**20, 1)  # noqa: E731
    return {"model": name, "calib_images": n, "calib_batch": calib_batch, "recon_batch": recon_batch,
            "recon_iters_per_unit": iters, "weights_mb": mb(weights), "fp_inference_mb": mb(fp),
            "block_recon_mb": mb(recon), "ratio": round(recon / fp, 2), "target": "<= 2"}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="vit_2_4_32, 64 images (seconds)")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    row = (measure("vit_2_4_32", 64, 32, 8, 2) if args.smoke else measure("vit_6_4_32", 1024, 128, 32, 20))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recon_memory.json").write_text(json.dumps(row, indent=2) + "\n")
    text = "| " + " | ".join(row) + " |\n|" + "---|" * len(row) + "\n| " + " | ".join(map(str, row.values())) + " |"
    (out / "recon_memory.md").write_text(text + "\n")
    print(text)
    return row


if __name__ == "__main__":
    main()
