"""Named placeholders that mark where a model may be quantized (torch.ao's QuantStub idea)."""
from torch import nn


class QuantPoint(nn.Identity):
    """Identity until surgery swaps it for a quantizer.

    Args:
        kind: what flows through ("q", "k", "v", "attn_probs", ...), used by surgery configs.
        non_negative: the tensor is known to be >= 0 (softmax output, post-ReLU), so an
            automatically signed quantizer picks the unsigned level set.
    """

    def __init__(self, kind: str, non_negative: bool = False):
        super().__init__()
        self.kind = kind
        self.non_negative = non_negative

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, non_negative={self.non_negative}"
