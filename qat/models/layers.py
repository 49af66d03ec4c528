"""Building blocks of ViT-Lite / CCT: conv tokenizer, attention, encoder block, sine table, token BatchNorm.

Module and attribute names follow the original Compact-Transformers code so its checkpoints load.
"""
from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

from qat.models.quant_point import QuantPoint
from qat.quant.integer import Codes, attention_on_codes, attention_ready


class Tokenizer(nn.Module):
    """Image -> tokens (B, H'*W', d) with `n_conv_layers` conv[-ReLU-MaxPool] stages (reference §1.2).

    ViT-Lite: one conv, kernel = stride = patch, bias, no activation, no pooling.
    CCT: convs 3 -> 64 -> ... -> d without bias, each followed by ReLU and MaxPool(3, 2, 1).
    """

    def __init__(self, in_chans: int, embedding_dim: int, kernel_size: int, stride: int, padding: int,
                 n_conv_layers: int = 1, in_planes: int = 64, conv_bias: bool = False, relu_max_pool: bool = True):
        super().__init__()
        channels = [in_chans] + [in_planes] * (n_conv_layers - 1) + [embedding_dim]
        self.conv_layers = nn.Sequential(*[
            nn.Sequential(
                nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=padding, bias=conv_bias),
                nn.ReLU() if relu_max_pool else nn.Identity(),
                nn.MaxPool2d(3, stride=2, padding=1) if relu_max_pool else nn.Identity(),
            )
            for c_in, c_out in zip(channels[:-1], channels[1:])
        ])
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)  # fan_in, gain sqrt(2); the bias keeps PyTorch's default

    def sequence_length(self, in_chans: int, height: int, width: int) -> int:
        """Number of tokens for one image, from a dry forward of a zero image (no RNG use)."""
        with torch.no_grad():
            return self(torch.zeros(1, in_chans, height, width)).shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_layers(x).flatten(2).transpose(1, 2)  # (B, d, H', W') -> (B, H'*W', d)


def sinusoidal_embedding(num_positions: int, dim: int) -> torch.Tensor:
    """(1, num_positions, dim) table: angle p / 10000^(2*floor(i/2)/dim); sin on even i, cos on odd i.

    Angles are rounded to float32 before sin/cos, as the original does.
    """
    pos = torch.arange(num_positions, dtype=torch.float64)[:, None]
    i = torch.arange(dim)
    angle = (pos / 10000 ** (2 * (i // 2) / dim)).float()
    return torch.where(i % 2 == 0, angle.sin(), angle.cos())[None]


class TokenBatchNorm(nn.BatchNorm1d):
    """BatchNorm over channels of a token tensor (B, N, C) (the reference's replace_ln_by_bn)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


def make_norm(norm: Literal["ln", "bn"], dim: int) -> nn.Module:
    if norm == "ln":
        return nn.LayerNorm(dim)
    if norm == "bn":
        return TokenBatchNorm(dim)
    raise ValueError(f"norm={norm!r} is not supported; choose 'ln' or 'bn'")


class Attention(nn.Module):
    """Multi-head self-attention, qkv without bias, with QuantPoints on q, k, v and the softmax output.

    While `attn_quant` is a plain QuantPoint the fused `F.scaled_dot_product_attention` runs; once surgery
    replaces it, the explicit softmax path runs so the probabilities can be quantized before dropout.
    """

    def __init__(self, dim: int, num_heads: int, attention_dropout: float = 0.1, projection_dropout: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embedding_dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.attn_drop = nn.Dropout(attention_dropout)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(projection_dropout)
        self.q_quant = QuantPoint("q")
        self.k_quant = QuantPoint("k")
        self.v_quant = QuantPoint("v")
        self.attn_quant = QuantPoint("attn_probs", non_negative=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)  # (B, N, 3, h, C/h)
        qkv = qkv.permute(2, 0, 3, 1, 4)  # (3, B, h, N, C/h)
        q, k, v = qkv.unbind(0)  # each (B, h, N, C/h); unbind's backward stacks, indexing's would zero-fill 3x
        if attention_ready(self):  # eval without grad: exact code products, as the exported integer model
            points = (self.q_quant, self.k_quant, self.v_quant, self.attn_quant)
            return self.proj(attention_on_codes(q, k, v, tuple(Codes(p) for p in points), self.scale)
                             .transpose(1, 2).reshape(B, N, C))
        q, k, v = self.q_quant(q), self.k_quant(k), self.v_quant(v)
        if type(self.attn_quant) is QuantPoint:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            attn = (q @ k.transpose(-2, -1)) * self.scale  # (B, h, N, N)
            attn = self.attn_drop(self.attn_quant(attn.softmax(dim=-1)))
            x = attn @ v  # (B, h, N, C/h)
        x = x.transpose(1, 2).reshape(B, N, C)  # (B, N, C)
        return self.proj_drop(self.proj(x))


class TransformerEncoderLayer(nn.Module):
    """Encoder block with the upstream LayerNorm quirk (reference §1.4, Compact-Transformers issue #25).

        x = norm1(x + drop_path(self_attn(pre_norm(x))))      # the residual stream is replaced by its norm
        x = x + drop_path(dropout2(linear2(dropout1(act(linear1(x))))))
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float = 0.0,
                 attention_dropout: float = 0.1, drop_path_rate: float = 0.0, use_relu: bool = False,
                 norm: Literal["ln", "bn"] = "ln"):
        super().__init__()
        self.pre_norm = make_norm(norm, d_model)
        self.self_attn = Attention(d_model, nhead, attention_dropout, dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = make_norm(norm, d_model)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout2 = nn.Dropout(dropout)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.activation = nn.ReLU() if use_relu else nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, N, d)
        x = x + self.drop_path(self.self_attn(self.pre_norm(x)))
        x = self.norm1(x)
        m = self.linear2(self.dropout1(self.activation(self.linear1(x))))
        return x + self.drop_path(self.dropout2(m))
