"""`run-node --http-port N`: the node's own HTTP server, on the node's trio loop.

    GET  /, /api/swarm     the swarm map, from this node's own replica (`Node.view`)
    GET  /metrics          Prometheus: the node's `NodeMetrics`, its replica's gossip
                           (``lamina_node_swarm_*``) and the API's own (``lamina_gateway_*``)
    GET  /health           200 when a generation can start now (see `pipeline._gateway.Gateway.health`)
    GET  /v1/models        POST /v1/completions, /v1/chat/completions: the OpenAI API

It is the gateway's app (`pipeline._gateway_http.create_app`) over a `Gateway` built from the
node's replica and checkpoint, so the map, /metrics and /v1/models answer as soon as the node
serves. Generations need a lamina client: `keep_client_attached` opens one (its own host,
dialing this node on loopback) once the replica shows every block served, and a generation
request gets a 503 naming the missing blocks until then.

The server stops when the node starts draining (requests in flight get hypercorn's graceful
timeout). Nothing on the HTTP side takes the node down: `serve_http` logs a failure (a port in
use, a crash) and tries again `RETRY` seconds later, while the node goes on serving its blocks.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import TYPE_CHECKING, Callable

import trio

if TYPE_CHECKING:
    from pipeline._gateway import Gateway

    from ._node import Node

logger = logging.getLogger("lamina.node.http")

RETRY = 10.0  # seconds between tries after the HTTP server failed


def node_gateway(node: "Node") -> "Gateway":
    """The gateway of `node`'s HTTP server: its replica, its checkpoint's facts, its registry."""
    from pipeline._gateway import Gateway, GatewayConfig, ModelFacts

    cfg = node.config
    config = GatewayConfig(model=cfg.model, swarm_key=cfg.swarm_key, host=cfg.http_host,
                           port=cfg.http_port or 0, dtype=cfg.dtype)
    facts = ModelFacts.of(config, node.checkpoint.config, node.checkpoint.model_hash)
    gateway = Gateway(node.view, facts, config, node.metrics_registry, peer_id=node.peer_id,
                      collect_swarm=False)   # the node's registry has its replica already
    gateway.local = node.describe
    return gateway


def client_peers(node: "Node") -> list[str]:
    """Where the node's own client dials in: its loopback addresses, else all of them."""
    local = [a for a in node.addrs if a.startswith(("/ip4/127.", "/ip6/::1/"))]
    return local or list(node.addrs)


async def serve_http(node: "Node", *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the node's HTTP API until the node drains. Ready with the bound URLs (an empty list
    when the first try failed: the node serves on, and this tries again every `RETRY` s). Never
    raises but `trio.Cancelled`."""
    reported = False

    def ready(binds: list[str]) -> None:
        nonlocal reported
        if not reported:
            reported = True
            task_status.started(binds)

    failures = 0
    while not node.draining:
        try:
            await _serve_once(node, ready)
        except Exception as exc:  # noqa: BLE001 - the node must outlive its HTTP server
            failures += 1
            logger.log(logging.ERROR if failures == 1 else logging.WARNING,
                       "http: the server on %s:%s failed: %s (the node serves on; retrying in %g s)",
                       node.config.http_host, node.config.http_port, _describe(exc), RETRY,
                       exc_info=not isinstance(_leaf(exc), OSError))
        ready([])
        with trio.move_on_after(RETRY):
            await node.wait_draining()


async def _serve_once(node: "Node", ready: Callable[[list[str]], None]) -> None:
    """One life of the server: bind, serve, return once the node drains (the client closes)."""
    from hypercorn.trio import serve

    from pipeline._gateway import http_config, keep_client_attached
    from pipeline._gateway_http import create_app

    gateway = node_gateway(node)
    http = http_config(node.config.http_host, node.config.http_port or 0)
    try:
        async with trio.open_nursery() as nursery:

            async def run_server(task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
                # returns once the node drains and hypercorn's graceful shutdown is over
                await serve(create_app(gateway), http, mode="asgi", shutdown_trigger=node.wait_draining,
                            task_status=task_status)
                logger.info("http: stopped (the node is draining)")
                nursery.cancel_scope.cancel()   # and the client with it

            binds = await nursery.start(run_server)
            logger.info("http: serving %s (the swarm map at /, /api/swarm, /metrics, /health, and the "
                        "OpenAI API at /v1 for %s)", " ".join(binds), gateway.name)
            nursery.start_soon(partial(keep_client_attached, gateway, partial(client_peers, node)))
            ready(binds)
    finally:
        gateway.close()


def _leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _describe(exc: BaseException) -> str:
    exc = _leaf(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return f"{type(exc).__name__}: {exc}"
