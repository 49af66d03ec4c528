"""Cost of group-wise input quantization: eval forward of a W4A4 ViT, per-tensor inputs vs static vs dynamic groups.

    python -m bench.groups_bench --threads 1     # vit_6_4_32, batch 32, 8 groups (seed 004)
    python -m bench.groups_bench --small         # vit_2_4_32, batch 4, 2 rounds (seconds; also --smoke)

Every model is the same random-weight vit quantized by `quantize_` (W4A4: 4-bit per-channel weights, 4-bit
inputs) and calibrated by `qat.ptq.calibrate` (minmax) on N(0, 1) images; only the inputs of the Linear layers
after a LayerNorm differ (per-tensor, `n_groups` static groups, or groups assigned per image at run time).
Timing follows bench/common.py: round-robin with the per-tensor model between any two others, ratios per round.
"""
import torch

from bench import common
from qat.models import create_model
from qat.ptq.calibrate import calibrate
from qat.ptq.observers import create_observer
from qat.quant import QuantConfig, quantize_
from qat.quant.groups import GroupQuantizer

CONFIGS = {"per-tensor": {}, "static groups": {"n_groups": 8}, "dynamic groups": {"n_groups": 8, "dynamic_groups": True}}


def build(name: str, extra: dict, device: str) -> torch.nn.Module:
    """The calibrated W4A4 `name` with the group settings `extra` (same weights for every config)."""
    torch.manual_seed(0)
    model = create_model(name)
    config = QuantConfig(weight={"bits": 4, "per_channel": True}, act={"bits": 4}, **extra)
    model = quantize_(model, config)
    images = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    calibrate(model, list(images.split(32)), create_observer("minmax"))
    return model.to(device).eval()


def forward_fn(model: torch.nn.Module, batch: torch.Tensor):
    def run():
        with torch.no_grad():
            model(batch)
    return run


def main(argv=None) -> dict:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="vit_2_4_32, batch 4, 2 rounds (seconds)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3, help="forwards per timed slot")
    args = parser.parse_args(argv)
    result = common.start(args)
    small = args.small or args.smoke
    name, batch_size = ("vit_2_4_32", 4) if small else ("vit_6_4_32", 32)
    rounds, repeat = (2, 1) if small else (args.rounds, args.repeat)
    batch = torch.randn(batch_size, 3, 32, 32, generator=torch.Generator().manual_seed(2)).to(args.device)
    models = {label: build(name, extra, args.device) for label, extra in CONFIGS.items()}
    timings = common.interleave({k: forward_fn(m, batch) for k, m in models.items()}, "per-tensor", rounds,
                                args.device, repeat)
    rows = [{"config": label, "groups": sum(isinstance(m, GroupQuantizer) for m in models[label].modules()),
             "ms": common.summary([1000 * t for t in timings[label]["times"]]),
             "ratio": common.summary(timings[label]["ratios"])} for label in CONFIGS]
    result.update({"model": name, "batch": batch_size, "rounds": rounds, "rows": rows})
    table = common.md_table(["config", "group quantizers", "ms / forward (median)", "ratio to per-tensor"],
                            [[r["config"], r["groups"], f"{r['ms']['median']:.2f}", common.spread(r["ratio"])]
                             for r in rows])
    common.write_results(args, result, f"### {name} W4A4 eval forward, batch {batch_size}\n\n{table}",
                         "groups_bench")
    return result


if __name__ == "__main__":
    main()
