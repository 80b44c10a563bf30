"""``GET /metrics``: Prometheus text format through ``prometheus_client``, named as vLLM names
its own (``vllm:`` becomes ``minimind:``) so dashboards carry over.

Gauges and counters are read from the scheduler at scrape time (``SchedulerStats``); the TTFT
and inter-token latency histograms are fed per drawn token by the scheduler's ``on_token``
hook. Each app has its own registry, so several servers in one process do not clash.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .scheduler import BatchJob, Scheduler

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# seconds; vLLM's buckets, cut to what a CPU-sized model sees
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
               0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


class Metrics:
    """The registry of one app. ``scheduler`` is a callable giving the running Scheduler (or
    None before it starts); ``on_token`` is what the scheduler calls per drawn token."""

    def __init__(self, scheduler: Callable[[], Scheduler | None], model: Callable[[], str]
                 ) -> None:
        from prometheus_client import CollectorRegistry, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        self.ttft = Histogram("minimind:time_to_first_token_seconds",
                              "Time from a request's arrival to its first token.",
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.itl = Histogram("minimind:inter_token_latency_seconds",
                             "Time between two tokens of one request.", buckets=ITL_BUCKETS,
                             registry=self.registry)
        self._scheduler, self._model = scheduler, model
        self._last: dict[int, float] = {}  # id(job) -> when its last token came
        self.registry.register(_SchedulerCollector(self))

    def on_token(self, job: BatchJob, token: int) -> None:
        """Called on the scheduler thread after each drawn token."""
        now = time.perf_counter()
        key = id(job)
        last = self._last.get(key)
        if last is None:
            self.ttft.observe(now - job.queued)
        else:
            self.itl.observe(now - last)
        if job.output is not None and job.output.done:
            self._last.pop(key, None)
        else:
            self._last[key] = now
        if len(self._last) > 10_000:  # cancelled jobs never reach done: forget the oldest
            self._last.pop(next(iter(self._last)))

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class _SchedulerCollector:
    """Gauges and counters read from the scheduler at each scrape."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        scheduler = self.metrics._scheduler()
        stats = scheduler.stats if scheduler is not None else None
        labels = {"model_name": self.metrics._model()}

        def family(kind: type, name: str, doc: str, value: float) -> Any:
            metric = kind(name, doc, labels=list(labels))
            metric.add_metric(list(labels.values()), value)
            return metric

        yield family(GaugeMetricFamily, "minimind:num_requests_running",
                     "Requests in the running batch.",
                     scheduler.running if scheduler is not None else 0)
        yield family(GaugeMetricFamily, "minimind:num_requests_waiting",
                     "Requests waiting to join the batch.",
                     scheduler.waiting if scheduler is not None else 0)
        prompt = stats.prompt_tokens if stats else 0
        cached = stats.cached_prompt_tokens if stats else 0
        yield family(CounterMetricFamily, "minimind:prompt_tokens",
                     "Prompt tokens of admitted requests.", prompt)
        yield family(CounterMetricFamily, "minimind:generation_tokens",
                     "Tokens generated.", stats.generation_tokens if stats else 0)
        yield family(CounterMetricFamily, "minimind:request_success",
                     "Requests that finished.", stats.requests_finished if stats else 0)
        yield family(CounterMetricFamily, "minimind:prefix_cache_queries",
                     "Prompt tokens looked up in the prefix cache.", prompt)
        yield family(CounterMetricFamily, "minimind:prefix_cache_hits",
                     "Prompt tokens whose keys came from the prefix cache.", cached)
        yield family(GaugeMetricFamily, "minimind:prefix_cache_hit_rate",
                     "prefix_cache_hits / prefix_cache_queries since start.",
                     cached / prompt if prompt else 0.0)
