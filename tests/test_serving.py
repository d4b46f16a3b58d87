"""The serving loop without Triton: every request gets exactly one final response and nothing
after it, whatever fails: a send, a cancellation check, a metrics hook, an engine step, shutdown."""
import random
import threading
import time

import pytest
from engine_helpers import PROMPTS, make_engine
from minedraft.sampling_params import SamplingParams
from minedraft.serving.loop import (
    CANCELLED,
    INTERNAL,
    INVALID,
    UNAVAILABLE,
    ServingLoop,
)


class FakeResponder:
    """Records what a client would receive; can be told to fail."""

    def __init__(self, fail_send_at=None, fail_is_cancelled=False):
        self.responses: list[tuple[str, bool]] = []
        self.errors: list[str] = []
        self.after_final = 0
        self.cancelled = False
        self.fail_send_at = fail_send_at
        self.fail_is_cancelled = fail_is_cancelled
        self.done = threading.Event()

    @property
    def finals(self) -> int:
        return sum(final for _, final in self.responses) + len(self.errors)

    def _record_after_final(self):
        if self.finals:
            self.after_final += 1

    def send(self, output, final):
        self._record_after_final()
        if self.fail_send_at is not None and len(self.responses) == self.fail_send_at:
            raise RuntimeError("send failed")
        self.responses.append((output.text_delta, final))
        if final:
            self.done.set()

    def send_error(self, message, kind):
        self._record_after_final()
        self.errors.append(kind)
        self.done.set()

    def is_cancelled(self):
        if self.fail_is_cancelled:
            raise RuntimeError("is_cancelled failed")
        return self.cancelled


class FailingObserver:
    def __getattr__(self, name):
        def hook(*args):
            raise RuntimeError(f"{name} failed")
        return hook


def params(**kw):
    return SamplingParams.from_dict({"max_tokens": 12, "temperature": 0, **kw})


def wait_all(responders, timeout=60):
    deadline = time.monotonic() + timeout
    for r in responders:
        assert r.done.wait(max(0.0, deadline - time.monotonic())), "a request never got its final response"


@pytest.fixture
def engine(tiny_pair):
    engine = make_engine(*tiny_pair, mode="psd", drafter="inline", max_num_seqs=4)
    yield engine
    engine.close()


def test_requests_complete_with_one_final_each(engine):
    loop = ServingLoop(engine)
    responders = [FakeResponder() for _ in range(12)]
    for r, prompt in zip(responders, PROMPTS):
        loop.admit(r, prompt, params())
    wait_all(responders)
    loop.close()
    assert all(r.finals == 1 and r.after_final == 0 and not r.errors for r in responders)
    assert loop.num_in_flight == 0


def test_a_failing_send_ends_only_its_request_and_the_sender_lives_on(engine):
    loop = ServingLoop(engine)
    broken = FakeResponder(fail_send_at=2)
    others = [FakeResponder() for _ in range(5)]
    loop.admit(broken, PROMPTS[0], params(max_tokens=20, ignore_eos=True))
    for r, prompt in zip(others, PROMPTS[1:]):
        loop.admit(r, prompt, params())
    wait_all([broken] + others)
    later = FakeResponder()
    loop.admit(later, PROMPTS[7], params())  # served after the failure: the sender thread is alive
    wait_all([later])
    loop.close()
    assert broken.errors == [INTERNAL] and broken.finals == 1 and broken.after_final == 0
    assert all(r.finals == 1 and not r.errors for r in others + [later])


def test_failing_cancellation_checks_and_metrics_do_not_stop_serving(engine):
    loop = ServingLoop(engine, FailingObserver())
    odd = FakeResponder(fail_is_cancelled=True)
    fine = [FakeResponder() for _ in range(4)]
    loop.admit(odd, PROMPTS[0], params(max_tokens=200, ignore_eos=True))
    for r, prompt in zip(fine, PROMPTS[1:]):
        loop.admit(r, prompt, params())
    wait_all([odd] + fine)
    loop.close()
    assert odd.errors == [CANCELLED]  # a request whose state cannot be read is ended, once
    assert all(r.finals == 1 and not r.errors for r in fine)


def test_an_engine_step_failure_ends_the_requests_in_flight_and_serving_goes_on(engine):
    loop = ServingLoop(engine)
    step = engine._step
    calls = {"n": 0}

    def failing_once():
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected: out of memory")
        return step()
    engine._step = failing_once
    hit = [FakeResponder() for _ in range(4)]
    for r, prompt in zip(hit, PROMPTS):
        loop.admit(r, prompt, params(max_tokens=30, ignore_eos=True))
    wait_all(hit)
    after = FakeResponder()
    loop.admit(after, PROMPTS[5], params())
    wait_all([after])
    loop.close()
    assert hit[0].errors == [INTERNAL]  # in flight when the step failed
    assert all(r.finals == 1 and r.after_final == 0 for r in hit)
    assert after.finals == 1 and not after.errors


def test_invalid_requests_get_one_error(engine):
    loop = ServingLoop(engine)
    bad = FakeResponder()
    loop.admit(bad, "x" * 10_000_000, params())
    loop.close()
    assert bad.errors == [INVALID] and bad.finals == 1


def test_cancellations_and_shutdown_mid_flight_still_give_exactly_one_final(engine):
    """Random cancellations among the running requests, then close() while some still run and
    the rest wait to be admitted (8 rows, 24 requests of ~250 tokens)."""
    loop = ServingLoop(engine)
    rng = random.Random(0)
    responders = [FakeResponder() for _ in range(24)]
    admitting = threading.Thread(target=lambda: [
        loop.admit(r, rng.choice(PROMPTS), params(max_tokens=250, ignore_eos=True)) for r in responders])
    admitting.start()
    time.sleep(0.05)
    cancelled = rng.sample(responders[:8], 4)
    for r in cancelled:
        r.cancelled = True
        time.sleep(0.01)
    wait_all(cancelled)  # ended by their cancellation, while the rest still run or wait
    loop.close()
    admitting.join()
    wait_all(responders, timeout=5)
    assert all(r.finals == 1 and r.after_final == 0 for r in responders)
    kinds = {kind for r in responders for kind in r.errors}
    assert kinds <= {CANCELLED, UNAVAILABLE}
    assert CANCELLED in kinds and UNAVAILABLE in kinds
