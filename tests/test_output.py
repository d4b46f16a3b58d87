"""OutputBuilder alone: how verified tokens become a request's output."""
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from minedraft.engine.output import IncrementalDetokenizer, OutputBuilder
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


SHIPPED_TOKENIZERS = [Path(__file__).parent.parent / "model_repository" / name / "1" / "target"
                      for name in ("minedraft", "qwen-coder", "smollm2")]


@pytest.mark.parametrize("path", SHIPPED_TOKENIZERS, ids=lambda p: p.parent.parent.name)
def test_the_streaming_decoder_gives_a_prefix_of_the_whole_decoding(path):
    """Any token sequence, special tokens and split or invalid characters included: the
    incremental text is a prefix of the whole decoding (it may hold back what is not yet valid
    UTF-8; the final output decodes the whole). Valid text streams in full."""
    if not path.is_dir():
        pytest.skip(f"{path} not prepared (python -m minedraft.tools.prepare_models)")
    tokenizer = AutoTokenizer.from_pretrained(path)

    def streams(ids, skip_special_tokens):
        detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens)
        for end in range(1, len(ids) + 1):
            streamed = detokenizer.update(ids[:end])
            assert tokenizer.decode(ids[:end], skip_special_tokens=skip_special_tokens).startswith(streamed)
        return streamed

    @settings(max_examples=150, deadline=None)
    @given(st.lists(st.integers(0, len(tokenizer) - 1), min_size=1, max_size=40), st.booleans())
    def check(ids, skip_special_tokens):
        streams(ids, skip_special_tokens)

    check()
    text = "def f(x):\n    return x * 2  # héllo wörld 数字 ✓ 🎉\n"
    assert streams(tokenizer(text, add_special_tokens=False).input_ids, True) == text


def test_deltas_concatenate_to_the_final_text_of_random_tokens(tokenizer):
    """Random tokens split characters anywhere: the streamed deltas, then the final one, make
    the whole output's decoding."""
    generator = torch.Generator().manual_seed(0)
    builder = OutputBuilder(tokenizer, (), 256)
    ids = torch.randint(len(tokenizer), (60,), generator=generator).tolist()
    seq = sequence(tokenizer, {"max_tokens": 60})
    deltas = [builder.output(seq, builder.append(seq, ids[i:i + 3])).text_delta for i in range(0, 60, 3)]
    assert seq.finish_reason == "length"
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)


def test_a_stop_string_after_invalid_bytes_is_still_found(tokenizer):
    """Bytes that never form a character do not hold the streamed text back: a stop string
    after them cuts the output where the whole decoding has it."""
    stray = next(t for t in range(len(tokenizer)) if tokenizer.decode([t]) == "\ufffd")
    ids = [stray] * 6 + tokenizer("x = 1\nSTOP here", add_special_tokens=False).input_ids
    builder = OutputBuilder(tokenizer, (), 256)
    seq = sequence(tokenizer, {"max_tokens": 100, "stop": ["STOP"]})
    deltas = []
    for token in ids:
        if seq.is_finished:
            break
        builder.append(seq, [token])
        deltas.append(builder.output(seq, []).text_delta)
    assert seq.finish_reason == "stop"
    assert "".join(deltas) == tokenizer.decode(ids).split("STOP")[0]
