"""Helpers shared by the engine tests: the prompts, an engine factory, HF references, the
exact two-token law of sampled output and its chi-square binning."""
import torch

from minedraft import Engine, EngineConfig

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


def reference_greedy(model, tokenizer, prompt, max_tokens, ignore_eos=False):
    """HF's greedy decoding of the target alone; with `ignore_eos`, EOS is emitted and decoding
    goes on (the engine's ignore_eos), which generate() does not offer."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    if not ignore_eos:
        out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False)
        return ids[0].tolist(), out[0, ids.size(1):].tolist()
    tokens = ids[0].tolist()
    with torch.no_grad():
        for _ in range(max_tokens):
            tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
    return ids[0].tolist(), tokens[ids.size(1):]


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


def exact_two_token_law(model, tokenizer, prompt, params):
    from minedraft import sampler
    ids = tokenizer(prompt).input_ids

    def processed(logits):
        b = logits.size(0)
        rows = sampler.RowSampling(torch.full((b,), params["temperature"]), torch.full((b,), params["top_k"]),
                                   torch.full((b,), params["top_p"]), torch.zeros(b, 1, dtype=torch.bool), ())
        return sampler.processed_probs(logits[:, None].float(), rows)[:, 0]

    with torch.no_grad():
        first = processed(model(torch.tensor([ids])).logits[:, -1])[0]
        support = first.nonzero().flatten().tolist()
        contexts = torch.tensor([ids + [t] for t in support])
        second = processed(model(contexts).logits[:, -1])
    return {(t1, t2): float(first[t1] * second[i, t2])
            for i, t1 in enumerate(support) for t2 in second[i].nonzero().flatten().tolist()}


def binned(counts, law, total):
    """Cells with expected count >= 5 stand alone; the rest share one cell."""
    big = [pair for pair, p in law.items() if p * total >= 5]
    observed = [counts.get(pair, 0) for pair in big]
    expected = [law[pair] * total for pair in big]
    observed.append(total - sum(observed))
    expected.append(total - sum(expected))
    return observed, expected
