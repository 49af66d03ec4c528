"""Data-free speed: ZeroQ synthesis on resnet20 and a GDFQ data-free QAT step vs a plain QAT step with KD.

    nice python -m bench.datafree_bench --threads 1                       # -> bench/results/datafree_bench.{json,md}
    python -m bench.datafree_bench --zeroq-iters 10 --threads 1           # time 10 of the default iterations, extrapolate

ZeroQ: one batch of 256 images (ZeroQSettings defaults) through qat.datafree.zeroq.zeroq_images; time per
iteration x default iterations = time per batch; 1024 images = 4 batches. With --zeroq-iters < default the
per-iteration time is measured on that many and extrapolated (iterations are identical work).
GDFQ: 'real_kd' = teacher forward (no grad) + w4a4 student forward/backward + AdamW step on a real batch
(the bundled sample); 'gdfq' = SyntheticDataModule.gdfq_batch (one generator step against the teacher, then a
fresh batch) + the same student step. Interleaved, ratio per round (bench.common.interleave).
The models have random weights and BN statistics of smooth noise: speed does not depend on the weights.
"""
import time

import torch
from torch import nn

from bench.common import base_parser, interleave, md_table, spread, start, summary, write_results
from qat.data import CIFARDataModule
from qat.data.transforms import CIFAR10_MEAN, CIFAR10_STD
from qat.datafree.synthetic import SyntheticDataModule
from qat.datafree.zeroq import ZeroQSettings, zeroq_images
from qat.distill import DistillLoss
from qat.models import create_model
from qat.quant import QuantConfig, calibrate_, clamp_steps_, quantize_


def teacher_checkpoint(path) -> nn.Module:
    torch.manual_seed(0)
    model = create_model("resnet20")
    with torch.no_grad():
        model.train()(nn.functional.interpolate(torch.rand(64, 3, 4, 4) * 3 - 1.5, size=32, mode="bilinear"))
    torch.save({"state_dict": {"model." + k: v for k, v in model.state_dict().items()},
                "qat": {"model": {"name": "resnet20"}, "quant": None, "num_classes": 10}}, path)
    return model.eval().requires_grad_(False)


def bench_zeroq(teacher, iters_measured: int, batch: int) -> dict:
    default = ZeroQSettings()
    measured = ZeroQSettings(iters=iters_measured, batch_size=batch)
    begin = time.perf_counter()
    zeroq_images(teacher, batch, 32, CIFAR10_MEAN, CIFAR10_STD, 10, measured, seed=0)
    per_iter = (time.perf_counter() - begin) / iters_measured
    per_batch = per_iter * default.iters
    return {"batch": batch, "default_iters": default.iters, "iters_measured": iters_measured,
            "s_per_iter": per_iter, "s_per_batch": per_batch, "images_per_s": batch / per_batch,
            "s_for_1024": per_batch * -(-1024 // batch)}


def student_step(teacher, batch_x):
    student = quantize_(create_model("resnet20"), QuantConfig(weight={"bits": 4}, act={"bits": 4}))
    calibrate_(student, [batch_x])
    distill, opt = DistillLoss(), torch.optim.AdamW(student.parameters(), lr=1e-4)

    def step(x, y):
        with torch.no_grad():
            t_logits = teacher(x)
        loss, _ = distill(student(x), t_logits, y, nn.CrossEntropyLoss())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        clamp_steps_(student)
    return step


def bench_gdfq(args, ckpt) -> dict:
    real = CIFARDataModule(name="cifar10_sample", num_workers=0, aug={"mixup": 0.0, "cutmix": 0.0})
    x, y = real.calibration_batch(args.batch, seed=0)
    dm = SyntheticDataModule(synthetic={"teacher": str(ckpt), "method": "gdfq", "num_images": 10 * args.batch},
                             name="cifar10_sample", batch_size=args.batch, num_workers=0)
    step = student_step(dm.teacher, x)
    seeds = iter(range(10**6))
    fns = {"real_kd": lambda: step(x, y), "gdfq": lambda: step(*dm.gdfq_batch(next(seeds)))}
    out = interleave(fns, "real_kd", rounds=args.rounds, device=args.device, warmup=1)
    return {name: {"ratio": summary(v["ratios"]), "s": summary(v["times"])} for name, v in out.items()}


def main(argv: list[str] | None = None):
    parser = base_parser(__doc__)
    parser.add_argument("--zeroq-iters", type=int, default=ZeroQSettings().iters, help="iterations actually timed")
    parser.add_argument("--zeroq-batch", type=int, default=256)
    parser.add_argument("--batch", type=int, default=128, help="batch of the GDFQ / real-KD steps")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if args.smoke:
        args.zeroq_iters, args.zeroq_batch, args.batch, args.rounds = 1, 8, 8, 1
    result = start(args)
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt = args.out / "datafree_bench_teacher.ckpt.tmp"
    teacher = teacher_checkpoint(ckpt)
    try:
        result["zeroq"] = z = bench_zeroq(teacher, args.zeroq_iters, args.zeroq_batch)
        result["gdfq"] = g = bench_gdfq(args, ckpt)
    finally:
        ckpt.unlink()
    write_results(args, result, markdown(z, g, args.batch), "datafree_bench")


def markdown(z: dict, g: dict, batch: int) -> str:
    zeroq = md_table(["s / iteration", "s / batch", "images/s", "s for 1024 images", "target"],
                     [[z["s_per_iter"], z["s_per_batch"], z["images_per_s"], z["s_for_1024"], "< 600 s"]])
    gdfq = md_table(["step", "time / real_kd", "s"], [[k, spread(v["ratio"]), v["s"]["median"]] for k, v in g.items()])
    return (f"### ZeroQ on resnet20 (batch {z['batch']}, {z['default_iters']} iterations; {z['iters_measured']} "
            f"timed)\n\n{zeroq}\n\n### GDFQ step vs QAT step with KD on real data (resnet20 w4a4, batch {batch})"
            f"\n\n{gdfq}")


if __name__ == "__main__":
    main()
