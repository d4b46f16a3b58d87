"""Weight-only int8/int4 draft layers: each computes with exactly its quantized weights, a quantized
draft keeps greedy output the target's, and the key is checked at load."""
import pytest
import torch
from minedraft import Engine, EngineConfig
from minedraft.config import ConfigError
from minedraft.drafting.draft_model import build_draft_model
from minedraft.model.quantization import (
    INT4_GROUP_SIZE,
    MAX_QUANTIZED_ROWS,
    Int4WeightOnlyLinear,
    Int8WeightOnlyLinear,
    quantize_linears,
)
from torch import nn


@pytest.fixture
def linear():
    torch.manual_seed(0)
    return nn.Linear(128, 96, bias=True).to(torch.bfloat16)


def test_int8_computes_with_its_rounded_weights_per_output_channel(linear):
    x = torch.randn(2, 2, 128, dtype=torch.bfloat16)  # 4 rows: the quantized kernel
    quantized = Int8WeightOnlyLinear(linear)
    weights = quantized.weight.float() * quantized.scales.float()[:, None]
    assert (weights - linear.weight.float()).abs().max() <= quantized.scales.float().max() / 2 + 1e-3
    with torch.inference_mode():
        got = quantized(x).float()
    want = x.float() @ weights.T + linear.bias.float()
    assert got.shape == (2, 2, 96)
    assert (got - want).norm() / want.norm() < 0.01


def test_int4_computes_with_its_groups_of_sixteen_levels(linear):
    x = torch.randn(MAX_QUANTIZED_ROWS, 128, dtype=torch.bfloat16)
    quantized = Int4WeightOnlyLinear(linear)
    groups = linear.weight.float().reshape(-1, INT4_GROUP_SIZE)
    low, high = groups.amin(1, keepdim=True), groups.amax(1, keepdim=True)
    step = (high - low) / 15
    weights = (((groups - low) / step).round() * step + low).reshape(linear.weight.shape)
    with torch.inference_mode():
        got = quantized(x).float()
    want = x.float() @ weights.T + linear.bias.float()
    assert (got - want).norm() / want.norm() < 0.01
    # ... and that is a coarse copy of the original layer, not a different one.
    exact = linear(x).float()
    assert (got - exact).norm() / exact.norm() < 0.15


@pytest.mark.parametrize("kind", [Int8WeightOnlyLinear, Int4WeightOnlyLinear])
def test_wide_inputs_run_on_the_dense_weights(linear, kind):
    """The CPU kernels read the quantized weights once per input row: a prefill takes bfloat16."""
    x = torch.randn(3, MAX_QUANTIZED_ROWS, 128, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(kind(linear)(x), linear(x))


@pytest.mark.parametrize("kind", [Int8WeightOnlyLinear, Int4WeightOnlyLinear])
def test_a_strided_input_is_taken(linear, kind):
    wide = torch.randn(2, 256, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(kind(linear)(wide[:, ::2]), kind(linear)(wide[:, ::2].contiguous()))


def test_every_linear_of_the_draft_is_replaced(tiny_pair):
    draft = build_draft_model(tiny_pair[1], "cpu", "bfloat16", 2, 64, (0,), 300, quantization="int4")
    layers = draft.runner.model.model.layers
    assert all(type(m) is not nn.Linear for m in layers.modules())
    assert isinstance(layers[0].mlp.down_proj, Int4WeightOnlyLinear)
    # The LM head's 300 outputs are not a multiple of tinygemm's 16: it stays in bfloat16.
    assert type(draft.runner.model.lm_head) is nn.Linear
    model = quantize_linears(nn.Sequential(nn.Linear(24, 8)), "int4")  # 24 inputs: no 32-wide groups
    assert isinstance(model[0], nn.Linear)


@pytest.mark.parametrize("quantization", ["int8", "int4"])
@pytest.mark.parametrize("mode", ["sd", "psd"])
def test_a_quantized_draft_keeps_the_targets_greedy_output(tiny_pair, mode, quantization):
    """In float32, so identity is exact: the draft computes in bfloat16 on its quantized weights."""
    prompts = ["def add(a, b):", "class Point:\n", "for i in", "import os"]
    params = {"max_tokens": 20, "temperature": 0, "ignore_eos": True}
    alone = Engine(EngineConfig(target_model=tiny_pair[0], draft_model=tiny_pair[1], mode="ar", max_model_len=256))
    try:
        expected = [o.new_token_ids for o in alone.generate(prompts, params)]
    finally:
        alone.close()
    engine = Engine(EngineConfig(target_model=tiny_pair[0], draft_model=tiny_pair[0], mode=mode,
                                 draft_quantization=quantization, num_draft_tokens=3, max_model_len=256))
    try:
        outs = engine.generate(prompts, params)
    finally:
        engine.close()
    assert [o.new_token_ids for o in outs] == expected
    # The target's own weights, quantized, still agree with it most of the time.
    assert sum(o.num_accepted_tokens for o in outs) > 0.5 * sum(o.num_drafted_tokens for o in outs)


def test_the_key_is_checked_at_load(tiny_pair):
    with pytest.raises(ConfigError, match="draft_quantization must be one of"):
        EngineConfig.from_dict({"draft_quantization": "int2"})
    assert EngineConfig.from_dict({"draft_quantization": "int4"}).draft_quantization == "int4"
