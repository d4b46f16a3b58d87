"""The paged KV pool (model/kv_cache.py) and the engine over it: blocks follow the tokens written,
rows move by table edits, prefixes are shared, admission waits for blocks, preemption recomputes,
and the output stays the target's own."""
import pytest
import torch
from engine_helpers import PROMPTS, make_engine, reference_greedy
from hypothesis import given, settings
from hypothesis import strategies as st
from minedraft import ConfigError
from minedraft.model.kv_cache import BlockPool, KVCacheFull, KVStorage, PagedKVCache, PoolSpec


def test_blocks_are_allocated_as_tokens_are_written_and_handed_back():
    pool = BlockPool(PoolSpec(num_blocks=6, block_size=4))
    cache = PagedKVCache(pool, num_rows=2, capacity=16)
    cache.reserve([0], [0], [[1, 2, 3, 4, 5]])  # 5 positions: 2 blocks
    assert cache.num_blocks(0) == 2 and pool.num_free == 4
    cache.reserve([0], [5], [[6, 7, 8, 9]])  # up to 9: 3 blocks
    assert cache.num_blocks(0) == 3
    cache.reserve([0], [4], [[7]])  # a rollback to 4, then 1 token: 2 blocks
    assert cache.num_blocks(0) == 2 and pool.num_free == 4
    with pytest.raises(ValueError, match="overflow"):
        cache.reserve([1], [0], [list(range(17))])
    cache.release_rows([0])
    assert pool.num_free == 6 and pool.usage == 0


def test_a_row_moves_by_its_table_and_nothing_is_copied():
    pool = BlockPool(PoolSpec(num_blocks=8, block_size=2))
    first, second = PagedKVCache(pool, 3, 8), PagedKVCache(pool, 3, 8)
    first.reserve([0, 1, 2], [0, 0, 0], [[1, 2, 3], [4], [5, 6]])
    tables = [first.block_table(row) for row in range(3)]
    first.release_rows([0])
    first.move_row(2, 0)  # the last row fills the hole
    assert first.block_table(0) == tables[2] and first.block_table(2) == []
    second.take_row_from(first, 1, 0)  # a request changes batch
    assert second.block_table(0) == tables[1] and first.block_table(1) == []
    assert pool.num_free == 8 - len(tables[1]) - len(tables[2])
    with pytest.raises(ValueError, match="one block pool"):
        PagedKVCache(BlockPool(PoolSpec(8, 2)), 3, 8).take_row_from(first, 0, 0)


def test_an_exhausted_pool_says_so():
    pool = BlockPool(PoolSpec(num_blocks=2, block_size=2))
    cache = PagedKVCache(pool, 2, 8)
    cache.reserve([0], [0], [[1, 2, 3, 4]])
    with pytest.raises(KVCacheFull):
        cache.reserve([1], [0], [[5]])


def test_cached_prefix_blocks_are_shared_and_evicted_least_recently_used_first():
    pool = BlockPool(PoolSpec(num_blocks=4, block_size=2, prefix_caching=True))
    cache = PagedKVCache(pool, 3, 8)
    prompt = [1, 2, 3, 4, 5]
    cache.reserve([0], [0], [prompt[:4]])
    cache.commit(0, 4)  # two full blocks, verified
    assert cache.attach_prefix(1, prompt, 4) == 4  # the whole of both blocks
    assert cache.block_table(1) == cache.block_table(0) and pool.num_free == 2
    assert cache.attach_prefix(2, [1, 2, 9, 9, 9], 4) == 2  # the first block only
    tail = cache.block_table(0)[1]
    cache.release_rows([0, 1, 2])
    assert pool.num_free == 4  # cached blocks no row uses can be handed out
    # A cached block no row uses goes before one never used (on the CPU memory is mapped in when
    # first written), least recently used first: a prefix's tail (rows hand blocks back from the end).
    cache.reserve([0], [0], [[7, 7]])
    assert cache.block_table(0) == [tail]
    assert cache.attach_prefix(1, prompt, 4) == 2  # the head is still cached
    cache.reserve([2], [0], [[8, 8, 8]])
    assert sorted(cache.block_table(2)) == [3, 4]  # never used until now
    assert pool.prefix_queries == 12 and pool.prefix_hits == 8


