"""qat: quantization-aware training and knowledge distillation of compact vision transformers."""
from qat.checkpoint import load_model
from qat.models import create_model, list_models
from qat.resolvers import register_resolvers

register_resolvers()

__all__ = ["create_model", "list_models", "load_model"]
