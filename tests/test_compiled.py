"""The compiled forward (`enforce_eager: false`): the compact Llama/Qwen2 forward under
torch.compile(fullgraph=True) gives the eager path's logits and output, and a varied load after
the load-time warm-up compiles nothing more."""
import pytest
import torch
from engine_helpers import PROMPTS, make_engine
from minedraft.config import ConfigError, EngineConfig
from minedraft.model import compact
from minedraft.model.loading import load_model
from minedraft.model.quantization import quantize_linears
from minedraft.model.runner import ModelRunner

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def unique_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def test_the_compact_forward_matches_transformers_row_by_row(tiny_pair):
    model = load_model(tiny_pair[0], "cpu", "float32")
    assert compact.is_supported(model)
    # Two copies: the fast runner packs its model's linear layers in place.
    eager = ModelRunner(model, 3, 64)
    fast = ModelRunner(load_model(tiny_pair[0], "cpu", "float32"), 3, 64, enforce_eager=False)
    caches = {eager: eager.new_cache(), fast: fast.new_cache()}
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17]]
    steps = [[[20], [21], [22]], [[23, 24, 25], [26], [27, 28]]]
    logits = {}
    for runner, cache in caches.items():
        runner.fill(cache, [2, 0, 1], [0, 0, 0], prompts)  # rows picked out, as a prefill picks them
        logits[runner] = []
        starts = [len(prompts[1]), len(prompts[2]), len(prompts[0])]  # rows 0, 1, 2 after the fill above
        for feeds in steps:
            out = runner.forward(cache, slice(0, 3), starts, feeds)
            logits[runner].append([out[r, :len(f)] for r, f in enumerate(feeds)])
            starts = [s + len(f) for s, f in zip(starts, feeds)]
    for step_eager, step_fast in zip(logits[eager], logits[fast]):
        for row_eager, row_fast in zip(step_eager, step_fast):
            torch.testing.assert_close(row_fast, row_eager, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["ar", "sd", "psd"])
def test_a_varied_load_is_lossless_and_compiles_nothing_after_warm_up(tiny_pair, mode):
    """Arrivals and departures, rollbacks of every length, a different k per request and a
    cancellation, greedy: the compiled engine's output is the eager engine's, token for token, in
    every mode (PSD's two batches move rows between their caches)."""
    params = [{"max_tokens": 20 + 3 * i, "temperature": 0, "num_draft_tokens": i % 4} for i in range(len(PROMPTS))]

    def run(engine):
        outputs, submitted, step = {}, 0, 0
        while submitted < len(PROMPTS) or engine.has_work():
            if submitted < len(PROMPTS) and step % 2 == 0:
                engine.submit(str(submitted), PROMPTS[submitted], params[submitted])
                submitted += 1
            if step == 5:
                engine.cancel("1")
            for out in engine.step():
                outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
            step += 1
        engine.close()
        return outputs

    expected = run(make_engine(*tiny_pair, mode=mode, drafter="inline"))
    engine = make_engine(*tiny_pair, mode=mode, drafter="inline", enforce_eager=False)
    assert engine.target.compiled is not None
    graphs_after_warm_up = unique_graphs()
    got = run(engine)
    assert unique_graphs() == graphs_after_warm_up
    assert {rid: tokens for rid, tokens in got.items() if rid != "1"} == \
        {rid: tokens for rid, tokens in expected.items() if rid != "1"}


def record_shapes(static) -> list[tuple[int, int]]:
    """The (rows, tokens) of every call of a StaticSteps' graphs, from now on."""
    shapes_run, compiled = [], static._compiled
    static._compiled = lambda input_ids, *rest: shapes_run.append(tuple(input_ids.shape)) or compiled(input_ids, *rest)
    return shapes_run


