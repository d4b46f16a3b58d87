"""Helpers shared by the engine tests: the prompts, an engine factory, staggered submission;
the HF references and the two-token law live in minedraft.tools.law (gpu_check uses them too)."""
from minedraft import Engine, EngineConfig
from minedraft.tools.law import reference_greedy, two_token_pvalue  # noqa: F401 (re-exported for the tests)

PROMPTS = [
    "def add(a, b):", "class Point:\n", "for i in", "import os", "x", "print(i * i)  # squares", "def",
    "sys.exit(main())\n", "if __name__ == '__main__':\n    ", "    def __init__(self, x, y):\n",
    "return a + b\n" * 3, "self.x = x\nself.y = y\n", "数字 ✓ ünïcødé", "import sys\n\n", "for", "class",
    "print(", "def add(a, b):\n    return a + b\n" * 4, "i * i", "(10):", "main())", "  ", "\n\n", "os.path",
    "self", "ünï", "Point(1, 2)", "range(10)", "squares = [", "if x:", "while True:\n", "a = b = c",
]


def make_engine(target, draft, mode="psd", drafter="auto", **kwargs):
    kwargs.setdefault("max_num_seqs", 6)
    kwargs.setdefault("max_model_len", 256)
    kwargs.setdefault("num_draft_tokens", 3)
    return Engine(EngineConfig(target_model=target, draft_model=draft, mode=mode, drafter=drafter, **kwargs))


def run_staggered(engine, prompts, params):
    """Submit a third of the prompts at a time, a few steps apart, so requests join mid-flight."""
    results, pending = {}, list(enumerate(prompts))
    step = 0
    while pending or engine.has_work():
        if pending and step % 3 == 0:
            for i, prompt in pending[:len(prompts) // 3 + 1]:
                engine.submit(str(i), prompt, params)
            pending = pending[len(prompts) // 3 + 1:]
        for out in engine.step():
            tokens, text = results.get(out.request_id, ([], ""))
            results[out.request_id] = (tokens + out.new_token_ids, text + out.text_delta)
            if out.finished:
                results[out.request_id + "/final"] = out
        step += 1
    return results
