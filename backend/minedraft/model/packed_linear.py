"""Linear layers whose weights oneDNN reorders once, at load, into the blocked layout its CPU
matmul reads, instead of at every call as `F.linear` does: what inductor's freezing does inside a
compiled graph, done here outside it. The packed layers serve transformers' eager forward and the
compact one alike; under torch.compile they are one opaque op, so no weight is frozen into a
graph and inductor's on-disk cache holds across restarts and across models of one architecture.

In bfloat16 the packed matmul gives `F.linear`'s result bit for bit (tests/test_packed_linear.py);
in float32 it differs by rounding (its sums run in another order).
"""
import torch
from torch import nn

PACKED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@torch.library.custom_op("minedraft::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, packed_weight: torch.Tensor, bias: torch.Tensor | None,
                  out_features: int) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed_weight, bias, "none", [], "")


@packed_linear.register_fake
def _packed_linear_shape(x, packed_weight, bias, out_features):
    return x.new_empty(*x.shape[:-1], out_features)


class PackedLinear(nn.Module):
    """y = x W^T + b with W held only in oneDNN's packed layout (an opaque tensor)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        # None: packed for any number of input rows (a step's 1 token and a prefill's hundreds).
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.packed_weight, self.bias, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def can_pack(model) -> bool:
    parameter = next(model.parameters())
    return (parameter.device.type == "cpu" and parameter.dtype in PACKED_DTYPES
            and torch.backends.mkldnn.is_available())


def pack_linears(model) -> int:
    """Replaces every plain nn.Linear of a CPU model (the LM head included: a tied head gets a
    packed copy of the embeddings) by a PackedLinear; quantized layers stay. Returns how many."""
    if not can_pack(model):
        return 0
    plain = [(name, module) for name, module in model.named_modules() if type(module) is nn.Linear]
    for name, linear in plain:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, PackedLinear(linear.weight, linear.bias))
    return len(plain)
