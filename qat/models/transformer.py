"""ViT-Lite and CCT (Hassani et al. 2021, "Escaping the Big Data Paradigm with Compact Transformers").

Architecture as in the reference spec §1 (original module names, LayerNorm quirk, init, dropout values).
Registered names: vit_{2,4,6,7}_4_32[_sine], cct_{2,4}_3x2_32[_sine], cct_{6,7}_3x{1,2}_32[_sine].
"""
from typing import Literal

import torch
from torch import nn

from qat.models._registry import register_model
from qat.models.base import QatModel
from qat.models.layers import Tokenizer, TransformerEncoderLayer, make_norm, sinusoidal_embedding

PositionalEmbedding = Literal["learnable", "sine", "none"]


class TransformerClassifier(nn.Module):
    """Tokens -> [class token] + positional embedding -> encoder blocks -> norm -> pool -> fc (reference §1.3).

    Args:
        seq_pool: CCT sequence pooling (attention_pool); False = ViT class token `class_emb`.
        sequence_length: number of tokens from the tokenizer (without the class token).
        positional_embedding: 'learnable' (trunc-normal std 0.2), 'sine' (frozen table) or 'none'.
        label_head: add a second classifier `fc_label` for two-head training.
    """

    def __init__(self, sequence_length: int, seq_pool: bool = True, embedding_dim: int = 256, num_layers: int = 6,
                 num_heads: int = 4, mlp_ratio: float = 2.0, num_classes: int = 10, dropout: float = 0.0,
                 attention_dropout: float = 0.1, stochastic_depth: float = 0.1,
                 positional_embedding: PositionalEmbedding = "learnable", use_relu: bool = False,
                 norm: Literal["ln", "bn"] = "ln", label_head: bool = False):
        super().__init__()
        self.seq_pool = seq_pool
        if seq_pool:
            self.attention_pool = nn.Linear(embedding_dim, 1)
        else:
            self.class_emb = nn.Parameter(torch.zeros(1, 1, embedding_dim))
            sequence_length += 1
        if positional_embedding == "learnable":
            self.positional_emb = nn.Parameter(torch.zeros(1, sequence_length, embedding_dim))
            nn.init.trunc_normal_(self.positional_emb, std=0.2)  # bounds +-2 absolute: effectively untruncated
        elif positional_embedding == "sine":
            self.positional_emb = nn.Parameter(sinusoidal_embedding(sequence_length, embedding_dim),
                                               requires_grad=False)
        elif positional_embedding == "none":
            self.positional_emb = None
        else:
            raise ValueError(f"positional_embedding={positional_embedding!r} is not supported; "
                             "choose 'learnable', 'sine' or 'none'")
        self.dropout = nn.Dropout(dropout)
        rates = torch.linspace(0, stochastic_depth, num_layers, device="cpu").tolist()
        self.blocks = nn.ModuleList([
            TransformerEncoderLayer(embedding_dim, num_heads, int(embedding_dim * mlp_ratio), dropout,
                                    attention_dropout, rate, use_relu, norm)
            for rate in rates
        ])
        self.norm = make_norm(norm, embedding_dim)
        self.fc = nn.Linear(embedding_dim, num_classes)
        if label_head:
            self.fc_label = nn.Linear(embedding_dim, num_classes)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Tokens (B, T, d) -> (pooled (B, d), [x_0, ..., x_{L-1}, norm(x_L)]) (reference §1.7)."""
        if not self.seq_pool:
            x = torch.cat([self.class_emb.expand(x.shape[0], -1, -1), x], dim=1)  # (B, T+1, d)
        if self.positional_emb is not None:
            x = x + self.positional_emb
        x = self.dropout(x)
        features = []
        for block in self.blocks:
            features.append(x)
            x = block(x)
        x = self.norm(x)
        features.append(x)
        if self.seq_pool:
            weights = self.attention_pool(x).softmax(dim=1)  # (B, T, 1)
            pooled = (weights.transpose(1, 2) @ x).squeeze(1)  # (B, d)
        else:
            pooled = x[:, 0]
        return pooled, features

    def forward_head(self, pooled: torch.Tensor, label: bool = False) -> torch.Tensor:
        if not label:
            return self.fc(pooled)
        if not hasattr(self, "fc_label"):
            raise ValueError("forward_head(label=True) needs a second head: build the model with label_head=True")
        return self.fc_label(pooled)


class CompactTransformer(QatModel):
    """`tokenizer` + `classifier` (TransformerClassifier) behind the qat model protocol (`QatModel`)."""

    def __init__(self, tokenizer: Tokenizer, img_size: int, in_chans: int, seq_pool: bool, use_relu: bool,
                 **classifier_kwargs):
        super().__init__()
        self.tokenizer = tokenizer
        self.classifier = TransformerClassifier(tokenizer.sequence_length(in_chans, img_size, img_size),
                                                seq_pool=seq_pool, use_relu=use_relu, **classifier_kwargs)
        self.default_quant_modules = ["classifier.blocks.*.self_attn.qkv", "classifier.blocks.*.self_attn.proj",
                                      "classifier.blocks.*.linear1", "classifier.blocks.*.linear2"]
        # post-ReLU MLP hidden activations are >= 0 (GELU outputs can be slightly negative)
        self.non_negative_inputs = ["classifier.blocks.*.linear2"] if use_relu else []

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.classifier.forward_features(self.tokenizer(x))

    def forward_head(self, pooled: torch.Tensor, label: bool = False) -> torch.Tensor:
        return self.classifier.forward_head(pooled, label)


class ViTLite(CompactTransformer):
    """ViT-Lite: patch tokenizer (conv kernel = stride = patch_size, with bias) and a class token."""

    def __init__(self, num_classes: int = 10, img_size: int = 32, in_chans: int = 3, patch_size: int = 4,
                 embedding_dim: int = 256, use_relu: bool = False, **kwargs):
        tokenizer = Tokenizer(in_chans, embedding_dim, patch_size, stride=patch_size, padding=0,
                              conv_bias=True, relu_max_pool=False)
        super().__init__(tokenizer, img_size, in_chans, seq_pool=False, use_relu=use_relu,
                         num_classes=num_classes, embedding_dim=embedding_dim, **kwargs)


class CCT(CompactTransformer):
    """CCT: `n_conv_layers` conv-ReLU-MaxPool tokenizer stages and sequence pooling.

    Unlike the original CCT constructor (which ignores it), `use_relu` is honoured here as for ViT-Lite.
    """

    def __init__(self, num_classes: int = 10, img_size: int = 32, in_chans: int = 3, kernel_size: int = 3,
                 n_conv_layers: int = 1, embedding_dim: int = 256, use_relu: bool = False, **kwargs):
        tokenizer = Tokenizer(in_chans, embedding_dim, kernel_size, stride=max(1, kernel_size // 2 - 1),
                              padding=max(1, kernel_size // 2), n_conv_layers=n_conv_layers)
        super().__init__(tokenizer, img_size, in_chans, seq_pool=True, use_relu=use_relu,
                         num_classes=num_classes, embedding_dim=embedding_dim, **kwargs)


# size presets by number of layers (reference §1.1)
_SIZES = {
    2: dict(num_layers=2, num_heads=2, mlp_ratio=1, embedding_dim=128),
    4: dict(num_layers=4, num_heads=2, mlp_ratio=1, embedding_dim=128),
    6: dict(num_layers=6, num_heads=4, mlp_ratio=2, embedding_dim=256),
    7: dict(num_layers=7, num_heads=4, mlp_ratio=2, embedding_dim=256),
}


def _register(name: str, model_cls: type[CompactTransformer], **model_args) -> None:
    """Register `name` as an entrypoint building `model_cls(**model_args)`, any argument overridable."""
    def entrypoint(num_classes: int = 10, **kwargs) -> CompactTransformer:
        return model_cls(num_classes=num_classes, **dict(model_args, **kwargs))

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__doc__ = f"{model_cls.__name__} with {model_args}."
    register_model(entrypoint)


for _suffix, _pos in (("", "learnable"), ("_sine", "sine")):
    for _layers in (2, 4, 6, 7):
        _register(f"vit_{_layers}_4_32{_suffix}", ViTLite, **_SIZES[_layers], img_size=32, patch_size=4,
                  positional_embedding=_pos)
    for _layers, _convs in ((2, 2), (4, 2), (6, 1), (6, 2), (7, 1), (7, 2)):
        _register(f"cct_{_layers}_3x{_convs}_32{_suffix}", CCT, **_SIZES[_layers], img_size=32, kernel_size=3,
                  n_conv_layers=_convs, positional_embedding=_pos)