def test_a_cached_prefix_is_never_written():
    pool = BlockPool(PoolSpec(num_blocks=4, block_size=2, prefix_caching=True))
    cache = PagedKVCache(pool, 2, 8)
    cache.reserve([0], [0], [[1, 2, 3]])
    cache.commit(0, 2)
    assert cache.attach_prefix(1, [1, 2, 3], 2) == 2  # the row will write from position 2: a block of its own
    cache.reserve([1], [2], [[3]])
    assert cache.block_table(1)[0] == cache.block_table(0)[0] and cache.block_table(1)[1] != cache.block_table(0)[1]
    with pytest.raises(RuntimeError, match="committed blocks"):
        cache.reserve([0], [1], [[9]])


def test_a_row_that_starts_over_keys_its_new_tokens():
    pool = BlockPool(PoolSpec(num_blocks=8, block_size=2, prefix_caching=True))
    cache = PagedKVCache(pool, 2, 8)
    cache.reserve([0], [0], [[1, 2, 3]])
    cache.commit(0, 2)
    cache.reserve([0], [0], [[4, 5, 6]])  # another request in the same row (a draft row reused)
    cache.commit(0, 2)
    assert cache.attach_prefix(1, [4, 5, 6], 2) == 2


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["write", "rollback", "leave", "move", "share"]), st.integers(0, 3),
                          st.integers(1, 7)), max_size=40))
