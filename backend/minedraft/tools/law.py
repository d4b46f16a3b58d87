"""Checks of losslessness shared by the tests and `scripts/gpu_check.sh`: the target's greedy
output from HF alone, the exact joint law of its first two sampled tokens, and a chi-square
comparison of sampled counts with that law (in torch, so a bare GPU machine needs no scipy)."""
import torch

from minedraft.model import sampler


def reference_greedy(model, tokenizer, prompt, max_tokens, ignore_eos=False):
    """HF's greedy decoding of the target alone; with `ignore_eos`, EOS is emitted and decoding
    goes on (the engine's ignore_eos), which generate() does not offer."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(model.device)
    if not ignore_eos:
        out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False)
        return ids[0].tolist(), out[0, ids.size(1):].tolist()
    tokens = ids[0].tolist()
    with torch.no_grad():
        for _ in range(max_tokens):
            tokens.append(int(model(torch.tensor([tokens], device=model.device)).logits[0, -1].argmax()))
    return ids[0].tolist(), tokens[ids.size(1):]


def exact_two_token_law(model, tokenizer, prompt, params) -> dict[tuple[int, int], float]:
    """P(first two tokens) under the sampling parameters (temperature, top_k, top_p), exactly."""
    ids = tokenizer(prompt).input_ids

    def processed(logits):
        b = logits.size(0)
        rows = sampler.RowSampling(torch.full((b,), params["temperature"]), torch.full((b,), params["top_k"]),
                                   torch.full((b,), params["top_p"]), torch.zeros(b, 1, dtype=torch.bool), ())
        return sampler.processed_probs(logits[:, None].float().cpu(), rows)[:, 0]

    with torch.no_grad():
        first = processed(model(torch.tensor([ids], device=model.device)).logits[:, -1])[0]
        support = first.nonzero().flatten().tolist()
        contexts = torch.tensor([ids + [t] for t in support], device=model.device)
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


def chi_square_pvalue(observed, expected) -> float:
    """Pearson's test with len - 1 degrees of freedom (scipy.stats.chisquare's p-value):
    the chi-square survival function is the regularised upper incomplete gamma function."""
    o = torch.tensor(observed, dtype=torch.float64)
    e = torch.tensor(expected, dtype=torch.float64)
    statistic = ((o - e) ** 2 / e).sum()
    return float(torch.special.gammaincc(torch.tensor((len(observed) - 1) / 2, dtype=torch.float64), statistic / 2))


def two_token_pvalue(pairs: dict, model, tokenizer, prompt, params) -> float:
    """p-value of sampled first-two-token counts against the target's exact law."""
    total = sum(pairs.values())
    return chi_square_pvalue(*binned(pairs, exact_two_token_law(model, tokenizer, prompt, params), total))
