"""Prometheus metrics through Triton's pb_utils.MetricFamily (served on :8002/metrics), and a reader."""
import os
import re
import urllib.request

from minedraft.model.tensor_parallel import TensorParallelRunner
from minedraft.policy.cost_model import STEP_MODES
from minedraft.serving.launcher import RESTARTS_ENV

LATENCY_BUCKETS = [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0]


class EngineMetrics:
    def __init__(self, pb_utils, model_name: str, max_draft_tokens: int):
        labels = {"model": model_name}
        M = pb_utils.MetricFamily
        self._families = []  # a family must outlive its metrics, or Triton rejects their updates

        def family(name, description, kind, **kwargs):
            self._families.append(M(name=name, description=description, kind=kind))
            return self._families[-1].Metric(labels=labels, **kwargs)

        def per_mode(name, description, kind):
            self._families.append(M(name=name, description=description, kind=kind))
            return {mode: self._families[-1].Metric(labels={**labels, "mode": mode}) for mode in STEP_MODES}

        def histogram(name, description):
            return family(name, description, M.HISTOGRAM, buckets=LATENCY_BUCKETS)

        self.prompt_tokens = family("minedraft_prompt_tokens_total", "Prompt tokens of finished requests", M.COUNTER)
        self.generation_tokens = family("minedraft_generation_tokens_total", "Generated tokens, counted each step",
                                        M.COUNTER)
        self.draft_tokens = family("minedraft_draft_tokens_total", "Draft tokens proposed for verification", M.COUNTER)
        self.accepted_tokens = family("minedraft_accepted_tokens_total", "Draft tokens the target accepted",
                                      M.COUNTER)
        self.requests_finished = family("minedraft_requests_finished_total", "Requests that completed", M.COUNTER)
        self.requests_aborted = family("minedraft_requests_aborted_total", "Requests ended by an error", M.COUNTER)
        self.requests_cancelled = family("minedraft_requests_cancelled_total", "Requests cancelled", M.COUNTER)
        self.drafter_failures = family("minedraft_drafter_failures_total", "Drafter failures (restarted)", M.COUNTER)
        self.steps = family("minedraft_steps_total", "Engine steps run", M.COUNTER)
        # Speculation with vLLM's meanings (its vllm:spec_decode_* counters), counted per verification.
        self.spec_drafts = family("minedraft_spec_decode_num_drafts_total",
                                  "Draft proposals verified (one per request per verification)", M.COUNTER)
        self.spec_draft_tokens = family("minedraft_spec_decode_num_draft_tokens_total", "Draft tokens verified",
                                        M.COUNTER)
        self.spec_accepted_tokens = family("minedraft_spec_decode_num_accepted_tokens_total",
                                           "Draft tokens accepted", M.COUNTER)
        self._families.append(M(name="minedraft_spec_decode_num_accepted_tokens_per_pos_total",
                                description="Drafts whose tokens up to this position were all accepted",
                                kind=M.COUNTER))
        self.spec_accepted_per_position = [self._families[-1].Metric(labels={**labels, "position": str(i)})
                                           for i in range(max_draft_tokens)]
        self._spec_seen = [0, 0, 0, [0] * max_draft_tokens]
        self.step_errors = family("minedraft_step_errors_total",
                                  "Engine steps that failed (their requests ended with an error)", M.COUNTER)
        self.server_restarts = family("minedraft_server_restarts",
                                      "Times `minedraft serve` restarted a crashed tritonserver", M.GAUGE)
        self.server_restarts.set(int(os.environ.get(RESTARTS_ENV, "0") or 0))
        self.in_flight = family("minedraft_requests_in_flight", "Requests inside the backend", M.GAUGE)
        self.batch_a = family("minedraft_batch_size_a", "Requests in internal batch A", M.GAUGE)
        self.batch_b = family("minedraft_batch_size_b", "Requests in internal batch B", M.GAUGE)
        self.max_verify_batch = family("minedraft_max_verify_batch_size", "Largest verified batch so far", M.GAUGE)
        # What each step did: fixed for ar/sd/psd, chosen step by step under flex and auto.
        self.policy_steps = per_mode("minedraft_policy_steps_total", "Engine steps run as AR, SD or PSD", M.COUNTER)
        self.policy_mode = per_mode("minedraft_policy_mode", "1 for the mode of the last step, else 0", M.GAUGE)
        self.draft_length = family("minedraft_draft_length", "Draft length cap k of the last step", M.GAUGE)
        # Load and health, for autoscalers and alerts (gauges: each is the value now).
        self.requests_running = family("minedraft_requests_running", "Requests in the engine's batches", M.GAUGE)
        self.requests_waiting = family("minedraft_requests_waiting",
                                       "Requests admitted to the engine and waiting for a batch row", M.GAUGE)
        self.kv_rows_in_use = family("minedraft_kv_rows_in_use", "Target KV cache rows holding a request", M.GAUGE)
        self.kv_rows_total = family("minedraft_kv_rows_total", "Target KV cache rows, all batches", M.GAUGE)
        # The target's KV pool, under vLLM's names.
        self.kv_usage = family("minedraft_kv_cache_usage_perc",
                               "Fraction of the target's KV blocks in use by requests (1 = full)", M.GAUGE)
        self.kv_blocks_total = family("minedraft_kv_cache_blocks_total", "Blocks in the target's KV pool", M.GAUGE)
        self.prefix_queries = family("minedraft_prefix_cache_queries_total",
                                     "Prompt tokens looked up in the prefix cache", M.COUNTER)
        self.prefix_hits = family("minedraft_prefix_cache_hits_total",
                                  "Prompt tokens found in the prefix cache (their prefill skipped)", M.COUNTER)
        self.preemptions = family("minedraft_num_preemptions_total",
                                  "Requests preempted for KV blocks (recomputed when admitted again)", M.COUNTER)
        self._pool_seen = {"queries": 0, "hits": 0, "preemptions": 0}
        self.drafter_alive = family("minedraft_drafter_alive",
                                    "1 while a drafter is loaded and its worker process (if any) runs", M.GAUGE)
        self.tp_workers_alive = family("minedraft_tensor_parallel_workers_alive",
                                       "Tensor-parallel worker ranks running (tensor_parallel_size - 1 when healthy)",
                                       M.GAUGE)
        self.tp_failures = family("minedraft_tensor_parallel_failures_total",
                                  "Tensor-parallel rank failures (their requests failed; the ranks restarted)",
                                  M.COUNTER)
        self._tp_failures_seen = 0
        self.ttft = histogram("minedraft_time_to_first_token_seconds", "Time to first token")
        self.tpot = histogram("minedraft_time_per_output_token_seconds", "Mean time per output token after the first")
        self.e2e = histogram("minedraft_request_latency_seconds", "End-to-end request latency")
        self._max_verify = 0
        self._failures_seen = 0
        self._generated_seen = 0
        self._steps_seen = dict.fromkeys(STEP_MODES, 0)

    def close(self) -> None:
        """Drop every Metric before its MetricFamily; the stub crashes at exit otherwise."""
        families = self._families
        for name, value in list(vars(self).items()):
            if name != "_families" and not isinstance(value, (int, float)):
                delattr(self, name)
        families.clear()

    def observe_step(self, engine) -> None:
        self.steps.increment(1)
        self._observe_health(engine)
        sizes = engine.batch_sizes() + [0]
        self.batch_a.set(sizes[0])
        self.batch_b.set(sizes[1])
        if engine.step_log:
            last = engine.step_log[-1]
            self._max_verify = max(self._max_verify, last.verify_size)
            self.max_verify_batch.set(self._max_verify)
            self.draft_length.set(last.num_draft_tokens)
            for mode, gauge in self.policy_mode.items():
                gauge.set(int(mode == last.mode))
        for mode, count in engine.steps_by_mode.items():
            if count > self._steps_seen[mode]:
                self.policy_steps[mode].increment(count - self._steps_seen[mode])
                self._steps_seen[mode] = count
        stats, seen = engine.spec_stats, self._spec_seen
        for i, (metric, value) in enumerate([(self.spec_drafts, stats.num_drafts),
                                             (self.spec_draft_tokens, stats.num_drafted_tokens),
                                             (self.spec_accepted_tokens, stats.num_accepted_tokens)]):
            if value > seen[i]:
                metric.increment(value - seen[i])
                seen[i] = value
        for position, (metric, value) in enumerate(zip(self.spec_accepted_per_position, stats.accepted_per_position)):
            if value > seen[3][position]:
                metric.increment(value - seen[3][position])
                seen[3][position] = value
        if engine.num_generated_tokens > self._generated_seen:
            self.generation_tokens.increment(engine.num_generated_tokens - self._generated_seen)
            self._generated_seen = engine.num_generated_tokens
        if engine.num_drafter_failures > self._failures_seen:
            self.drafter_failures.increment(engine.num_drafter_failures - self._failures_seen)
            self._failures_seen = engine.num_drafter_failures

    def observe_finished(self, output, arrival: float, first_token: float | None, now: float) -> None:
        self.requests_finished.increment(1)
        self.prompt_tokens.increment(output.num_input_tokens)
        self.draft_tokens.increment(output.num_drafted_tokens)
        self.accepted_tokens.increment(output.num_accepted_tokens)
        self.e2e.observe(now - arrival)
        if first_token is not None:
            self.ttft.observe(first_token - arrival)
            if output.num_output_tokens > 1:
                self.tpot.observe((now - first_token) / (output.num_output_tokens - 1))

    def observe_aborted(self, cancelled: bool) -> None:
        (self.requests_cancelled if cancelled else self.requests_aborted).increment(1)

    def observe_step_error(self, engine) -> None:
        self.step_errors.increment(1)
        self._observe_health(engine)

    def _observe_health(self, engine) -> None:
        scheduler = engine.scheduler
        self.requests_running.set(scheduler.num_running)
        self.requests_waiting.set(len(scheduler.waiting))
        self.kv_rows_in_use.set(scheduler.num_running)  # one row per running request in its batch's cache
        self.kv_rows_total.set(scheduler.capacity)
        pool = engine.target.pool
        self.kv_usage.set(pool.usage)
        self.kv_blocks_total.set(pool.num_blocks)
        for key, metric, value in (("queries", self.prefix_queries, pool.prefix_queries),
                                   ("hits", self.prefix_hits, pool.prefix_hits),
                                   ("preemptions", self.preemptions, engine.num_preemptions)):
            # A tensor-parallel restart starts a new pool, whose counts start from zero again.
            if value > self._pool_seen[key]:
                metric.increment(value - self._pool_seen[key])
            self._pool_seen[key] = value
        drafter = engine.drafter
        process = getattr(drafter, "process", None)  # a worker drafter's; an inline one lives in this process
        self.drafter_alive.set(int(drafter is not None and (process is None or process.poll() is None)))
        if isinstance(engine.target, TensorParallelRunner):
            self.tp_workers_alive.set(engine.target.num_workers_alive)
            if engine.target.num_failures > self._tp_failures_seen:
                self.tp_failures.increment(engine.target.num_failures - self._tp_failures_seen)
                self._tp_failures_seen = engine.target.num_failures

    def observe_in_flight(self, count: int) -> None:
        self.in_flight.set(count)


def read_metrics(metrics_url: str, model: str | None = None) -> dict[str, float]:
    """minedraft_* values from a server's metrics page, histogram buckets left out; only
    `model`'s series when given (one server may serve several minedraft models). Series per mode or
    draft position are keyed name/label, e.g. minedraft_policy_steps_total/psd or
    minedraft_spec_decode_num_accepted_tokens_per_pos_total/0."""
    text = urllib.request.urlopen(metrics_url).read().decode()
    label = f'model="{model}"' if model else ""
    values = {}
    for line in text.splitlines():
        if line.startswith("minedraft_") and "_bucket" not in line and label in line:
            series = re.search(r'(?:mode|position)="(\w+)"', line)
            values[line.split("{")[0] + (f"/{series.group(1)}" if series else "")] = float(line.rsplit(" ", 1)[1])
    return values
