"""OutputBuilder alone: how verified tokens become a request's output."""
import pytest
import torch
from minedraft.engine.output import OutputBuilder
from minedraft.sampling_params import SamplingParams
from minedraft.sequence import Sequence
from transformers import AutoTokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_pair):
    return AutoTokenizer.from_pretrained(tiny_pair[0])


def sequence(tokenizer, params, prompt="x"):
    return Sequence("r", tokenizer(prompt).input_ids, SamplingParams.from_dict(params), 0, torch.Generator())


def test_multibyte_characters_stream_whole(tokenizer):
    """Byte-level BPE splits characters across tokens: no delta may carry half a character."""
    builder = OutputBuilder(tokenizer, (tokenizer.eos_token_id,), 256)
    text = "数字 ✓ ünïcødé"
    ids = tokenizer(text).input_ids
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids), "the test needs split characters"
    seq = sequence(tokenizer, {"max_tokens": 100})
    deltas = [builder.output(seq, builder.append(seq, [token])).text_delta for token in ids]
    seq.finish_reason = "length"
    deltas.append(builder.output(seq, []).text_delta)
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


def test_a_stop_string_cuts_the_text_and_the_tokens_after_it(tokenizer):
    builder = OutputBuilder(tokenizer, (tokenizer.eos_token_id,), 256)
    ids = tokenizer("def add(a, b):\n    return a + b\n").input_ids
    for include, expected in ((False, "def add(a, b):\n    "), (True, "def add(a, b):\n    return")):
        seq = sequence(tokenizer, {"max_tokens": 100, "stop": ["return"], "include_stop_str_in_output": include})
        kept, deltas = [], []
        for token in ids:
            if seq.is_finished:
                break
            kept += builder.append(seq, [token])
            deltas.append(builder.output(seq, []).text_delta)
        assert seq.finish_reason == "stop"
        assert "".join(deltas) == expected
        assert len(kept) < len(ids)


def test_eos_stop_tokens_and_length(tokenizer):
    eos = tokenizer.eos_token_id
    builder = OutputBuilder(tokenizer, (eos, 7), 256)
    seq = sequence(tokenizer, {"max_tokens": 10})
    assert builder.append(seq, [5, 7, 9]) == [5, 7] and seq.finish_reason == "eos"  # a second EOS id
    seq = sequence(tokenizer, {"max_tokens": 10, "ignore_eos": True})
    assert builder.append(seq, [5, eos, 9]) == [5, eos, 9] and not seq.is_finished
    seq = sequence(tokenizer, {"max_tokens": 10, "stop_token_ids": [9], "min_tokens": 3})
    assert builder.append(seq, [9, 5, 9, 4]) == [9, 5, 9] and seq.finish_reason == "stop"  # not before min_tokens
    seq = sequence(tokenizer, {"max_tokens": 2})
    assert builder.append(seq, [5, 6, 8]) == [5, 6] and seq.finish_reason == "length"
    short = OutputBuilder(tokenizer, (eos,), len(tokenizer("x").input_ids) + 1)
    seq = sequence(tokenizer, {"max_tokens": 10})
    assert short.append(seq, [5, 6]) == [5] and seq.finish_reason == "length"  # max_model_len
