"""GET /metrics: what the server did, in Prometheus' text format (prometheus_client).

Counters and histograms are updated where things happen (the worker thread sends tokens, the
HTTP layer refuses requests); gauges (queue depth, rows in the batch, adapters per tier) are read
from the live objects when scraped, so they can never drift from them. Each app has its own
collector registry: two servers in one process (the tests) do not share numbers.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Seconds: a small CPU model answers in milliseconds, a large one loaded from disk in seconds.
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServeMetrics:
    """The server's counters, histograms and live gauges, rendered by `render`."""

    def __init__(self, registry, generator):
        self.registry = CollectorRegistry()
        self.requests = Counter("mlxtune_requests", "Completion requests finished, by model and "
                                "finish reason", ["model", "finish_reason"], registry=self.registry)
        self.refused = Counter("mlxtune_requests_refused", "Requests refused, by HTTP status",
                               ["status"], registry=self.registry)
        self.prompt_tokens = Counter("mlxtune_prompt_tokens", "Prompt tokens of finished "
                                     "requests", ["model"], registry=self.registry)
        self.generation_tokens = Counter("mlxtune_generation_tokens", "Tokens generated",
                                         ["model"], registry=self.registry)
        self.ttft = Histogram("mlxtune_time_to_first_token_seconds", "From a request's arrival "
                              "to its first text sent", buckets=_BUCKETS, registry=self.registry)
        self.tpot = Histogram("mlxtune_time_per_output_token_seconds", "Between successive "
                              "pieces of a request's text", buckets=_BUCKETS,
                              registry=self.registry)
        self.registry.register(_Live(registry, generator))

    def token_sent(self, job, now: float) -> None:
        """A piece of `job`'s text went out at `now` (perf_counter seconds)."""
        if job.last is None:
            self.ttft.observe(now - job.arrived)
        else:
            self.tpot.observe(now - job.last)

    def finished(self, job, finish: str) -> None:
        """`job` is done (its "done" event was sent), for `finish` ("stop", "length")."""
        self.requests.labels(job.model, finish).inc()
        self.prompt_tokens.labels(job.model).inc(len(job.prompt))
        self.generation_tokens.labels(job.model).inc(job.tokens)

    def render(self) -> bytes:
        """The text exposition of every metric."""
        return generate_latest(self.registry)


class _Live:
    """Gauges read when scraped: queue depth, batch rows, adapters in each tier."""

    def __init__(self, registry, generator):
        self.adapters, self.generator = registry, generator

    def describe(self):
        return []  # collected at scrape time only; nothing to check at registration

    def collect(self):
        queued = GaugeMetricFamily("mlxtune_queue_depth", "Requests waiting to join the batch")
        queued.add_metric([], self.generator.queue_depth())
        yield queued
        rows = GaugeMetricFamily("mlxtune_batch_rows", "Requests in the running batch")
        rows.add_metric([], len(self.generator.running))
        yield rows
        tiers = GaugeMetricFamily("mlxtune_adapters", "Registered adapters by tier "
                                  "(resident: stacked for the batch step; host: a copy in host "
                                  "memory; disk: read again on use)", labels=["tier"])
        for tier, n in self.adapters.tiers().items():
            tiers.add_metric([tier], n)
        yield tiers
