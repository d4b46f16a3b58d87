"""Linear layers packed for oneDNN (model/packed_linear.py): in bfloat16 they give F.linear's
result bit for bit at every input width a step or a prefill feeds, and packing a whole model
leaves its forward as it was."""
import pytest
import torch
import torch.nn.functional as F
from minedraft.model.loading import load_model
from minedraft.model.packed_linear import PackedLinear, pack_linears
from minedraft.model.quantization import Int4WeightOnlyLinear, quantize_linears
from torch import nn


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 40, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_bfloat16_packed_matmul_is_f_linear_bit_for_bit(rows, bias):
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 128, generator=generator).to(torch.bfloat16)
    b = torch.randn(96, generator=generator).to(torch.bfloat16) if bias else None
    x = torch.randn(2, rows, 128, generator=generator).to(torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(PackedLinear(weight, b)(x), F.linear(x, weight, b))


def test_float32_packed_matmul_differs_only_by_rounding():
    generator = torch.Generator().manual_seed(0)
    weight, x = torch.randn(96, 128, generator=generator), torch.randn(5, 128, generator=generator)
    with torch.inference_mode():
        torch.testing.assert_close(PackedLinear(weight, None)(x), F.linear(x, weight), atol=1e-4, rtol=1e-4)


def test_a_sliced_input_is_read_as_its_values():
    """The attention output reaches o_proj as a view; the LM head, as picked-out positions."""
    weight = torch.randn(32, 64).to(torch.bfloat16)
    wide = torch.randn(3, 7, 128).to(torch.bfloat16)
    x = wide[:, ::2, :64]
    with torch.inference_mode():
        assert torch.equal(PackedLinear(weight, None)(x), F.linear(x.contiguous(), weight))


def test_packing_a_model_keeps_its_logits_and_leaves_quantized_layers(tiny_pair):
    reference = load_model(tiny_pair[0], "cpu", "bfloat16")
    packed = load_model(tiny_pair[0], "cpu", "bfloat16")
    num_linear = sum(type(m) is nn.Linear for m in packed.modules())
    assert pack_linears(packed) == num_linear > 0
    assert not any(type(m) is nn.Linear for m in packed.modules())
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    with torch.inference_mode():
        assert torch.equal(packed(ids).logits, reference(ids).logits)

    quantized = quantize_linears(load_model(tiny_pair[0], "cpu", "bfloat16"), "int4")
    num_int4 = sum(isinstance(m, Int4WeightOnlyLinear) for m in quantized.modules())
    pack_linears(quantized)
    assert sum(isinstance(m, Int4WeightOnlyLinear) for m in quantized.modules()) == num_int4 > 0
