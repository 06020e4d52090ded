"""`run-node --http-port` without processes: the node's metrics in Prometheus' text format, the
labels of refusals, and the flags' checks."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

import p2p
from node._cli import parser
from node._config import NodeConfig
from node._server import _kind, _OpenTimeout
from pipeline._metrics import NodeMetrics, render


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple], float]:
    body, _ = render(registry)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(body.decode()) for s in f.samples}


def test_node_metrics_count_steps_into_cumulative_buckets_and_errors_by_kind():
    registry = CollectorRegistry()
    node = NodeMetrics(registry)
    node.session_opened()
    node.session_opened()
    node.session_closed()
    for seconds, tokens in ((0.0005, 7), (0.001, 1), (0.003, 1), (100.0, 2)):
        node.step(seconds, tokens)
    node.error("busy")
    node.error("busy")
    node.error("idle_timeout")
    node.cache(used=lambda: 512, budget=lambda: 4096)
    s = samples(registry)
    assert (s[("lamina_node_sessions_open", ())], s[("lamina_node_sessions_total", ())]) == (1, 2)
    assert (s[("lamina_node_steps_total", ())], s[("lamina_node_tokens_total", ())]) == (4, 11)
    bucket = lambda le: s[("lamina_node_step_latency_seconds_bucket", (("le", le),))]  # noqa: E731
    # le is inclusive: 0.001 falls in the 0.001 bucket; 100 s only in +Inf
    assert (bucket("0.001"), bucket("0.0025"), bucket("0.005"), bucket("30.0"), bucket("+Inf")) == (2, 2, 3, 3, 4)
    assert s[("lamina_node_step_latency_seconds_count", ())] == 4
    assert s[("lamina_node_step_latency_seconds_sum", ())] == pytest.approx(100.0045)
    assert s[("lamina_node_errors_total", (("kind", "busy"),))] == 2
    assert s[("lamina_node_errors_total", (("kind", "idle_timeout"),))] == 1
    assert (s[("lamina_node_kv_cache_bytes_used", ())], s[("lamina_node_kv_cache_bytes_budget", ())]) == (512, 4096)


def test_refusals_are_labelled_by_their_code():
    assert _kind(p2p.RemoteError("busy", "no room")) == "busy"
    assert _kind(p2p.RemoteError("draining")) == "draining"
    assert _kind(_OpenTimeout("bad_request", "no OpenSession within 10s")) == "open_timeout"
    assert _kind(RuntimeError("a bug")) == "internal"


@pytest.mark.parametrize("value", ["x", "-1", "65536"])
def test_a_bad_http_port_is_a_usage_error(value, capsys):
    with pytest.raises(SystemExit) as exit_:
        parser().parse_args(["--blocks", "0:1", "--new-swarm", "--http-port", value])
    assert exit_.value.code == 2
    assert "--http-port" in capsys.readouterr().err


def test_http_flags_reach_the_config():
    args = parser().parse_args(["--blocks", "0:1", "--new-swarm", "--http-port", "0", "--http-host", "0.0.0.0"])
    assert (args.http_port, args.http_host) == (0, "0.0.0.0")
    assert parser().parse_args(["--blocks", "0:1", "--new-swarm"]).http_port is None
    with pytest.raises(ValueError, match="--http-host"):
        NodeConfig(model="m", blocks=(0, 1), new_swarm=True, http_port=8000, http_host="")
