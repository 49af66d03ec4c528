"""Peak memory of block reconstruction vs FP inference (issue 16: <= 2x at the calibration batch size).

    python -m bench.recon_memory            # vit_6_4_32, 1024 calibration images; bench/results/recon_memory.*
    python -m bench.recon_memory --smoke    # vit_2_4_32, 64 images

Both figures are tensor memory (`bench.common.peak_memory`: every CPU allocation and free, exact, heap
caching aside), the model's weights included. FP inference: weights + the peak of no-grad forwards at
ptq.calib_batch_size. Reconstruction: weights + the peak of the whole `reconstruct_` of the calibrated W4A4
model (block granularity, BRECQ set, ptq.recon.batch_size), which holds float16 caches of one block's inputs
and FP outputs over all calibration images at a time. The calibration images themselves (held by both) are
not counted. Random weights: memory does not depend on training. One intra-op thread.
"""
import argparse
import json
from pathlib import Path

import torch

from bench.common import md_table, peak_memory
from qat.models import create_model
from qat.ptq.calibrate import calibrate
from qat.ptq.observers import create_observer
from qat.ptq.reconstruct import ReconConfig, reconstruct_
from qat.quant import QuantConfig, quantize_

OUT = Path(__file__).parent / "results"


def measure(name: str, n: int, calib_batch: int, recon_batch: int, iters: int) -> dict:
    torch.manual_seed(0)
    model = create_model(name).eval()
    images = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    batches = [(x, torch.zeros(len(x), dtype=torch.long)) for x in images.split(calib_batch)]
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())

    def infer():
        with torch.no_grad():
            for x, _ in batches:
                model(x)

    fp = weights + peak_memory(infer, "cpu")["peak_bytes"]
    model = quantize_(model, QuantConfig(weight={"bits": 4, "per_channel": True}, act={"bits": 4}, add_bias=True))
    calibrate(model, [x for x, _ in batches], create_observer("minmax"))
    cfg = ReconConfig(granularity="block", learn=("alpha",), iters=iters, batch_size=recon_batch)
    recon = weights + peak_memory(lambda: reconstruct_(model, batches, cfg), "cpu")["peak_bytes"]
    mb = lambda b: round(b / 2**20, 1)  # noqa: E731
    return {"model": name, "calib_images": n, "calib_batch": calib_batch, "recon_batch": recon_batch,
            "recon_iters_per_unit": iters, "weights_mb": mb(weights), "fp_inference_mb": mb(fp),
            "block_recon_mb": mb(recon), "ratio": round(recon / fp, 2)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="vit_2_4_32, 64 images (seconds)")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    row = measure("vit_2_4_32", 64, 32, 8, 2) if args.smoke else measure("vit_6_4_32", 1024, 128, 32, 20)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recon_memory.json").write_text(json.dumps(row, indent=2) + "\n")
    text = md_table(list(row), [list(row.values())])
    (out / "recon_memory.md").write_text(text + "\n")
    print(text)
    return row


if __name__ == "__main__":
    main()
