"""Prometheus metrics of a gateway and of a node, served as `/metrics` (text format).

Each process keeps its own `CollectorRegistry` (never prometheus_client's global one, so two
gateways in one test process do not collide):

    registry = CollectorRegistry()
    gateway = GatewayMetrics(registry)            # what pipeline._gateway counts itself
    registry.register(SwarmCollector(view))       # read from a SwarmView at scrape time
    node = NodeMetrics(registry)                  # the seam run-node fills (see below)
    body, content_type = render(registry)

The node side: `run-node` keeps a `NodeMetrics` (registered on the registry its HTTP server
serves, `node._http`) and calls ``session_opened()`` / ``session_closed()``, ``step(seconds,
tokens)`` after each step it serves, ``error(kind)`` when it refuses or fails a request, and
``cache(used=fn, budget=fn)`` once with two callables returning the KV cache bytes reserved and
the budget (read at scrape time). Its replica is a `SwarmCollector` with the prefix
``lamina_node_swarm`` (a gateway's own is ``lamina_swarm``: both may share one registry).
"""

from __future__ import annotations

import time
from bisect import bisect_left
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.utils import floatToGoString

__all__ = ["CollectorRegistry", "GatewayMetrics", "NodeMetrics", "SwarmCollector", "render"]

# latency buckets (seconds): from a loopback step (~1 ms) to a slow swarm's first token
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class GatewayMetrics:
    """What the OpenAI-compatible gateway counts: requests, sessions, tokens, errors, latency."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("lamina_gateway_requests", "HTTP API requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=registry)
        self.sessions_open = Gauge("lamina_gateway_sessions_open",
                                   "generations running through the swarm (one inference session each)",
                                   registry=registry)
        self.sessions_queued = Gauge("lamina_gateway_sessions_queued",
                                     "requests waiting for a free session slot", registry=registry)
        self.tokens = Counter("lamina_gateway_tokens", "tokens of requests served, by kind (prompt, completion)",
                              ["kind"], registry=registry)
        self.errors = Counter("lamina_gateway_errors", "requests that failed, by kind", ["kind"],
                              registry=registry)
        self.ttft = Histogram("lamina_gateway_time_to_first_token_seconds",
                              "from a generation request's arrival to its first token",
                              buckets=LATENCY_BUCKETS, registry=registry)
        self.duration = Histogram("lamina_gateway_request_duration_seconds",
                                  "from a generation request's arrival to its last byte",
                                  buckets=LATENCY_BUCKETS, registry=registry)
        for kind in ("prompt", "completion"):
            self.tokens.labels(kind)       # exported at 0 from the start
        self._registry = registry

    def unregister(self) -> None:
        """Take these metrics off their registry (a gateway that stops; a new one may register)."""
        for metric in (self.requests, self.sessions_open, self.sessions_queued, self.tokens, self.errors,
                       self.ttft, self.duration):
            self._registry.unregister(metric)


class NodeMetrics:
    """What a node serving blocks counts (run-node calls it; see the module docstring).

    The counts are plain numbers bumped on the node's event loop (a decode step pays a few
    additions and one bisect, no lock), turned into metric families at scrape time: register
    the object itself on a registry (the constructor does when given one)."""

    def __init__(self, registry: CollectorRegistry | None = None, prefix: str = "lamina_node") -> None:
        self.prefix = prefix
        self.open_sessions = 0
        self.opened_sessions = 0
        self.steps = 0
        self.tokens = 0
        self.errors: dict[str, int] = {}
        self._latency_counts = [0] * (len(LATENCY_BUCKETS) + 1)   # the last: above every bucket
        self._latency_sum = 0.0
        self._cache_used: Callable[[], float] = lambda: 0.0
        self._cache_budget: Callable[[], float] = lambda: 0.0
        if registry is not None:
            registry.register(self)

    def session_opened(self) -> None:
        self.open_sessions += 1
        self.opened_sessions += 1

    def session_closed(self) -> None:
        self.open_sessions -= 1

    def step(self, seconds: float, tokens: int) -> None:
        """One step (or replay chunk) served: `tokens` positions (rows x positions) in `seconds`."""
        self.steps += 1
        self.tokens += tokens
        self._latency_counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self._latency_sum += seconds

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def cache(self, *, used: Callable[[], float], budget: Callable[[], float]) -> None:
        """Read the KV cache's bytes in use and its budget from these callables at each scrape."""
        self._cache_used, self._cache_budget = used, budget

    def collect(self) -> Iterable[Metric]:
        p = self.prefix
        yield GaugeMetricFamily(f"{p}_sessions_open", "inference sessions open on this node",
                                value=self.open_sessions)
        yield CounterMetricFamily(f"{p}_sessions", "inference sessions opened on this node",
                                  value=self.opened_sessions)
        yield CounterMetricFamily(f"{p}_steps", "inference steps served (a replay counts each chunk)",
                                  value=self.steps)
        yield CounterMetricFamily(f"{p}_tokens", "token positions run through this node's blocks "
                                                 "(rows x positions of each step)", value=self.tokens)
        cumulative, buckets = 0, []
        for bound, count in zip((*LATENCY_BUCKETS, float("inf")), self._latency_counts):
            cumulative += count
            buckets.append((floatToGoString(bound), cumulative))
        yield HistogramMetricFamily(f"{p}_step_latency_seconds",
                                    "from a step's arrival at the span to its output (batching wait and "
                                    "forward pass)", buckets=buckets, sum_value=self._latency_sum)
        errors = CounterMetricFamily(f"{p}_errors", "requests refused or failed on this node, by kind",
                                     labels=["kind"])
        for kind in sorted(self.errors):
            errors.add_metric([kind], self.errors[kind])
        yield errors
        yield GaugeMetricFamily(f"{p}_kv_cache_bytes_used", "KV cache bytes reserved by open sessions",
                                value=self._cache_used())
        yield GaugeMetricFamily(f"{p}_kv_cache_bytes_budget", "KV cache bytes this node may reserve",
                                value=self._cache_budget())


