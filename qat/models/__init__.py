"""Model zoo: ViT-Lite / CCT, CIFAR ResNets and any timm model, built by name with `create_model`."""
from qat.models._registry import create_model, list_models, register_model
from qat.models.base import QatModel
from qat.models.quant_point import QuantPoint
from qat.models.resnet_cifar import CifarResNet
from qat.models.timm_model import TimmModel
from qat.models.transformer import CCT, CompactTransformer, TransformerClassifier, ViTLite

__all__ = ["CCT", "CifarResNet", "CompactTransformer", "QatModel", "QuantPoint", "TimmModel", "TransformerClassifier",
           "ViTLite", "create_model", "list_models", "register_model"]
