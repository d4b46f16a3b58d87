"""Weight-only int8 / int4 linear layers for the draft (`draft_quantization`), as gpt-fast writes them.

A quantized draft changes nothing about losslessness: acceptance only reads the draft's
proposals and their probabilities, and the output follows the target's distribution.

torch's own weight-only kernels do the work: on CPU `_weight_int8pack_mm` and
`_weight_int4pack_mm_for_cpu` (AVX2 code for bfloat16 activations only: float32 inputs take a
scalar loop about 15x slower, so a quantized draft computes in bfloat16 on CPU), on CUDA
`_weight_int4pack_mm` (tinygemm, bfloat16) and, for int8, a dequantising matmul. torchao 0.18, the
field's library for this, was tried first: its int4 configs have no CPU path (they need the `mslk`
package or CUDA) and its int8 one was slower than bfloat16 here (docs/qwen-coder.md).
"""
import torch
import torch.nn.functional as F
from torch import nn

from minedraft.model.packed_linear import PackedLinear

# The CPU kernels read the quantized weights once per row of the input: they beat a bfloat16 matmul
# only for a few rows (docs/qwen-coder.md). Wider inputs (a batch of 8 drafting, a prefill) run on
# the layer's bfloat16 weights, which a CPU layer keeps packed for oneDNN (model/packed_linear.py).
MAX_QUANTIZED_ROWS = 4
INT4_GROUP_SIZE = 32
INT4_INNER_K_TILES = 2  # tinygemm's packing: K must be a multiple of 16 * this


class WeightOnlyLinear(nn.Module):
    """What both kinds share: the bias, and on CPU the dense weights for wide inputs."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.out_features = linear.out_features
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())
        self.dense = None
        if linear.weight.device.type == "cpu":
            bias = None if linear.bias is None else linear.bias.to(torch.bfloat16)
            self.dense = PackedLinear(linear.weight.to(torch.bfloat16), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if self.dense is not None and flat.shape[0] > MAX_QUANTIZED_ROWS:
            return self.dense(x.to(torch.bfloat16)).to(x.dtype)
        # The kernels want a contiguous input; a slice of a wider tensor (an attention output) is not.
        out = self.quantized_matmul(flat.contiguous()).to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias


class Int8WeightOnlyLinear(WeightOnlyLinear):
    """y = x W^T * scale, with W in int8 and one scale per output channel (symmetric)."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        weight = linear.weight.detach().float()
        scales = weight.abs().amax(dim=1).clamp(min=1e-8) / 127
        self.register_buffer("weight", torch.round(weight / scales[:, None]).clamp(-128, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(linear.weight.dtype))

    def quantized_matmul(self, flat: torch.Tensor) -> torch.Tensor:
        if flat.device.type == "cpu":
            return torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scales.to(flat.dtype))
        return F.linear(flat, self.weight.to(flat.dtype)) * self.scales.to(flat.dtype)


class Int4WeightOnlyLinear(WeightOnlyLinear):
    """Groupwise asymmetric 4-bit weights (tinygemm's layout: w = (q - 8) * scale + zero per group
    of INT4_GROUP_SIZE inputs), packed once for the device's kernel."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        weight = linear.weight.detach().float()
        out_features, in_features = weight.shape
        groups = weight.reshape(-1, INT4_GROUP_SIZE)
        low, high = groups.amin(dim=1, keepdim=True), groups.amax(dim=1, keepdim=True)
        scales = (high - low).clamp(min=1e-6) / 15
        zeros = low + scales * 8
        quantized = ((groups - low) / scales).round().clamp(0, 15).to(torch.int32).reshape(out_features, in_features)
        # tinygemm reads [groups, out, (scale, zero)] in bfloat16.
        self.register_buffer("scales_and_zeros", torch.stack(
            [scales.reshape(out_features, -1), zeros.reshape(out_features, -1)], dim=2
        ).transpose(0, 1).contiguous().to(torch.bfloat16))
        device = weight.device
        if device.type == "cpu":
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(quantized, INT4_INNER_K_TILES)
        else:
            as_uint8 = (quantized[:, ::2] << 4 | quantized[:, 1::2]).to(torch.uint8)
            packed = torch.ops.aten._convert_weight_to_int4pack(as_uint8, INT4_INNER_K_TILES)
        self.register_buffer("weight", packed)

    def quantized_matmul(self, flat: torch.Tensor) -> torch.Tensor:
        flat = flat.to(torch.bfloat16)
        if flat.device.type == "cpu":
            return torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.weight, INT4_GROUP_SIZE,
                                                              self.scales_and_zeros)
        return torch.ops.aten._weight_int4pack_mm(flat, self.weight, INT4_GROUP_SIZE, self.scales_and_zeros)


QUANTIZED_LINEAR = {"int8": Int8WeightOnlyLinear, "int4": Int4WeightOnlyLinear}


def quantize_linears(model: nn.Module, kind: str) -> nn.Module:
    """Replace every nn.Linear (the LM head included) that the kernel's shapes allow, in place."""
    if kind == "none":
        return model
    make = QUANTIZED_LINEAR[kind]
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and _fits(kind, child):
                setattr(parent, name, make(child))
    return model


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(module, WeightOnlyLinear) for module in model.modules())


def _fits(kind: str, linear: nn.Linear) -> bool:
    if kind == "int4":
        # tinygemm's tiles: outputs in multiples of 16, inputs of 16 * inner k tiles and whole groups.
        return (linear.out_features % 16 == 0 and linear.in_features % (16 * INT4_INNER_K_TILES) == 0
                and linear.in_features % INT4_GROUP_SIZE == 0)
    return True
