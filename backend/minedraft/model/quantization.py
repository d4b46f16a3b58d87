"""Quantized linear layers, the draft's (`draft_quantization`) and the target's
(`target_quantization`): weight-only int8 / int4 as gpt-fast writes them, and W8A8 (int8 weights and
activations) on oneDNN's integer GEMM.

A quantized draft changes nothing about losslessness: acceptance only reads the draft's
proposals and their probabilities, and the output follows the target's distribution. A quantized
target *is* the served model: speculation gives its own output, whichever kernel a step's width
picks, so both kernels of a layer compute with the same (dequantised) weights.

torch's own weight-only kernels do the work: on CPU `_weight_int8pack_mm` and
`_weight_int4pack_mm_for_cpu` (AVX2 code for bfloat16 activations only: float32 inputs take a
scalar loop about 15x slower, so a quantized draft computes in bfloat16 on CPU), on CUDA
`_weight_int4pack_mm` (tinygemm, bfloat16) and, for int8, a dequantising matmul. torchao 0.18, the
field's library for this, was tried first: its int4 configs have no CPU path (they need the `mslk`
package or CUDA) and its int8 one was slower than bfloat16 here (docs/qwen-coder.md).

A target converted from a GGUF keeps its published 4-bit blocks (model/gguf_blocks.py): under
int4, Q4_0/Q4_1/Q4_K layers take their codes as they are and the file's other layers (Q6_K, ...)
go to int8.
"""
import torch
import torch.nn.functional as F
from torch import nn

from minedraft.model.gguf_blocks import GROUP_SIZE as INT4_GROUP_SIZE
from minedraft.model.gguf_blocks import GgufBlocks, Int4Groups, gguf_beside, read_int4_groups
from minedraft.model.packed_linear import PackedLinear

# The CPU kernels read the quantized weights once per row of the input: they beat a bfloat16 matmul
# only for a few rows (docs/qwen-coder.md). Wider inputs (a verification, a batch of 8 drafting, a
# prefill) run on the dequantised weights, which a CPU layer keeps packed for oneDNN
# (model/packed_linear.py).
MAX_QUANTIZED_ROWS = 4
INT4_INNER_K_TILES = 2  # tinygemm's packing: K must be a multiple of 16 * this


