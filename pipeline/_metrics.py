"""Prometheus metrics of a gateway and of a node, served as `/metrics` (text format).

Each process keeps its own `CollectorRegistry` (never prometheus_client's global one, so two
gateways in one test process do not collide):

    registry = CollectorRegistry()
    gateway = GatewayMetrics(registry)            # what pipeline._gateway counts itself
    registry.register(SwarmCollector(view))       # read from a SwarmView at scrape time
    node = NodeMetrics(registry)                  # the seam run-node fills (see below)
    body, content_type = render(registry)

The node-side seam: `run-node` creates a `NodeMetrics` on the registry its HTTP server serves
and calls ``session_opened()`` / ``session_closed()``, ``step(seconds, tokens)`` after each
inference step, ``error(kind)`` when a request fails, and ``cache(used=fn, budget=fn)`` once
with two callables returning the KV cache bytes in use and the budget (read at scrape time).
"""

from __future__ import annotations

from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

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
    """What a node serving blocks counts (filled by run-node; see the module docstring)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.sessions_open = Gauge("lamina_node_sessions_open", "inference sessions open on this node",
                                   registry=registry)
        self.steps = Counter("lamina_node_steps", "inference steps served", registry=registry)
        self.tokens = Counter("lamina_node_tokens", "token positions run through this node's blocks",
                              registry=registry)
        self.step_latency = Histogram("lamina_node_step_latency_seconds", "time to run one step through the span",
                                      buckets=LATENCY_BUCKETS, registry=registry)
        self.errors = Counter("lamina_node_errors", "requests that failed on this node, by kind", ["kind"],
                              registry=registry)
        self._cache_used = Gauge("lamina_node_kv_cache_bytes_used", "KV cache bytes allocated to sessions",
                                 registry=registry)
        self._cache_budget = Gauge("lamina_node_kv_cache_bytes_budget", "KV cache bytes this node may allocate",
                                   registry=registry)

    def session_opened(self) -> None:
        self.sessions_open.inc()

    def session_closed(self) -> None:
        self.sessions_open.dec()

    def step(self, seconds: float, tokens: int) -> None:
        self.steps.inc()
        self.tokens.inc(tokens)
        self.step_latency.observe(seconds)

    def error(self, kind: str) -> None:
        self.errors.labels(kind).inc()

    def cache(self, *, used: Callable[[], float], budget: Callable[[], float]) -> None:
        """Read the KV cache's bytes in use and its budget from these callables at each scrape."""
        self._cache_used.set_function(used)
        self._cache_budget.set_function(budget)


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
        for record in view.state.records():
            name = record.state.name.lower()
            counts[name] = counts.get(name, 0) + 1
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
