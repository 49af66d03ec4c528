"""python -m qat.export <run dir | .ckpt> --format int|packed|onnx|all [--out DIR] [--check N] [--data ...]

Exports a trained qat model as an integer TorchScript program, packed low-bit weights and/or a Q/DQ ONNX
graph, and checks each against the fake-quant model on test images (see qat.export.exporter for the files).
"""
import argparse
import sys

from qat.export.exporter import FORMATS, export
from qat.export.onnx_qdq import DEFAULT_OPSET


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m qat.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="run directory (checkpoints/best.ckpt or last.ckpt) or a .ckpt file")
    p.add_argument("--format", default="all", choices=FORMATS, help="what to write (default all)")
    p.add_argument("--out", help="output folder (default <run dir>/export)")
    p.add_argument("--check", type=int, default=64, help="test images to compare on (0 = no check; default 64)")
    p.add_argument("--data", default="cifar10_sample", help="cifar10_sample (bundled) or a CIFAR root folder")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--onnx-int4", action="store_true", help="store 4-bit codes as ONNX int4 (needs opset 21)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        export(args.path, args.format, args.out, args.check, args.data, args.opset, args.onnx_int4)
    except (ValueError, FileNotFoundError) as err:
        print(f"qat.export: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
