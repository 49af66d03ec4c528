"""Evaluation speed over the CIFAR-10 test set: images/s of FP vs quantized models (eval mode, no_grad).

    python -m bench.eval_speed                      # 10,000 random 3x32x32 images
    python -m bench.eval_speed --root data/cifar10  # the real test split (eval transform applied once, up front)

The configs take turns batch by batch (fp, w2b, act2b, ... on batch 1, then on batch 2, ...), so one
pass over the set is also a sequence of interleaved rounds; ratios are medians of per-batch ratios to FP.
"""
import time

import torch

from bench.common import base_parser, csv, machine_info, md_table, summary, sync, write_results
from bench.step_time import CONFIGS
from qat.data import CIFARDataModule
from qat.models import create_model
from qat.quant import QuantConfig, quantize_

EVAL_CONFIGS = "fp,w2b,act2b,w2a2,act2b_attn"


def test_images(args) -> torch.Tensor:
    if args.root is None:
        return torch.randn(args.images, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    dm = CIFARDataModule(name="cifar10", root=args.root, num_workers=0)
    dm.setup("test")
    n = min(args.images, len(dm.test_set))
    return torch.stack([dm.test_set[i][0] for i in range(n)])


def eval_model(model_name: str, config: str, calib: torch.Tensor, device: str) -> torch.nn.Module:
    """The model in eval mode; quantizer steps initialised by one train-mode forward on `calib`."""
    torch.manual_seed(0)
    model = create_model(model_name).to(device)
    quant = CONFIGS[config][0]
    if quant is not None:
        quantize_(model, QuantConfig(**quant))
        with torch.no_grad():
            model.train()(calib)
    return model.eval()


def measure(args, model_name: str, images: torch.Tensor) -> list[dict]:
    models = {c: eval_model(model_name, c, images[:args.batch].to(args.device), args.device) for c in args.configs}
    times = {c: [] for c in models}
    with torch.no_grad():
        for model in models.values():  # warm-up
            model(images[:args.batch].to(args.device))
        for start in range(0, len(images), args.batch):
            x = images[start:start + args.batch].to(args.device)
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
    parser.add_argument("--models", type=csv, default="vit_6_4_32,cct_7_3x1_32")
    parser.add_argument("--configs", type=csv, default=EVAL_CONFIGS)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args(argv)
    if args.smoke:
        args.models, args.images, args.batch = ["vit_2_4_32"], 16, 8
    unknown = sorted(set(args.configs) - set(CONFIGS))
    if unknown or "fp" not in args.configs:
        parser.error(f"--configs {unknown or args.configs}: use names from {list(CONFIGS)}, 'fp' included")
    result = {"machine": machine_info(args.device), "args": {k: str(v) for k, v in vars(args).items()}}
    images = test_images(args)
    rows = [row for m in args.models for row in measure(args, m, images)]
    result["rows"] = rows
    table = md_table(["model", "config", "img/s", "time / FP (per batch)"],
                     [[r["model"], r["config"], r["images_per_s"],
                       f"{r['ratio']['median']:.3f} [{r['ratio']['min']:.2f}-{r['ratio']['max']:.2f}]"] for r in rows])
    source = "random images" if args.root is None else f"the test split of {args.root}"
    text = (f"{len(images)} {source}, batch {args.batch}, eval mode, torch.no_grad; configs interleaved per batch."
            f"\n\n{table}")
    write_results(args.out, args.name or "eval_speed", result, text)


if __name__ == "__main__":
    main()
