"""What ``GET /metrics`` shows Prometheus: traffic, latency and the engine's load.

Counters and histograms are updated as requests run; the engine's gauges (queue,
batch, KV cache, prefix-cache hit rate) are read from each engine when scraped.
Every server has its own registry, so several servers in one process (tests) do not
share numbers.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    def __init__(self, engine_figures: Callable[[], dict[str, dict[str, float]]]):
        """``engine_figures()`` -> {model name: {"waiting", "running", "kv_cache_usage", "prefix_queries",
        "prefix_hits", "cached_tokens", "drafted", "accepted"}}."""
        self.registry = CollectorRegistry()
        self.requests = Counter("lmforge_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=self.registry)
        self.prompt_tokens = Counter("lmforge_prompt_tokens", "prompt tokens processed", ["model"],
                                     registry=self.registry)
        self.completion_tokens = Counter("lmforge_completion_tokens", "tokens generated", ["model"],
                                         registry=self.registry)
        self.time_to_first_token = Histogram("lmforge_time_to_first_token_seconds",
                                             "from a request's arrival to its first generated token", ["model"],
                                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.inter_token_latency = Histogram("lmforge_inter_token_latency_seconds",
                                             "between two generated tokens of one request", ["model"],
                                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.request_latency = Histogram("lmforge_request_latency_seconds", "from arrival to the last token",
                                         ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_EngineCollector(engine_figures))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """Gauges read from the engines at scrape time."""

    GAUGES = {
        "waiting": ("lmforge_queue_length", "requests waiting for a slot in the batch"),
        "running": ("lmforge_running_batch_size", "requests being decoded together"),
        "kv_cache_usage": ("lmforge_kv_cache_usage_ratio", "share of the KV cache's positions held by running requests"),
        "prefix_hit_rate": ("lmforge_prefix_cache_hit_rate", "share of admissions that reused a cached prefix"),
        "cached_tokens": ("lmforge_prefix_cache_tokens", "prompt tokens served from the prefix cache (total)"),
        "drafted": ("lmforge_draft_tokens", "tokens guessed by speculative decoding (total)"),
        "accepted": ("lmforge_draft_accepted_tokens", "guessed tokens the model kept (total)"),
    }

    def __init__(self, figures: Callable[[], dict[str, dict[str, float]]]):
        self.figures = figures

    def describe(self):
        return []

    def collect(self):
        figures = self.figures()
        for key, (name, help_text) in self.GAUGES.items():
            gauge = GaugeMetricFamily(name, help_text, labels=["model"])
            for model, values in figures.items():
                gauge.add_metric([model], float(values.get(key, 0.0)))
            yield gauge
