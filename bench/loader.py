"""Data-loader throughput with the real augmentation stack, against the FP training step it has to feed.

    python -m bench.loader                          # bundled CIFAR-10 sample (1,000 images)
    python -m bench.loader --root data/cifar10      # real CIFAR-10 (pickles or JPEG folders)

Loaders are qat.data.CIFARDataModule.train_dataloader() (2 workers, persistent) with the log's two
augmentation recipes. Measured: the loader alone (images/s over whole passes, after one warm-up pass),
the FP step alone on a fixed batch, the FP step fed by the loader (does loading starve it?), and the
Mixup/CutMix cost the LightningModule adds per batch in the main process. Every pass is a whole epoch
(iterator start included, as in training); --batches shortens the epoch with per_class.
"""
import math

from bench.common import (base_parser, interleave, machine_info, md_table, summary, target, targets_table, timed,
                          write_results)
from bench.step_time import build_step
from qat.data import CIFARDataModule, build_mixup

AUGS = {  # the log's recipes (reference §2.3): baseline RandAugment, and the KD runs' 'noAA, re .25'
    "baseline_randaugment": None,
    "noaa_jitter_re0.25": {"auto_augment": None, "reprob": 0.25},
}


def datamodule(args, aug) -> CIFARDataModule:
    kind = "cifar10_sample" if args.root is None else "cifar10"
    per_class = None if args.batches is None else math.ceil(args.batches * args.batch / 10)
    dm = CIFARDataModule(name=kind, root=args.root, batch_size=args.batch, num_workers=args.workers, aug=aug,
                         per_class=per_class, pin_memory=False)
    dm.setup("fit")
    return dm


def loader_pass(loader):
    """One epoch over a fresh iterator."""
    def run():
        for _ in loader:
            pass
    return run


def fed_steps(loader, step):
    """One epoch of FP training steps on the loader's batches (loader and step share the CPU, as in training)."""
    def run():
        for batch in loader:
            step(batch)
    return run


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--root", default=None, help="CIFAR-10 root; default: the bundled sample")
    parser.add_argument("--model", default="vit_6_4_32", help="model of the FP step to feed")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=None, help="epoch length in batches (default: all data)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.batch, args.batches, args.rounds = "vit_2_4_32", 16, 2, 1
    result = {"machine": machine_info(args.device), "args": {k: str(v) for k, v in vars(args).items()}}
    step = build_step(args.model, "fp", args.batch, args.device)
    loaders = {name: datamodule(args, aug).train_dataloader() for name, aug in AUGS.items()}
    n_batches = len(next(iter(loaders.values())))
    fp_epoch = {"fp_step": lambda: [step() for _ in range(n_batches)]}
    times = interleave({**fp_epoch, **{name: loader_pass(loader) for name, loader in loaders.items()}}, "fp_step",
                       args.rounds, args.device)
    fed = interleave({**fp_epoch, **{name: fed_steps(loader, step) for name, loader in loaders.items()}}, "fp_step",
                     args.rounds, args.device)
    step_rate = args.batch * n_batches / summary(times["fp_step"]["times"])["median"]
    x, y = next(iter(loaders["baseline_randaugment"]))
    mixup = build_mixup(None, 10)
    mixup_s = summary([timed(lambda: mixup(x.clone(), y), args.device) for _ in range(max(args.rounds, 5))])

    rows, targets = [], []
    for name in AUGS:
        rate = args.batch * n_batches / summary(times[name]["times"])["median"]
        rows.append({"aug": name, "loader_images_per_s": rate, "loader_over_step": rate / step_rate,
                     "fed_step_over_step": summary(fed[name]["ratios"]), "loader_times_s": times[name]["times"]})
        targets.append(target(f"{name}: loader images/s / FP step images/s ({args.workers} workers)",
                              rate / step_rate, 3.0, higher_is_better=True))
    result.update({"fp_step_images_per_s": step_rate, "mixup_ms_per_batch": mixup_s["median"] * 1e3,
                   "rows": rows, "targets": targets})
    table = md_table(["augmentation", "loader img/s", "loader / FP step", "FP step fed by loader / alone"],
                     [[r["aug"], r["loader_images_per_s"], r["loader_over_step"],
                       f"{r['fed_step_over_step']['median']:.3f} [{r['fed_step_over_step']['min']:.2f}-"
                       f"{r['fed_step_over_step']['max']:.2f}]"] for r in rows])
    text = (f"Data: {'bundled CIFAR-10 sample' if args.root is None else args.root}, batch {args.batch}, "
            f"{args.workers} workers, epochs of {n_batches} batches, {args.rounds} interleaved rounds. "
            f"FP step ({args.model}) alone: {step_rate:.1f} img/s. Mixup/CutMix in the main process: "
            f"{mixup_s['median'] * 1e3:.1f} ms per batch.\n\n{table}\n\n### Targets\n\n{targets_table(targets)}")
    write_results(args.out, args.name or "loader", result, text)


if __name__ == "__main__":
    main()
