"""Weight-only int8/int4 layers: each computes with exactly its quantized weights, whichever kernel
an input's width picks; a quantized draft keeps greedy output the target's; a quantized target is
the served model (speculation gives its own output); a GGUF's 4-bit blocks are taken as published;
the keys are checked at load."""
import pytest
import torch
from minedraft import Engine, EngineConfig
from minedraft.config import ConfigError
from minedraft.drafting.draft_model import build_draft_model
from minedraft.model.quantization import (
    INT4_GROUP_SIZE,
    MAX_QUANTIZED_ROWS,
    Int4WeightOnlyLinear,
    Int8DynamicLinear,
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
def test_wide_inputs_run_on_the_same_weights_dequantised(linear, kind):
    """The CPU kernels read the quantized weights once per input row, so a prefill or a verification
    takes dense weights: the quantized ones dequantised, not the original layer's (in float32,
    where only the order of sums differs)."""
    linear = linear.float()
    quantized = kind(linear)
    x = torch.randn(3, MAX_QUANTIZED_ROWS, 128)
    with torch.inference_mode():
        wide = quantized(x)
        narrow = torch.stack([quantized(row) for row in x])  # 4 rows at a time: the quantized kernel
        original = linear(x)
    assert (wide - narrow).abs().max() < 1e-4 * narrow.abs().max()
    assert (wide - original).abs().max() > 1e-3 * original.abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_w8a8_gives_each_row_the_same_result_at_any_width(linear, dtype):
    """Activations are quantized per row and the integer sums are exact: a row's result is bit for
    bit the same alone or among others (what makes speculation over a W8A8 target lossless), and
    close to the float product."""
    linear = linear.to(dtype)
    quantized = Int8DynamicLinear(linear)
    x = torch.randn(40, 128, dtype=dtype)
    with torch.inference_mode():
        together = quantized(x)
        alone = torch.cat([quantized(x[i:i + 1]) for i in range(len(x))])
        exact = linear(x).float()
    assert together.dtype == dtype and together.shape == (40, 96)
    assert torch.equal(together, alone)
    assert (together.float() - exact).norm() / exact.norm() < 0.02


@pytest.mark.parametrize("kind", [Int8WeightOnlyLinear, Int4WeightOnlyLinear, Int8DynamicLinear])
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


def test_the_keys_are_checked_at_load(tiny_pair):
    for key in ("draft_quantization", "target_quantization"):
        with pytest.raises(ConfigError, match=f"{key} must be one of"):
            EngineConfig.from_dict({key: "int2"})
        assert getattr(EngineConfig.from_dict({key: "int4"}), key) == "int4"
        device = key.replace("quantization", "device")
        with pytest.raises(ConfigError, match=f"{key} w8a8 has CPU kernels only"):
            EngineConfig.from_dict({key: "w8a8", device: "cuda"})
    with pytest.raises(ConfigError, match="target_quantization needs tensor_parallel_size 1"):
        EngineConfig.from_dict({"target_quantization": "int8", "tensor_parallel_size": 2})


def _generate(config: EngineConfig, prompts, params) -> list[list[int]]:
    engine = Engine(config)
    try:
        return [o.new_token_ids for o in engine.generate(prompts, params)]
    finally:
        engine.close()


@pytest.fixture(scope="module")
def published_gguf(tiny_pair, tmp_path_factory):
    """The tiny target as a GGUF with 4-bit layers (Q4_0, Q4_1) and 8-bit ones (Q8_0), as gguf-py
    quantizes them."""
    from gguf import GGMLQuantizationType as Type
    from gguf_writer import write_llama_gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kinds = {"attn_q": Type.Q4_1, "attn_k": Type.Q4_1, "attn_v": Type.Q8_0, "attn_output": Type.Q4_0,
             "ffn_gate": Type.Q4_0, "ffn_up": Type.Q4_1, "ffn_down": Type.Q8_0}
    path = tmp_path_factory.mktemp("published") / "tiny.gguf"
    return str(write_llama_gguf(AutoModelForCausalLM.from_pretrained(tiny_pair[0]),
                                AutoTokenizer.from_pretrained(tiny_pair[0]), path, kinds))


def test_a_ggufs_four_bit_blocks_are_taken_as_published(published_gguf):
    """Loaded by transformers (dequantised), then quantized from the file: its Q4_0/Q4_1 layers
    compute with exactly the weights transformers read (Llama's q/k rows un-permuted), where the
    weight's own min-max grid would not; its Q8_0 layers go to int8."""
    from minedraft.model.gguf_blocks import GgufBlocks
    from minedraft.model.loading import load_model
    from minedraft.model.quantization import min_max_groups

    model = load_model(published_gguf, "cpu", "float32")
    loaded = {name: module.weight.detach().clone() for name, module in model.named_modules()
              if isinstance(module, nn.Linear)}
    quantize_linears(model, "int4", GgufBlocks(published_gguf, model.config))
    layer = model.model.layers[0]
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj"):
        module = layer.get_submodule(name)
        assert isinstance(module, Int4WeightOnlyLinear), name
        identity = torch.eye(module.dense.in_features)  # wide: the dense copy of the quantized weights
        with torch.inference_mode():
            weights = module(identity).T
        want = loaded[f"model.layers.0.{name}"]
        assert torch.allclose(weights, want, rtol=1e-6, atol=1e-7), name
    regrouped = min_max_groups(loaded["model.layers.0.self_attn.o_proj"]).dequantize()  # a Q4_0 layer
    assert not torch.allclose(regrouped, loaded["model.layers.0.self_attn.o_proj"], rtol=1e-6, atol=1e-7)
    assert isinstance(layer.self_attn.v_proj, Int8WeightOnlyLinear)
    assert isinstance(layer.mlp.down_proj, Int8WeightOnlyLinear)


def test_codes_that_do_not_dequantise_to_the_loaded_weight_are_refused(published_gguf):
    from minedraft.model.gguf_blocks import GgufBlocks, read_int4_groups
    from minedraft.model.loading import load_model

    model = load_model(published_gguf, "cpu", "float32")
    blocks = GgufBlocks(published_gguf, model.config)
    weight = model.model.layers[0].self_attn.q_proj.weight
    assert read_int4_groups(blocks, "model.layers.0.self_attn.q_proj", weight) is not None
    with pytest.raises(ValueError, match="do not dequantise"):
        read_int4_groups(blocks, "model.layers.0.self_attn.q_proj", weight.flip(0))


def test_q4_k_blocks_read_as_gguf_py_dequantises_them():
    """Q4_K (the shipped target's type), whose quantizer gguf-py lacks: random blocks with sane
    half-precision scales, read into int4 groups, give gguf-py's own dequantisation."""
    import gguf
    import numpy as np
    from minedraft.model.gguf_blocks import INT4_TYPES, Int4Groups

    rng = np.random.default_rng(0)
    block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q4_K]
    blocks = rng.integers(0, 256, size=(6, type_size), dtype=np.uint8)
    blocks[:, :4] = rng.uniform(0.001, 0.01, size=(6, 2)).astype(np.float16).view(np.uint8)
    codes, scale, offset = INT4_TYPES[gguf.GGMLQuantizationType.Q4_K](blocks)
    groups = Int4Groups(torch.from_numpy(codes.reshape(6, -1).astype(np.int32)), torch.from_numpy(scale),
                        torch.from_numpy(offset))
    want = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_K).reshape(6, block_size)
    assert torch.equal(groups.dequantize(), torch.from_numpy(want))


