"""Data-loader throughput with the real augmentation stack, against the FP training step it has to feed.

    python -m bench.loader                               # bundled CIFAR-10 sample (1,000 training JPEGs)
    python -m bench.loader --root /tmp/cifar10 --batches 10   # real CIFAR-10 (pickles or JPEG folders)

Loaders are qat.data.CIFARDataModule.train_dataloader() (2 workers, persistent) with the log's two
augmentation recipes. Interleaved with the FP step alone on a fixed batch (the baseline): the loader alone
(images/s over a whole epoch, iterator start included), and the FP step fed by the loader (loader and step
share the CPU, as in training: does loading slow the step?). The Mixup/CutMix that LitClassifier applies
per batch in the main process is timed separately. --batches shortens the epoch (per_class).
"""
import math

from bench.common import (base_parser, interleave, md_table, spread, start, summary, target, targets_table, timed,
                          write_results)
from bench.step_time import build_step
from qat.data import CIFARDataModule, build_mixup

AUGS = {  # the log's recipes (reference §2.3): baseline RandAugment, and the KD runs' 'noAA, re .25'
    "baseline_randaugment": None,
    "noaa_jitter_re0.25": {"auto_augment": None, "reprob": 0.25},
}


def train_loader(args, aug):
    per_class = None if args.batches is None else math.ceil(args.batches * args.batch / 10)
    dm = CIFARDataModule(name="cifar10_sample" if args.root is None else "cifar10", root=args.root,
                         batch_size=args.batch, num_workers=args.workers, aug=aug, per_class=per_class,
                         pin_memory=False)
    dm.setup("fit")
    return dm.train_dataloader()


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--root", default=None, help="CIFAR-10 root; default: the bundled sample")
    parser.add_argument("--model", default="vit_6_4_32", help="model of the FP step to feed")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=None, help="epoch length in batches (default: all data)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--budget", type=float, default=6.0, help="minutes of timing rounds")
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.batch, args.batches, args.rounds = "vit_2_4_32", 16, 2, 1
    result = start(args)
    step = build_step(args.model, "fp", args.batch, args.device)
    loaders = {name: train_loader(args, aug) for name, aug in AUGS.items()}
    n_batches = len(next(iter(loaders.values())))

    def loader_pass(loader):
        return lambda: sum(1 for _ in loader)

    def fed_steps(loader):
        return lambda: [step(batch) for batch in loader]
    fns = {"fp_step": lambda: [step() for _ in range(n_batches)]}
    for name, loader in loaders.items():
        fns |= {f"{name} loader": loader_pass(loader), f"{name} fed": fed_steps(loader)}
    times = interleave(fns, "fp_step", args.rounds, args.device, budget_s=args.budget * 60)
    images = args.batch * n_batches
    step_rate = images / summary(times["fp_step"]["times"])["median"]
    x, y = next(iter(loaders["baseline_randaugment"]))
    mixup = build_mixup(None, 10)
    mixup_s = summary([timed(lambda: mixup(x.clone(), y), args.device) for _ in range(5)])

    rows, targets = [], []
    for name in AUGS:
        rate = images / summary(times[f"{name} loader"]["times"])["median"]
        rows.append({"aug": name, "loader_images_per_s": rate, "loader_over_step": rate / step_rate,
                     "fed_step_over_step": summary(times[f"{name} fed"]["ratios"]),
                     "loader_times_s": times[f"{name} loader"]["times"]})
        targets.append(target(f"{name}: loader images/s / FP step images/s ({args.workers} workers)",
                              rate / step_rate, 3.0, higher_is_better=True))
    result |= {"fp_step_images_per_s": step_rate, "mixup_ms_per_batch": mixup_s["median"] * 1e3,
               "rounds": len(times["fp_step"]["ratios"]), "rows": rows, "targets": targets}
    table = md_table(["augmentation", "loader img/s", "loader / FP step", "FP step fed by loader / alone"],
                     [[r["aug"], r["loader_images_per_s"], r["loader_over_step"], spread(r["fed_step_over_step"])]
                      for r in rows])
    text = (f"Data: {'bundled CIFAR-10 sample' if args.root is None else args.root}, batch {args.batch}, "
            f"{args.workers} workers, epochs of {n_batches} batches, {result['rounds']} interleaved rounds. "
            f"FP step ({args.model}) alone: {step_rate:.1f} img/s. Mixup/CutMix in the main process: "
            f"{mixup_s['median'] * 1e3:.1f} ms per batch.\n\n{table}\n\n{targets_table(targets)}")
    write_results(args, result, text, "loader")


if __name__ == "__main__":
    main()
