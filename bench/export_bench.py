"""onnxruntime CPU latency and file sizes of FP vs W8A8 vs W4A4 Q/DQ exports; packed W2 size vs FP.

    nice -n 10 python -m bench.export_bench                # vit_6_4_32 and resnet20 -> bench/results/export.*
    python -m bench.export_bench --smoke                   # vit_2_4_32, few repeats

Weights are random and the quantizer steps are calibrated by one train-mode forward on a random batch
(latency and size do not depend on training). Each export is qat.export.export_onnx (the file
`python -m qat.export --format onnx` writes), run by one onnxruntime CPU session with one intra-op thread.
Latency: the configs run round-robin with the FP session between any two (bench.common.interleave);
ratios are per round against the FP session around it, medians over rounds.
"""
import torch

from bench.common import base_parser, interleave, md_table, spread, start, summary, write_results
from qat.export import export_onnx, ort_session, pack_model
from qat.export.onnx_qdq import ort_logits
from qat.models import create_model
from qat.quant import QuantConfig, quantize_

CONFIGS = {"fp": None, "w8a8": {"weight": {"bits": 8}, "act": {"bits": 8}},
           "w4a4": {"weight": {"bits": 4}, "act": {"bits": 4}}}
W2 = {"weight": {"bits": 2}}


def calibrated(name: str, quant: dict | None) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model(name)
    if quant is not None:
        quantize_(model, QuantConfig(**quant))
    with torch.no_grad():
        model.train()(torch.randn(32, 3, 32, 32))
    return model.eval()


def sessions(name: str) -> tuple[dict, list[dict]]:
    """({config: ORT session}, rows of file size and agreement with the fake-quant model)."""
    x = torch.randn(16, 3, 32, 32)
    found, rows = {}, []
    for config, quant in CONFIGS.items():
        model = calibrated(name, quant)
        data = export_onnx(model, x[:1])
        found[config] = ort_session(data, threads=1)
        with torch.no_grad():
            reference = model(x)
        logits = ort_logits(found[config], x)
        rows.append({"model": name, "config": config, "onnx_bytes": len(data),
                     "max_abs_diff": float((logits - reference).abs().max()),
                     "top1_agreement": float((logits.argmax(1) == reference.argmax(1)).float().mean())})
    fp_bytes = rows[0]["onnx_bytes"]
    for row in rows:
        row["size_vs_fp"] = row["onnx_bytes"] / fp_bytes
    return found, rows


def latency(args, name: str, found: dict, batch: int) -> list[dict]:
    x = torch.randn(batch, 3, 32, 32).numpy()
    fns = {config: (lambda s=s: s.run(["logits"], {"input": x})) for config, s in found.items()}
    rounds, repeat = (args.rounds, args.repeat) if batch == 1 else (args.rounds, 1)
    timings = interleave(fns, "fp", rounds, "cpu", repeat=repeat, budget_s=args.budget_s)
    return [{"model": name, "config": c, "batch": batch, "ms": summary([t * 1e3 for t in timings[c]["times"]]),
             "time_vs_fp": summary(timings[c]["ratios"])} for c in found]


def packed_w2(name: str) -> dict:
    _, report = pack_model(calibrated(name, W2))
    return {"model": name, "quantized_layers": report["quantized_layers"], "model_total": report["model"]}


def main(argv=None):
    parser = base_parser(__doc__)
    parser.add_argument("--models", default="vit_6_4_32,resnet20")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeat", type=int, default=20, help="calls per timing at batch 1")
    parser.add_argument("--budget-s", type=float, default=90.0, help="time cap per model and batch size")
    args = parser.parse_args(argv)
    args.threads = 1
    if args.smoke:
        args.models, args.rounds, args.repeat, args.budget_s = "vit_2_4_32", 2, 3, 10.0
    result = start(args)
    result["sizes"], result["latency"], result["packed_w2"] = [], [], []
    for name in args.models.split(","):
        found, rows = sessions(name)
        result["sizes"] += rows
        for batch in (1, 128):
            result["latency"] += latency(args, name, found, batch)
        result["packed_w2"].append(packed_w2(name))
    write_results(args, result, markdown(result), "export")


def markdown(result: dict) -> str:
    sizes = md_table(["model", "config", "ONNX bytes", "size / FP", "max abs diff vs fake-quant", "top-1 agreement"],
                     [[r["model"], r["config"], r["onnx_bytes"], r["size_vs_fp"], f"{r['max_abs_diff']:.2g}",
                       r["top1_agreement"]] for r in result["sizes"]])
    lat = md_table(["model", "config", "batch", "ms (median)", "time / FP"],
                   [[r["model"], r["config"], r["batch"], r["ms"]["median"], spread(r["time_vs_fp"])]
                    for r in result["latency"]])
    packed = md_table(["model", "W2 layers packed B", "fp32 B", "ratio", "whole model packed B", "fp32 B", "ratio"],
                      [[p["model"], p["quantized_layers"]["packed_bytes"], p["quantized_layers"]["fp_bytes"],
                        p["quantized_layers"]["ratio"], p["model_total"]["packed_bytes"], p["model_total"]["fp_bytes"],
                        p["model_total"]["ratio"]] for p in result["packed_w2"]])
    return (f"### ONNX files\n\n{sizes}\n\n### onnxruntime CPU latency (1 thread)\n\n{lat}\n\n"
            f"### Packed 2-bit weights vs FP32\n\n{packed}")


if __name__ == "__main__":
    main()