class SwarmCollector:
    """The swarm as a `SwarmView` sees it, read at scrape time: peers connected, servers known by
    state, gossip and anti-entropy counters (`SwarmView.stats`)."""

    def __init__(self, view, prefix: str = "lamina_swarm") -> None:
        self.view, self.prefix = view, prefix

    def collect(self) -> Iterable[Metric]:
        p = self.prefix
        view = self.view
        try:
            connected = len(view.host.connected_peers())
        except Exception:          # a closing host: report what can be read
            connected = 0
        yield GaugeMetricFamily(f"{p}_peers_connected", "libp2p peers connected to this process", value=connected)
        states = GaugeMetricFamily(f"{p}_servers_known", "server records in the local replica, by state",
                                   labels=["state"])
        counts: dict[str, int] = {}
        now, known, me = int(time.time() * 1000), 0, view.peer_id
        for record in view.state.records():
            name = record.state.name.lower()
            counts[name] = counts.get(name, 0) + 1
            known += record.expires_ms > now and record.peer_id != me
        yield GaugeMetricFamily(f"{p}_peers_known", "other peers with an unexpired record in the local replica",
                                value=known)
        for name in ("joining", "online", "draining", "offline"):
            states.add_metric([name], counts.get(name, 0))
        yield states
        stats = view.stats
        for name, help_text in (("gossip_messages", "gossip messages received on the swarm topic"),
                                ("gossip_records", "records admitted from gossip"),
                                ("sync_records", "records admitted from anti-entropy"),
                                ("rejected", "records or messages refused"),
                                ("exchanges", "anti-entropy rounds completed"),
                                ("exchange_failures", "anti-entropy rounds failed")):
            yield CounterMetricFamily(f"{p}_{name}", help_text, value=getattr(stats, name))


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The registry in Prometheus' text format, and its content type."""
    return generate_latest(registry), CONTENT_TYPE_LATEST