def test_static_step_graphs_are_lossless_and_compile_nothing_after_warm_up(tiny_pair):
    """`compile_sizes`: the target's AR and verification steps and the draft's steps of one row
    run static-shape graphs with frozen weights (the rest runs the regional graph); under the
    varied load the output is the eager engine's and no graph is compiled after the warm-up."""
    params = [{"max_tokens": 20 + 3 * i, "temperature": 0, "num_draft_tokens": i % 4} for i in range(4)]

    def run(engine):
        outputs = {}
        for i, prompt in enumerate(PROMPTS[:4]):
            engine.submit(str(i), prompt, params[i])
            for out in engine.step():
                outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
        while engine.has_work():
            for out in engine.step():
                outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
        engine.close()
        return outputs

    expected = run(make_engine(*tiny_pair, mode="sd", drafter="inline", max_num_seqs=4))
    engine = make_engine(*tiny_pair, mode="sd", drafter="inline", max_num_seqs=4, enforce_eager=False,
                         compile_sizes="1")
    target_static, draft_static = engine.target.static_steps, engine.drafter.draft_model.runner.static_steps
    assert target_static.shapes == [(1, 1), (1, 4)]
    assert draft_static.shapes == [(1, 1)]
    target_shapes, draft_shapes = record_shapes(target_static), record_shapes(draft_static)
    graphs_after_warm_up = unique_graphs()
    assert run(engine) == expected
    assert unique_graphs() == graphs_after_warm_up
    assert {(1, 1), (1, 4)} <= set(target_shapes)
    assert (1, 1) in draft_shapes


# int4 is the shipped draft's format; int8's half-minute of autotuned compiling runs with the slow tests.
@pytest.mark.parametrize("kind", [pytest.param("int8", marks=pytest.mark.slow), "int4"])
def test_static_step_graphs_run_weight_only_layers_as_the_kernels_do(tiny_pair, kind):
    """A quantized model's static graph gives the eager kernels' logits, up to bf16 rounding: two of
    its steps at the logits' scale (the eager and the regional graph differ by one already). At
    one token its int8/int4 products are lowered over the frozen codes; at five (a verification,
    past MAX_QUANTIZED_ROWS) its layers take the packed dense weights they keep."""
    models = [quantize_linears(load_model(tiny_pair[0], "cpu", "bfloat16"), kind) for _ in range(2)]
    eager = ModelRunner(models[0], 1, 64)
    static = ModelRunner(models[1], 1, 64, enforce_eager=False, static_shapes=((1, 1), (1, 5)))
    shapes_run = record_shapes(static.static_steps)
    logits = {}
    for runner in (eager, static):
        cache = runner.new_cache()
        runner.fill(cache, [0], [0], [[5, 6, 7, 8, 9]])
        logits[runner] = [runner.forward(cache, [0], [5], [[10, 11, 12, 13, 14]]),
                          runner.forward(cache, [0], [10], [[15]])]
    assert shapes_run == [(1, 5), (1, 1)]
    for got, want in zip(logits[static], logits[eager]):
        torch.testing.assert_close(got, want, rtol=0, atol=2 * torch.finfo(torch.bfloat16).eps * float(want.abs().max()))


def test_compile_sizes_are_checked(tiny_pair):
    with pytest.raises(ConfigError, match="enforce_eager false"):
        EngineConfig(target_model=tiny_pair[0], draft_model=tiny_pair[1], compile_sizes="1").validate()
    with pytest.raises(ConfigError, match=r"\[1, max_num_seqs"):
        EngineConfig(target_model=tiny_pair[0], draft_model=tiny_pair[1], compile_sizes="0", enforce_eager=False,
                     max_num_seqs=4).validate()
    with pytest.raises(ConfigError, match="row counts such as"):
        EngineConfig(target_model=tiny_pair[0], draft_model=tiny_pair[1], compile_sizes="one", enforce_eager=False,
                     max_num_seqs=4).validate()
    with pytest.raises(ConfigError, match="target_quantization none, int8 or int4"):
        EngineConfig(target_model=tiny_pair[0], draft_model=tiny_pair[1], compile_sizes="1", enforce_eager=False,
                     target_quantization="w8a8").validate()
    with pytest.raises(ConfigError, match="draft_quantization none, int8 or int4"):
        EngineConfig(target_model=tiny_pair[0], draft_model=tiny_pair[1], compile_sizes="1", enforce_eager=False,
                     draft_quantization="w8a8").validate()
    EngineConfig(target_model=tiny_pair[0], draft_model=tiny_pair[1], compile_sizes="1", enforce_eager=False,
                 draft_quantization="w8a8", mode="ar").validate()  # no draft runs: nothing to refuse
    config = EngineConfig(target_model=tiny_pair[0], draft_model=tiny_pair[1], compile_sizes="2, 1", mode="ar",
                          enforce_eager=False)
    assert config.static_step_shapes == ((1, 1), (2, 1))
