"""cProfile one in-process engine run on the demo pair: where does a step's time go?

    python scripts/profile_engine.py MODE CONCURRENCY NUM_DRAFT_TOKENS     e.g. psd 16 4
"""
import cProfile
import pstats
import sys

from minedraft import Engine, EngineConfig
from minedraft.tools.bench_engine import load_prompts, measure
from minedraft.config import DEFAULT_MODEL_DIR


def main() -> None:
    mode, concurrency, k = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    prompts = load_prompts(DEFAULT_MODEL_DIR / "prompts.jsonl")
    engine = Engine(EngineConfig(mode=mode, max_num_seqs=concurrency, num_draft_tokens=max(k, 1)))
    measure(engine, prompts, 2, k, 8, 2)  # warm-up
    profiler = cProfile.Profile()
    profiler.enable()
    print(measure(engine, prompts, concurrency, k, 48, max(2 * concurrency, 8)))
    profiler.disable()
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
    engine.close()


if __name__ == "__main__":
    main()