def test_every_row_reads_back_exactly_its_own_tokens(ops):
    """Random writes, rollbacks, departures, moves and prefix shares over one pool: a row's slot
    table always reads its own tokens, in order (the keys written here are the token ids)."""
    pool = BlockPool(PoolSpec(num_blocks=64, block_size=2, prefix_caching=True))
    storage = KVStorage(pool.spec)
    storage.allocate(1, 1, 1, torch.float32, torch.device("cpu"))
    caches = [PagedKVCache(pool, 4, 32), PagedKVCache(pool, 4, 32)]
    expected = [[[] for _ in range(4)] for _ in caches]
    next_token = iter(range(1, 10_000))
    for i, (op, row, amount) in enumerate(ops):
        which = i % 2
        cache, rows = caches[which], expected[which]
        if op == "write" and len(rows[row]) + amount <= 32:
            start = len(rows[row])
            feed = [next(next_token) for _ in range(amount)]
            cache.reserve([row], [start], [feed])
            slots = cache.addresses([row], [start], [amount], amount, start + amount, "cpu").write_slots
            storage.keys[0][slots[0], 0, 0] = torch.tensor(feed, dtype=torch.float32)
            rows[row] += feed
            cache.commit(row, len(rows[row]))
        elif op == "rollback" and rows[row]:
            # Only past what is verified: a rollback drops drafts, and here every token counts as verified
            # once written, so roll back by writing again from a shorter length.
            keep = max(len(rows[row]) - amount, len(rows[row]) // pool.block_size * pool.block_size)
            feed = [next(next_token) for _ in range(len(rows[row]) - keep)]
            if feed:
                cache.reserve([row], [keep], [feed])
                slots = cache.addresses([row], [keep], [len(feed)], len(feed), len(rows[row]), "cpu").write_slots
                storage.keys[0][slots[0], 0, 0] = torch.tensor(feed, dtype=torch.float32)
                rows[row][keep:] = feed
        elif op == "leave":
            cache.release_rows([row])
            rows[row] = []
        elif op == "move":
            dst = (row + amount) % 4
            cache.move_row(row, dst)
            rows[dst], rows[row] = rows[row], []
        elif op == "share" and not rows[(row + 1) % 4]:
            source = rows[row]
            matched = cache.attach_prefix((row + 1) % 4, source, len(source))
            assert matched == len(source) // pool.block_size * pool.block_size
            rows[(row + 1) % 4] = source[:matched]
        for cache_rows, each in zip(expected, caches):
            for r, tokens in enumerate(cache_rows):
                if tokens:
                    table = each.addresses([r], [0], [1], 1, len(tokens), "cpu").slot_table[0]
                    assert storage.keys[0][table, 0, 0].tolist() == tokens
    caches[0].reset()
    caches[1].reset()
    assert pool.num_free == pool.num_blocks


def _outputs(engine, prompts, max_tokens=16):
    outs = engine.generate(prompts, {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
    return [out.new_token_ids for out in outs]


@pytest.mark.parametrize("mode", ["sd", "psd"])
def test_a_shared_prefix_is_read_from_the_cache_and_the_output_is_the_targets(tiny_pair, target_model, mode):
    model, tokenizer = target_model
    history = PROMPTS[17]  # 60-odd tokens of repeated code: a conversation's earlier turns
    prompts = [history, history + "def sub(a, b):", history + "class"]
    engine = make_engine(*tiny_pair, mode=mode, block_size=4)
    try:
        first = _outputs(engine, prompts[:1])
        queries, hits = engine.target.pool.prefix_queries, engine.target.pool.prefix_hits
        later = _outputs(engine, prompts[1:])
        assert engine.target.pool.prefix_hits - hits >= 2 * 56  # both reread the history's full blocks
        assert engine.target.pool.prefix_queries > queries
    finally:
        engine.close()
    for prompt, got in zip(prompts, first + later):
        assert got == reference_greedy(model, tokenizer, prompt, 16, ignore_eos=True)[1]


def test_a_pool_too_small_for_everyone_preempts_and_loses_nothing(tiny_pair, target_model):
    model, tokenizer = target_model
    prompts = [PROMPTS[17], PROMPTS[10] * 2, PROMPTS[9] * 3, PROMPTS[16] * 9, PROMPTS[0] * 5, PROMPTS[3] * 6]
    # 512 bytes a token for the target (2 layers, 2 KV heads of 16, float32), 128 for the draft: 40
    # blocks of 4 tokens, where the six requests need 130 at once.
    engine = make_engine(*tiny_pair, mode="sd", block_size=4, max_model_len=128, max_num_seqs=6,
                         kv_cache_memory_bytes=40 * 4 * 640)
    try:
        assert engine.target.pool.num_blocks == 40
        outs = engine.generate(prompts, {"max_tokens": 40, "temperature": 0, "ignore_eos": True})
        assert engine.num_preemptions > 0
    finally:
        engine.close()
    assert [out.finished for out in outs] == [True] * len(prompts)
    for prompt, out in zip(prompts, outs):
        assert out.new_token_ids == reference_greedy(model, tokenizer, prompt, 40, ignore_eos=True)[1]
        assert out.num_output_tokens == 40


def test_a_pool_smaller_than_one_request_is_refused(tiny_pair):
    # 31 tokens at 640 bytes a token (target and draft): less than max_model_len
    with pytest.raises(ConfigError, match="kv_cache_memory_bytes"):
        make_engine(*tiny_pair, mode="sd", max_model_len=128, kv_cache_memory_bytes=20_000)


@pytest.mark.parametrize("enforce_eager", [True, False])
def test_long_prompts_fill_in_chunks_and_stay_lossless(tiny_pair, target_model, monkeypatch, enforce_eager):
    from minedraft.model import runner
    monkeypatch.setattr(runner, "PREFILL_CHUNK_TOKENS", 8)
    model, tokenizer = target_model
    prompts = [PROMPTS[17], PROMPTS[4], PROMPTS[10] * 2]  # 84, 1 and 30-odd tokens
    engine = make_engine(*tiny_pair, mode="psd", drafter="inline", enforce_eager=enforce_eager)
    try:
        got = _outputs(engine, prompts)
    finally:
        engine.close()
    for prompt, tokens in zip(prompts, got):
        assert tokens == reference_greedy(model, tokenizer, prompt, 16, ignore_eos=True)[1]


def test_the_default_pool_holds_one_request_at_the_whole_context():
    from minedraft import EngineConfig
    from minedraft.engine.builder import pool_specs
    config = EngineConfig(mode="ar", max_num_seqs=1, max_model_len=8192, num_draft_tokens=0)
    target, draft = pool_specs(config, 8192 + 2)
    assert target.num_blocks * target.block_size >= 8194 and draft.num_blocks >= target.num_blocks
