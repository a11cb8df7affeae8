"""The server's Prometheus metrics (`GET /metrics`, text exposition format), on prometheus_client.

Each Metrics object has a registry of its own (no process-wide global), so several engines or tests in one
process never mix counts. Names follow Prometheus conventions (`_total` counters, `_seconds` histograms);
running and waiting count sequences (a request with n choices counts n).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# latency buckets (seconds): from a fast compiled step to a long queue wait on a small CPU
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """Counters, gauges and histograms of one server; `render()` is the /metrics body."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        p = "leanformers_"
        self.running = Gauge(p + "requests_running", "Sequences in the running batch (holding a KV slot)", registry=r)
        self.waiting = Gauge(p + "requests_waiting", "Sequences queued for a KV slot", registry=r)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "From a request's arrival to its first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram(p + "inter_token_latency_seconds", "Between consecutive tokens of a sequence",
                             buckets=ITL_BUCKETS, registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter(p + "generation_tokens", "Tokens generated", registry=r)
        self._finished = Counter(p + "sequences_finished", "Sequences finished, by finish reason",
                                 ["finish_reason"], registry=r)
        self.cancelled = Counter(p + "sequences_cancelled", "Sequences cancelled (client disconnected)", registry=r)
        self.rejected = Counter(p + "requests_rejected", "Requests refused because the queue was full (429)",
                                registry=r)
        self.http = Counter(p + "http_requests", "HTTP requests by route and status code", ["route", "status"],
                            registry=r)
        self.step_calls = Gauge(p + "decode_step_calls", "Calls of a compiled decode step, by how they ran "
                                "(compiled graph or eager fallback)", ["how"], registry=r)
        self.decode_steps = Counter(p + "decode_steps", "Batched decode steps run", registry=r)
        self.kv_bytes = Gauge(p + "kv_cache_bytes", "Bytes reserved for the KV cache", registry=r)
        self.kv_slots = Gauge(p + "kv_cache_slots", "Sequence slots of the KV cache (max batch size)", registry=r)
        self.kv_tokens = Gauge(p + "kv_cache_tokens_per_slot", "Positions per slot (max model length)", registry=r)

    def finished(self, reason: str) -> None:
        self._finished.labels(finish_reason=reason).inc()

    def set_kv(self, nbytes: int, slots: int, tokens: int) -> None:
        self.kv_bytes.set(nbytes)
        self.kv_slots.set(slots)
        self.kv_tokens.set(tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