class WeightOnlyLinear(nn.Module):
    """What both kinds share: the bias, the dtype they compute in (the model's), and on CPU the
    dequantised weights for wide inputs."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.out_features = linear.out_features
        self.dtype = linear.weight.dtype
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())
        self.dense = None

    def keep_dense(self, dequantized: torch.Tensor) -> None:
        if dequantized.device.type == "cpu":
            self.dense = PackedLinear(dequantized.to(self.dtype), None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if self.dense is not None and flat.shape[0] > MAX_QUANTIZED_ROWS:
            out = self.dense(x.to(self.dtype)).to(x.dtype)
            return out if self.bias is None else out + self.bias
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
        self.keep_dense(self.weight.float() * self.scales.float()[:, None])

    def quantized_matmul(self, flat: torch.Tensor) -> torch.Tensor:
        flat = flat.to(self.scales.dtype)
        if flat.device.type == "cpu":
            return torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scales)
        return F.linear(flat, self.weight.to(flat.dtype)) * self.scales.to(flat.dtype)


class Int4WeightOnlyLinear(WeightOnlyLinear):
    """Groupwise asymmetric 4-bit weights (tinygemm's layout: w = (q - 8) * scale + zero per group
    of INT4_GROUP_SIZE inputs), packed once for the device's kernel. `groups`: the codes as a
    checkpoint publishes them (a GGUF's 4-bit blocks); otherwise the weight's own min-max grid."""

    def __init__(self, linear: nn.Linear, groups: Int4Groups | None = None):
        super().__init__(linear)
        groups = groups or min_max_groups(linear.weight.detach().float())
        quantized = groups.codes.to(device=linear.weight.device, dtype=torch.int32)
        zeros = groups.offset + 8 * groups.scale
        # tinygemm reads [groups, out, (scale, zero)] in the activations' dtype (bfloat16 on CUDA).
        kernel_dtype = self.dtype if linear.weight.device.type == "cpu" else torch.bfloat16
        self.register_buffer("scales_and_zeros", torch.stack([groups.scale, zeros], dim=2).transpose(0, 1)
                             .contiguous().to(device=linear.weight.device, dtype=kernel_dtype))
        scales_and_zeros = self.scales_and_zeros.float()
        self.keep_dense(Int4Groups(quantized, scales_and_zeros[..., 0].T, scales_and_zeros[..., 1].T
                                   - 8 * scales_and_zeros[..., 0].T).dequantize())
        device = linear.weight.device
        if device.type == "cpu":
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(quantized, INT4_INNER_K_TILES)
        else:
            as_uint8 = (quantized[:, ::2] << 4 | quantized[:, 1::2]).to(torch.uint8)
            packed = torch.ops.aten._convert_weight_to_int4pack(as_uint8, INT4_INNER_K_TILES)
        self.register_buffer("weight", packed)

    def quantized_matmul(self, flat: torch.Tensor) -> torch.Tensor:
        flat = flat.to(self.scales_and_zeros.dtype)
        if flat.device.type == "cpu":
            return torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.weight, INT4_GROUP_SIZE,
                                                              self.scales_and_zeros)
        return torch.ops.aten._weight_int4pack_mm(flat, self.weight, INT4_GROUP_SIZE, self.scales_and_zeros)


# Activations go to uint8 around this zero point: oneDNN's VNNI GEMM takes unsigned activations
# (signed ones take a path ~100x slower on AVX-512 VNNI).
ACTIVATION_ZERO_POINT = 128


@torch.library.custom_op("minedraft::w8a8_linear", mutates_args=())
def w8a8_linear(activations: torch.Tensor, packed_weight: torch.Tensor, weight_scales: torch.Tensor) -> torch.Tensor:
    """uint8 activations [rows, in] (zero point ACTIVATION_ZERO_POINT, scale 1) -> the weight-scaled
    integer sums [rows, out], float32. oneDNN's op, opaque to torch.compile (its weight is packed)."""
    return torch.ops.onednn.qlinear_pointwise.tensor(
        activations, torch.ones((), dtype=torch.float32), torch.zeros((), dtype=torch.int64), packed_weight,
        weight_scales, torch.zeros_like(weight_scales, dtype=torch.int64), None, 1.0, 0, torch.float32, "none", [], "")


@w8a8_linear.register_fake
def _w8a8_linear_shape(activations, packed_weight, weight_scales):
    return activations.new_empty(activations.shape[0], weight_scales.shape[0], dtype=torch.float32)


class Int8DynamicLinear(nn.Module):
    """W8A8 (vLLM's name for it): int8 weights with one scale per output channel, and activations
    quantized to 8 bits per row at run time. oneDNN's u8 x s8 GEMM (AVX-512 VNNI, AMX where there
    is one) reads each weight once for all the rows, so a verification of k + 1 tokens costs about
    what one token does. CPU only (config.py refuses it elsewhere)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        self.out_features = linear.out_features
        scales = weight.abs().amax(dim=1).clamp(min=1e-8) / 127
        quantized = torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8)
        self.register_buffer("weight_scales", scales)
        self.register_buffer("zero_point_sums", ACTIVATION_ZERO_POINT * scales * quantized.sum(dim=1).float())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())
        self.packed_weight = torch.ops.onednn.qlinear_prepack(quantized, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Each row quantized with its own scale, so a row's result never depends on the rows beside
        # it, and the integer sums are exact: bit for bit the same at any width (a verification and
        # an AR step compute the same function). Outside the custom op, so that inductor fuses it.
        flat = x.reshape(-1, x.shape[-1]).float()
        scale = flat.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127
        activations = (torch.round(flat / scale) + ACTIVATION_ZERO_POINT).to(torch.uint8)
        sums = w8a8_linear(activations, self.packed_weight, self.weight_scales)
        out = ((sums - self.zero_point_sums) * scale).to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias


def min_max_groups(weight: torch.Tensor) -> Int4Groups:
    """Each group's 16 levels spread evenly from its least to its greatest weight."""
    out_features, in_features = weight.shape
    groups = weight.reshape(out_features, -1, INT4_GROUP_SIZE)
    low, high = groups.amin(dim=2), groups.amax(dim=2)
    scale = (high - low).clamp(min=1e-6) / 15
    codes = ((groups - low[..., None]) / scale[..., None]).round().clamp(0, 15).reshape(out_features, in_features)
    return Int4Groups(codes.to(torch.int32), scale, low)


def quantize_linears(model: nn.Module, kind: str, published: GgufBlocks | None = None) -> nn.Module:
    """Replace every nn.Linear (the LM head included) that the kernel's shapes allow, in place.
    `published`: the GGUF the model was loaded from; under int4 its 4-bit layers keep their codes
    and its other layers become int8 (weight-only)."""

    def quantized(name: str, linear: nn.Linear) -> nn.Module:
        if kind == "w8a8":
            return Int8DynamicLinear(linear)
        if kind == "int8":
            return Int8WeightOnlyLinear(linear)
        groups = read_int4_groups(published, name, linear.weight) if published is not None else None
        if published is not None and groups is None:
            return Int8WeightOnlyLinear(linear)
        return Int4WeightOnlyLinear(linear, groups) if _fits_int4(linear) else linear

    if kind != "none":
        for module_name, parent in list(model.named_modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, quantized(f"{module_name}.{name}" if module_name else name, child))
    return model


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(module, (WeightOnlyLinear, Int8DynamicLinear)) for module in model.modules())


def quantize_target(model: nn.Module, kind: str, model_path: str) -> nn.Module:
    """`target_quantization`: quantize_linears with the GGUF the model was converted from, if kept."""
    published = gguf_beside(model_path)
    return quantize_linears(model, kind, GgufBlocks(published, model.config) if published is not None else None)


def _fits_int4(linear: nn.Linear) -> bool:
    # tinygemm's tiles: outputs in multiples of 16, inputs of 16 * inner k tiles and whole groups.
    return (linear.out_features % 16 == 0 and linear.in_features % (16 * INT4_INNER_K_TILES) == 0
            and linear.in_features % INT4_GROUP_SIZE == 0)
