"""Prometheus metrics of the server (``prometheus-client``), per requested model and served adapter.

vLLM exports no per-adapter series; here every request counter and histogram carries ``model``
(what the client asked: ``base``, ``law``, ``auto``, ``moe``...) and ``adapter`` (what served it:
the adapter the router chose for ``auto``, ``gate`` for ``moe``, ``base``). Each server has its own
registry, so several servers (tests) can live in one process.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)
_BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128)

CONTENT_TYPE = CONTENT_TYPE_LATEST
disable_created_metrics()  # no *_created series next to each counter


class ServerMetrics:
    """The server's series, registered on a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ("model", "adapter")
        r = self.registry
        self.requests = Counter(
            "loralab_requests", "Finished requests by outcome", (*labels, "status"), registry=r
        )
        self.prompt_tokens = Counter(
            "loralab_prompt_tokens", "Prompt tokens of finished requests", labels, registry=r
        )
        self.generation_tokens = Counter(
            "loralab_generation_tokens", "Generated tokens of finished requests", labels, registry=r
        )
        self.ttft = Histogram(
            "loralab_time_to_first_token_seconds",
            "From arrival (routing included) to the first generated token",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "loralab_request_latency_seconds",
            "From arrival to the last token",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.routing = Counter(
            "loralab_routing_decisions",
            "Router decisions for model=auto",
            ("label", "reason"),
            registry=r,
        )
        self.batch_size = Histogram(
            "loralab_batch_size",
            "Rows per forward pass (kind: prefill of newcomers, decode of running rows)",
            ("kind",),
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("loralab_queue_depth", "Requests waiting for a row", registry=r)
        self.running = Gauge("loralab_running_requests", "Requests being decoded", registry=r)
        self.loaded_adapters = Gauge(
            "loralab_loaded_adapters",
            "Adapters resident in the model (gate experts included)",
            registry=r,
        )
        self.evictions = Counter(
            "loralab_adapter_evictions", "Adapters evicted to make room (LRU)", registry=r
        )

    def watch_engine(self, stats: Callable[[], dict[str, int]]) -> None:
        """Read queue depth and running rows from the engine when scraped."""
        self.queue_depth.set_function(lambda: stats()["waiting"])
        self.running.set_function(lambda: stats()["running"])

    def observe_step(self, kind: str, rows: int) -> None:
        self.batch_size.labels(kind).observe(rows)

    def render(self) -> bytes:
        return generate_latest(self.registry)
