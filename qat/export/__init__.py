"""Deployment export of quantized models: integer TorchScript, packed low-bit weights, Q/DQ ONNX, with checks."""
from qat.export.exporter import export
from qat.export.integer import to_integer
from qat.export.onnx_qdq import export_onnx, ort_session, to_qdq
from qat.export.packing import pack_codes, pack_model, unpack_codes, unpack_model

__all__ = ["export", "export_onnx", "ort_session", "pack_codes", "pack_model", "to_integer", "to_qdq",
           "unpack_codes", "unpack_model"]
