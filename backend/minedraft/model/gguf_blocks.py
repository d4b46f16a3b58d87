"""A GGUF file's 4-bit blocks, read as they are published, for the quantized target's int4 layers.

Q4_0, Q4_1 and Q4_K all store, per group of 32 inputs of one output row, 4-bit codes q and a
dequantisation w = scale * q + offset (Q4_K's scale and offset are themselves 6-bit multiples of a
half-precision pair per 256). That is tinygemm's int4 layout with zero = offset + 8 * scale, so the
codes go into the int4 kernel as published: no detour through bfloat16, no second rounding of the
weights. Other types (Q5_*, Q6_K, Q8_0, ...) have no exact int4 form; model/quantization.py keeps
those layers in int8 from their dequantised weights (docs/benchmarks.md measures the departure).

The tensors are found by gguf-py's name map and, for Llama, un-permuted as transformers does
(its GGUF tensor processor, applied to row indices): the loaded model's weights are the
reference, and `read_int4_groups` refuses a layer whose codes do not dequantise to them.
"""
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType
from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS

GROUP_SIZE = 32


@dataclass
class Int4Groups:
    """q: [out, in] codes 0..15; scale, offset: [out, in / 32], float32; w = scale * q + offset."""
    codes: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        out_features, in_features = self.codes.shape
        grouped = self.codes.reshape(out_features, -1, GROUP_SIZE).float()
        return (grouped * self.scale[..., None] + self.offset[..., None]).reshape(out_features, in_features)


def _nibbles(packed: np.ndarray, per_group: int) -> np.ndarray:
    """ggml's packing: a run of 16 (or 32) bytes holds one group's first half in its low nibbles
    and its second half in its high nibbles."""
    blocks = packed.reshape(packed.shape[0], -1, 1, per_group // 2) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return (blocks & np.uint8(0x0F)).reshape(packed.shape[0], -1, per_group)


def _half(column: np.ndarray) -> np.ndarray:
    return column.copy().view(np.float16).astype(np.float32)


def _q4_0(blocks: np.ndarray):
    scale = _half(blocks[:, :2])
    return _nibbles(blocks[:, 2:], GROUP_SIZE), scale, -8 * scale


def _q4_1(blocks: np.ndarray):
    return _nibbles(blocks[:, 4:], GROUP_SIZE), _half(blocks[:, :2]), _half(blocks[:, 2:4])


def _q4_k(blocks: np.ndarray):
    d, dmin = _half(blocks[:, :2]), _half(blocks[:, 2:4])
    sub_scale, sub_min = gguf.quants.Q4_K.get_scale_min(blocks[:, 4:4 + gguf.quants.Q4_K.K_SCALE_SIZE])
    codes = _nibbles(blocks[:, 4 + gguf.quants.Q4_K.K_SCALE_SIZE:], 2 * GROUP_SIZE).reshape(blocks.shape[0], -1,
                                                                                            GROUP_SIZE)
    return codes, d * sub_scale.astype(np.float32), -dmin * sub_min.astype(np.float32)


INT4_TYPES = {GGMLQuantizationType.Q4_0: _q4_0, GGMLQuantizationType.Q4_1: _q4_1, GGMLQuantizationType.Q4_K: _q4_k}


class GgufBlocks:
    """The 4-bit linear weights of one GGUF file, by the HF name of their module."""

    def __init__(self, path: str | Path, config):
        self.reader = gguf.GGUFReader(path)
        architecture = str(self.reader.fields["general.architecture"].contents())
        arch = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}[architecture]
        self.names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
        self.tensors = {tensor.name: tensor for tensor in self.reader.tensors}
        processor = TENSOR_PROCESSORS.get(architecture)
        self.processor = processor(config={"num_attention_heads": config.num_attention_heads,
                                           "num_key_value_heads": config.num_key_value_heads}) if processor else None

    def int4_groups(self, module_name: str) -> Int4Groups | None:
        """The module's weight as int4 groups, or None where the file stores it otherwise."""
        gguf_name = self.names.get_name(f"{module_name}.weight", try_suffixes=(".weight",))
        tensor = self.tensors.get(gguf_name)
        if tensor is None or tensor.tensor_type not in INT4_TYPES:
            return None
        out_features = int(tensor.shape[1])
        _, type_size = gguf.GGML_QUANT_SIZES[tensor.tensor_type]
        codes, scale, offset = INT4_TYPES[tensor.tensor_type](np.asarray(tensor.data).reshape(-1, type_size))
        codes = codes.reshape(out_features, -1)
        scale, offset = scale.reshape(out_features, -1), offset.reshape(out_features, -1)
        if self.processor is not None:  # rows un-permuted as transformers un-permutes the weight
            rows = self.processor.process(np.arange(out_features)[:, None], gguf_name).weights[:, 0]
            codes, scale, offset = codes[rows], scale[rows], offset[rows]
        return Int4Groups(torch.from_numpy(codes.astype(np.int32)), torch.from_numpy(np.ascontiguousarray(scale)),
                          torch.from_numpy(np.ascontiguousarray(offset)))


def read_int4_groups(blocks: GgufBlocks, module_name: str, weight: torch.Tensor) -> Int4Groups | None:
    """The module's int4 groups, checked against the weight transformers loaded from the same file."""
    groups = blocks.int4_groups(module_name)
    if groups is None:
        return None
    if groups.codes.shape != weight.shape:
        raise ValueError(f"{module_name}: GGUF codes of shape {tuple(groups.codes.shape)}, weight {tuple(weight.shape)}")
    loaded = weight.detach().float()
    # The loaded weight is the same dequantisation rounded to its dtype (transformers via gguf-py).
    rtol = max(torch.finfo(weight.dtype).eps, 1e-5)
    if not torch.allclose(groups.dequantize(), loaded, rtol=rtol, atol=1e-5 * float(loaded.abs().amax())):
        raise ValueError(f"{module_name}: the GGUF's 4-bit blocks do not dequantise to the loaded weight")
    return groups


def gguf_beside(model_path: str) -> Path | None:
    """The GGUF a model was converted from: the file itself, or `model.gguf` in its directory
    (tools/prepare_models.py keeps it there)."""
    path = Path(model_path)
    if path.suffix == ".gguf":
        return path
    kept = path / "model.gguf"
    return kept if kept.is_file() else None
