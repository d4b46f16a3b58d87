"""The acceptance rule and logits processing as pure functions (gpt-fast's habit)."""
import pytest
import torch
from minedraft.model import sampler
from scipy.stats import chisquare


def settings(b, temperature=1.0, top_k=0, top_p=1.0, n=1, eos_blocked=None, eos=None):
    return sampler.RowSampling(torch.full((b,), float(temperature)), torch.full((b,), top_k),
                               torch.full((b,), float(top_p)),
                               eos_blocked if eos_blocked is not None else torch.zeros(b, n, dtype=torch.bool),
                               () if eos is None else (eos,))


def expected_counts(probs, total):
    expected = probs.double().numpy() * total
    return expected * total / expected.sum()  # float32 rounding must not trip chisquare's sum check


def test_rejection_sampling_preserves_target_distribution():
    """>= 50k draws of one speculative token plus its correction follow p exactly (chi-square)."""
    torch.manual_seed(0)
    vocab, draws = 12, 60_000
    p = torch.softmax(torch.randn(vocab) * 1.5, -1)
    q = torch.softmax(torch.randn(vocab) * 1.5, -1)
    draft_ids = sampler.sample(q.expand(draws, vocab), torch.rand(draws))[:, None]
    target_probs = p.expand(draws, 2, vocab)
    draft_probs = q.expand(draws, 1, vocab)
    accepted, next_token = sampler.verify(target_probs, draft_ids, draft_probs, torch.ones(draws, dtype=torch.long),
                                          torch.rand(draws, 1), torch.rand(draws))
    first = torch.where(accepted == 1, draft_ids[:, 0], next_token)
    counts = torch.bincount(first, minlength=vocab).numpy()
    result = chisquare(counts, expected_counts(p, counts.sum()))
    assert result.pvalue > 0.01, result
    # The expected acceptance rate is sum(min(p, q)).
    assert abs(accepted.float().mean() - torch.minimum(p, q).sum()) < 0.01


def test_rejection_sampling_over_several_positions():
    """Three drafted positions with position-dependent p and q: the first two emitted tokens follow p."""
    torch.manual_seed(1)
    vocab, draws, k = 6, 50_000, 3
    p = torch.softmax(torch.randn(k + 1, vocab) * 2, -1)
    q = torch.softmax(torch.randn(k, vocab) * 2, -1)
    draft_ids = torch.stack([sampler.sample(q[i].expand(draws, vocab), torch.rand(draws)) for i in range(k)], 1)
    accepted, next_token = sampler.verify(p.expand(draws, -1, -1), draft_ids, q.expand(draws, -1, -1),
                                          torch.full((draws,), k), torch.rand(draws, k), torch.rand(draws))
    # Context-free p makes each emitted position independent: position 1 must follow p[1]
    # among rows that accepted the first draft.
    emitted_second = torch.where(accepted >= 2, draft_ids[:, 1], next_token)[accepted >= 1]
    counts = torch.bincount(emitted_second, minlength=vocab).numpy()
    assert chisquare(counts, expected_counts(p[1], counts.sum())).pvalue > 0.01


def test_greedy_rows_accept_exact_matches_only():
    target_logits = torch.tensor([[[0.0, 5.0, 1.0], [3.0, 0.0, 1.0], [0.0, 0.0, 9.0]]])
    probs = sampler.processed_probs(target_logits, settings(1, temperature=0, n=3))
    draft_ids = torch.tensor([[1, 2]])  # first matches argmax (1), second does not (argmax 0)
    draft_probs = torch.nn.functional.one_hot(draft_ids, 3).float()
    accepted, next_token = sampler.verify(probs, draft_ids, draft_probs, torch.tensor([2]),
                                          torch.rand(1, 2), torch.rand(1))
    assert accepted.item() == 1 and next_token.item() == 0