@pytest.mark.parametrize(("quantization", "mode", "enforce_eager"), [
    ("int4", "sd", True), ("int4", "psd", True), ("w8a8", "sd", True), ("w8a8", "psd", True), ("w8a8", "sd", False)])
def test_speculation_over_a_quantized_target_gives_its_own_output(published_gguf, tiny_pair, mode, quantization,
                                                                  enforce_eager):
    """Lossless relative to the served (quantized) target: greedy identity in float32 with its AR
    output, though under int4 verification's widths run the dense kernel and AR's the quantized one;
    also compiled (the activations' quantization then fused by inductor)."""
    prompts = ["def add(a, b):", "class Point:\n", "for i in", "import os"]
    params = {"max_tokens": 20, "temperature": 0, "ignore_eos": True}
    target = {"target_model": published_gguf, "target_quantization": quantization, "max_model_len": 256,
              "enforce_eager": enforce_eager}
    expected = _generate(EngineConfig(mode="ar", **target), prompts, params)
    unquantized = _generate(EngineConfig(target_model=published_gguf, mode="ar", max_model_len=256,
                                         enforce_eager=enforce_eager), prompts, params)
    got = _generate(EngineConfig(draft_model=tiny_pair[1], mode=mode, num_draft_tokens=3, **target), prompts, params)
    assert got == expected
    assert unquantized != expected  # the quantized target is a model of its own
