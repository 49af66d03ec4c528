"""Evaluation speed over the CIFAR-10 test set: images/s of FP vs quantized models (eval mode, inference_mode).

    python -m bench.eval_speed --root /tmp/cifar10       # the real test split (10,000 images), vit_6_4_32
    python -m bench.eval_speed --models cct_7_3x1_32 --images 1024 --name eval_speed_cct
    python -m bench.eval_speed                           # 10,000 random 3x32x32 images

Images are the test split after its eval transform, applied once up front, so the model alone is timed.
The configs take turns batch by batch (fp, w2b, act2b, ... on batch 1, then on batch 2, ...), so one pass
over the set is also a sequence of interleaved rounds; ratios are medians of per-batch ratios to FP.
"""
import time

import torch

from bench.common import base_parser, csv, md_table, spread, start, summary, sync, write_results
from bench.step_time import check_configs, quantized_model
from qat.data import CIFARDataModule

EVAL_CONFIGS = "fp,w2b,act2b,w2a2,act2b_attn"


def test_images(args) -> torch.Tensor:
    if args.root is None:
        return torch.randn(args.images, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    dm = CIFARDataModule(name="cifar10", root=args.root, num_workers=0)
    dm.setup("test")
    return torch.stack([dm.test_set[i][0] for i in range(min(args.images, len(dm.test_set)))])


def measure(args, model_name: str, images: torch.Tensor) -> list[dict]:
    calib = images[:args.batch].to(args.device)
    models = {c: quantized_model(model_name, c, calib).eval() for c in args.configs}
    times = {c: [] for c in models}
    with torch.inference_mode():
        for model in models.values():  # warm-up
            model(calib)
        for begin in range(0, len(images), args.batch):
            x = images[begin:begin + args.batch].to(args.device)
            for config, model in models.items():
                sync(args.device)
                t = time.perf_counter()
                model(x)
                sync(args.device)
                times[config].append(time.perf_counter() - t)
    rows = []
    for config, t in times.items():
        rows.append({"model": model_name, "config": config, "images_per_s": len(images) / sum(t),
                     "total_s": sum(t), "ratio": summary([a / b for a, b in zip(t, times["fp"])])})
        print(f"{model_name} {config}: {rows[-1]['images_per_s']:.0f} img/s", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--root", default=None, help="CIFAR-10 root; default: random images")
    parser.add_argument("--models", type=csv, default="vit_6_4_32")
    parser.add_argument("--configs", type=csv, default=EVAL_CONFIGS)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args(argv)
    if args.smoke:
        args.models, args.images, args.batch = ["vit_2_4_32"], 16, 8
    check_configs(parser, args.configs)
    result = start(args)
    images = test_images(args)
    result["rows"] = [row for m in args.models for row in measure(args, m, images)]
    table = md_table(["model", "config", "img/s", "time / FP (per batch)"],
                     [[r["model"], r["config"], r["images_per_s"], spread(r["ratio"])] for r in result["rows"]])
    source = "random images" if args.root is None else f"test images of {args.root}"
    text = (f"{len(images)} {source}, batch {args.batch}, eval mode, torch.inference_mode; configs interleaved "
            f"per batch.\n\n{table}")
    write_results(args, result, text, "eval_speed")


if __name__ == "__main__":
    main()
