"""Steps through static buffers per bucket of rows and tokens (model/cuda_graphs.py), the CUDA
graph path run without a GPU: bucket choice, buffers that keep their addresses, and the eager
path's logits for every size of step."""
import torch
from minedraft.model.cuda_graphs import StepGraphs, row_buckets, smallest_holding
from minedraft.model.loading import load_model
from minedraft.model.runner import ModelRunner


def test_row_buckets_are_nano_vllms_up_to_the_batch():
    assert row_buckets(1) == [1]
    assert row_buckets(3) == [1, 2, 3]
    assert row_buckets(8) == [1, 2, 4, 8]
    assert row_buckets(40) == [1, 2, 4, 8, 16, 32, 40]
    assert row_buckets(48) == [1, 2, 4, 8, 16, 32, 48]
    assert smallest_holding(5, row_buckets(40)) == 8
    assert smallest_holding(33, row_buckets(40)) == 40
    assert smallest_holding(41, row_buckets(40)) is None


def test_steps_through_buckets_give_the_eager_logits_and_keep_their_buffers(tiny_pair):
    eager = ModelRunner(load_model(tiny_pair[0], "cpu", "float32"), 3, 64)
    bucketed = ModelRunner(load_model(tiny_pair[0], "cpu", "float32"), 3, 64, enforce_eager=False, step_buckets=True)
    assert isinstance(bucketed.graphs, StepGraphs) and not bucketed.graphs.capture
    caches = {eager: eager.new_cache(), bucketed: bucketed.new_cache()}
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17]]
    # Steps of every kind: AR at 3 rows, a verification of ragged lengths, one row, a rollback.
    steps = [(3, [[20], [21], [22]], [0, 0, 0]), (3, [[23, 24, 25], [26], [27, 28]], [0, 0, 0]),
             (1, [[29, 30, 31, 32, 33]], [0]), (2, [[34], [35, 36]], [2, 0])]
    logits = {runner: [] for runner in caches}
    for runner, cache in caches.items():
        runner.fill(cache, [0, 1, 2], [0, 0, 0], prompts)
        lengths = [len(p) for p in prompts]
        for num_rows, feeds, rollbacks in steps:
            starts = [lengths[r] - rollbacks[r] for r in range(num_rows)]
            out = runner.forward(cache, slice(0, num_rows), starts, feeds)
            logits[runner].append([out[r, :len(f)] for r, f in enumerate(feeds)])
            for r, f in enumerate(feeds):
                lengths[r] = starts[r] + len(f)
    for step_eager, step_bucketed in zip(logits[eager], logits[bucketed]):
        for row_eager, row_bucketed in zip(step_eager, step_bucketed):
            torch.testing.assert_close(row_bucketed, row_eager, atol=1e-4, rtol=1e-4)

    cache = caches[bucketed]
    bucket = bucketed.graphs.bucket(2, 3)
    assert bucket.input_ids.shape == (2, 4)  # 2 rows; 3 tokens go in the bucket of 4
    addresses = (bucket.input_ids.data_ptr(), bucket.positions.data_ptr(), bucket.write_slots.data_ptr())
    bucketed.forward(cache, slice(0, 2), [8, 4], [[1, 2, 3], [4]])
    assert bucket.input_ids.tolist() == [[1, 2, 3, 0], [4, 0, 0, 0]]  # the step went through the bucket
    block_size = bucketed.pool.block_size
    first, second = cache.block_table(0)[0] * block_size, cache.block_table(1)[0] * block_size
    # Padding writes the scratch slot, in the null block.
    assert bucket.write_slots.tolist() == [[first + 8, first + 9, first + 10, 0], [second + 4, 0, 0, 0]]
    assert bucket.slot_table[1, :block_size].tolist() == list(range(second, second + block_size))
    bucketed.forward(cache, slice(0, 2), [11, 5], [[5, 6], [7]])
    assert bucketed.graphs.bucket(2, 3) is bucket
    assert (bucket.input_ids.data_ptr(), bucket.positions.data_ptr(), bucket.write_slots.data_ptr()) == addresses
    assert bucketed.graphs.bucket(2, 9) is None  # a prefill's width runs uncaptured