def test_ragged_draft_lengths_stop_at_each_rows_own_length():
    logits = torch.zeros(2, 3, 4)
    logits[:, :, 2] = 10
    probs = sampler.processed_probs(logits, settings(2, temperature=0, n=3))
    draft_ids = torch.full((2, 2), 2)
    draft_probs = torch.nn.functional.one_hot(draft_ids, 4).float()
    accepted, _ = sampler.verify(probs, draft_ids, draft_probs, torch.tensor([2, 1]), torch.rand(2, 2), torch.rand(2))
    assert accepted.tolist() == [2, 1]


def test_top_k_and_top_p_filtering():
    logits = torch.log(torch.tensor([[[0.5, 0.3, 0.15, 0.05]]]))
    top_k = sampler.processed_probs(logits, settings(1, top_k=2))[0, 0]
    assert torch.allclose(top_k, torch.tensor([0.625, 0.375, 0, 0]))
    top_p = sampler.processed_probs(logits, settings(1, top_p=0.7))[0, 0]
    assert torch.allclose(top_p, torch.tensor([0.625, 0.375, 0, 0]))
    tiny_p = sampler.processed_probs(logits, settings(1, top_p=0.01))[0, 0]
    assert tiny_p.tolist() == [1.0, 0.0, 0.0, 0.0]


def test_top_p_one_keeps_the_tail_even_where_the_cumulative_mass_rounds_to_one():
    # One dominant token: in float32 its probability is 1.0 and the cumulative mass before every
    # tail token reaches 1.0, yet each tail token has mass e^-30 > 0, which top_p = 1 must keep.
    logits = torch.zeros(1, 1, 1000)
    logits[0, 0, 0] = 30.0
    probs = sampler._filtered_softmax(logits, torch.tensor([0]), torch.tensor([1.0]))
    assert bool((probs[0, 0, 1:] > 0).all())
    assert torch.allclose(probs, logits.softmax(-1), rtol=1e-6, atol=0)
    cut = sampler._filtered_softmax(logits, torch.tensor([0]), torch.tensor([0.9]))
    assert int((cut > 0).sum()) == 1  # below 1, the same logits keep only the dominant token


def test_eos_is_masked_while_blocked():
    logits = torch.tensor([[[9.0, 1.0, 0.0], [9.0, 1.0, 0.0]]])
    blocked = torch.tensor([[True, False]])
    probs = sampler.processed_probs(logits, settings(1, temperature=0, n=2, eos_blocked=blocked, eos=0))
    assert probs[0, 0].argmax() == 1 and probs[0, 1].argmax() == 0


def test_the_torch_chi_square_agrees_with_scipy():
    """gpu_check's p-value (no scipy on a bare GPU machine) is scipy's."""
    from minedraft.tools.law import chi_square_pvalue
    observed, expected = [18, 25, 31, 26], [25.0, 25.0, 25.0, 25.0]
    assert chi_square_pvalue(observed, expected) == pytest.approx(chisquare(observed, expected).pvalue, rel=1e-9)


def test_greedy_verification_on_ids_equals_the_general_rule():
    """verify_greedy (ids only) gives verify()'s answer for greedy rows, EOS masking included."""
    torch.manual_seed(4)
    b, k, vocab = 64, 4, 7
    logits = torch.randn(b, k + 1, vocab)
    blocked = torch.arange(k + 1) < torch.randint(0, 3, (b, 1))
    sampling = settings(b, temperature=0, n=k + 1, eos_blocked=blocked, eos=2)
    target_ids = logits.argmax(-1)
    # Drafts that agree with the target for a random stretch, then guess.
    agree = torch.rand(b, k) < 0.7
    draft_ids = torch.where(agree, target_ids[:, :k], torch.randint(0, vocab, (b, k)))
    num_drafts = torch.randint(0, k + 1, (b,))
    draft_probs = torch.zeros(b, k, vocab).scatter_(-1, draft_ids[..., None], 1.0)
    expected = sampler.verify(sampler.processed_probs(logits, sampling), draft_ids, draft_probs, num_drafts,
                              torch.rand(b, k), torch.rand(b))
    got = sampler.verify_greedy(sampler.greedy_tokens(logits, sampling), draft_ids, num_drafts)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert 0 < int(got[0].sum()) < int(num_drafts.sum())  # some accepted, some rejected
