"""Post-training quantization: observers, calibration, bias correction, AWQ and reconstruction
(AdaRound, BRECQ, QDrop, NWQ, AdaQTransform as presets of one ReconConfig).

    from qat.ptq import calibrate, create_observer
    calibrate(quantize_(model, QuantConfig(weight={"bits": 4, "per_channel": True})), batches, create_observer("mse"))

`python ptq.py ckpt=<run> quant=w4a32 ptq=mse_channel` runs the whole pipeline (qat.ptq.pipeline).
"""
from qat.ptq.awq import awq_
from qat.ptq.bias_correction import bias_correct_
from qat.ptq.calibrate import calibrate
from qat.ptq.observers import OBSERVERS, Observer, Stats, create_observer
from qat.ptq.recon_weight import ReconWeight, fold_
from qat.ptq.reconstruct import ReconConfig, reconstruct_

__all__ = ["OBSERVERS", "Observer", "ReconConfig", "ReconWeight", "Stats", "awq_", "bias_correct_", "calibrate",
           "create_observer", "fold_", "reconstruct_"]
