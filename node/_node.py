"""A node's life: join the swarm, choose blocks, load them, serve, rebalance, drain, leave.

`serve_node(config)` is one trio service (``node = await nursery.start(serve_node, config)``):
it owns the host and one nursery holding everything else (swarm view, announcer, batcher, RTT
and rebalance loops). It reports ready with the running `Node` once the span serves and its
ONLINE record is published; `Node.request_drain()` (SIGTERM in `run-node`) makes it drain:

1. state DRAINING, announced at once: no new session picks this node, and OpenSession is
   refused with DRAINING;
2. running sessions go on until they close, up to `NodeConfig.drain_timeout`;
3. an OFFLINE record is published, the host closes, `serve_node` returns.

The node has one state, a `crdt.ServerState`, changed only by `Node.set_state`: it is what the
server admits (OpenSession only ONLINE), what `NodeInfo` reports and what the signed record says.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import trio

import crdt
import p2p
from crdt import ServerState
from pipeline import Checkpoint, InvalidSpanError, LaminaError, Span, check_device, load_span
from pipeline._metrics import CollectorRegistry, NodeMetrics, SwarmCollector
from pipeline._model import hf_block_names
from pipeline._swarm import SwarmView, now_ms, swarm_topics

from ._announce import Announcer, learn_addrs, record_fields, signer_for
from ._batching import Batcher
from ._blocks import choose_blocks, should_rebalance
from ._config import VERSION, NodeConfig
from ._measure import RTT_INTERVAL, measure_rtts, next_block_servers, span_throughput
from ._limits import PeerLimits, raise_descriptor_limit
from ._server import SpanServer
from ._sessions import CacheBudget, default_cache_tokens

logger = logging.getLogger("lamina.node")

LEAVE_ANNOUNCE_DEADLINE = 2.0  # seconds spent pushing the DRAINING and the OFFLINE records


class JoinError(LaminaError):
    """The node could join no swarm: none of its initial peers answered."""


def auto_device() -> str:
    """What ``--device auto`` picks: a CUDA GPU when torch sees one, else Apple's MPS, else the
    CPU."""
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def resolve_device(device: str) -> tuple[str, str]:
    """The device to compute on for `--device` (``auto`` resolved) and a line saying which and
    why, for the log."""
    chosen = auto_device() if device == "auto" else device
    what = chosen
    if chosen.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(chosen).index or 0
        if index < torch.cuda.device_count():
            what = f"{chosen} ({torch.cuda.get_device_name(index)})"
    if device != "auto":
        return chosen, f"device {what}"
    why = "" if chosen != "cpu" else ": no CUDA GPU or Apple MPS device found"
    return chosen, f"device {what} (--device auto{why})"


def _size(nbytes: int) -> str:
    if nbytes < 1024:
        return f"{nbytes} B"
    value = float(nbytes)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024:
            break
    return f"{value:.1f} {unit}"


def check_joined(host: p2p.Host, initial_peers: list[str]) -> None:
    """Raise `JoinError` unless the host is connected to one of `initial_peers`: a node that
    reached none of them would otherwise serve alone, as a swarm of one nobody knows. The message
    names every address and why it failed, in one line."""
    peers = {addr: addr.rsplit("/p2p/", 1)[-1] for addr in initial_peers}
    if any(host.is_connected(peer) for peer in peers.values()):
        return
    reasons = []
    for addr, peer in peers.items():
        error = host.bootstrap_errors.get(addr)
        why = str(error).removeprefix(f"cannot connect to {peer}: ") if error is not None else \
            f"no answer within {p2p.constants.BOOTSTRAP_DEADLINE:g} s"
        reasons.append(f"{addr} ({why})")
    raise JoinError(f"none of --initial-peers could be reached: {'; '.join(reasons)}. Check the addresses and "
                    "that those peers run (in a private swarm, that every peer uses the same --swarm-key); "
                    "--new-swarm starts a new swarm instead")


def model_id(checkpoint: Checkpoint) -> crdt.ModelId:
    """The model as announced: a short name and the model hash clients match on (its config
    and its weights' identity: `pipeline.model_hash`)."""
    name = checkpoint.name
    path = Path(name)
    if path.is_dir() or name.startswith(("/", ".")):
        name = path.resolve().name or "model"
    name = name.encode()[:128].decode(errors="ignore") or "model"
    return crdt.ModelId(name, bytes.fromhex(checkpoint.model_hash))


@dataclass
class _Live:
    """Values the announcer reads on every heartbeat."""

    start: int
    end: int
    throughput: float = 0.0


class Node:
    """A running node (valid while `serve_node` runs)."""

    def __init__(self, config: NodeConfig, host: p2p.Host, checkpoint: Checkpoint, view: SwarmView,
                 device: str | None = None) -> None:
        self.config = config
        self.host = host
        self.checkpoint = checkpoint
        self.view = view
        self.device = device or resolve_device(config.device)[0]
        self.model = model_id(checkpoint)
        self.batcher = Batcher(max_segments=config.max_batch_size)
        self.server: SpanServer | None = None
        self.announcer: Announcer | None = None
        self.live = _Live(0, 1)
        self.rtts: dict[bytes, float] = {}
        self._drain = trio.Event()
        # /metrics (run-node --http-port): this registry, which the node's gateway shares
        self.metrics_registry = CollectorRegistry()
        self.metrics = NodeMetrics(self.metrics_registry)
        self.metrics.cache(used=lambda: self._cache_bytes()[0], budget=lambda: self._cache_bytes()[1])
        self.metrics_registry.register(SwarmCollector(view, prefix="lamina_node_swarm"))

    @property
    def blocks(self) -> tuple[int, int]:
        return self.live.start, self.live.end

    @property
    def addrs(self) -> list[str]:
        return self.host.addrs()

    @property
    def peer_id(self) -> str:
        return self.host.peer_id_str

    def request_drain(self) -> None:
        """Start draining (idempotent); `serve_node` returns once it is done."""
        self._drain.set()

    @property
    def draining(self) -> bool:
        return self._drain.is_set()

    async def wait_draining(self) -> None:
        """Until the node starts draining."""
        await self._drain.wait()

    def _cache_bytes(self) -> tuple[int, int]:
        """KV cache bytes (reserved by open sessions, budget) of the span served now."""
        server = self.server
        if server is None:
            return 0, 0
        per_token = server.span.cache_bytes_per_token()
        return server.budget.used_tokens * per_token, server.budget.total_tokens * per_token

    def describe(self) -> dict[str, object]:
        """This node, for its HTTP server's /api/swarm and /health."""
        state = self.server.state if self.server is not None else ServerState.JOINING
        return {"peer_id": self.peer_id, "blocks": list(self.blocks), "state": state.name.lower(),
                "sessions": self.server.active_sessions if self.server is not None else 0,
                "draining": self.draining}

    async def set_state(self, state: ServerState) -> None:
        """Change the node's state: the server's admission at once, then the signed record,
        published and pushed (OFFLINE: the announcer's last record, `Announcer.leave`)."""
        assert self.server is not None and self.announcer is not None
        self.server.state = state
        await self.announcer.set_state(state)

    # -- record ------------------------------------------------------------------------------
    def _load(self) -> crdt.Load:
        server = self.server
        if server is None:
            return crdt.Load()
        return crdt.Load(active_sessions=server.active_sessions, free_cache_tokens=server.budget.free_tokens)

    def _peer_addrs(self, peer: str) -> list[str]:
        try:
            signed = self.view.state.get(crdt.peer_id_from_str(peer))
        except Exception:
            return []
        return list(signed.record.addrs) if signed is not None else []

    def _reachability(self) -> crdt.Reachability:
        """DIRECT once a dial-back proved it; until then (and when it failed) RELAYED: other
        nodes choose relays among DIRECT ones, and a guess costs them a dial timeout."""
        direct = self.host.nat.status == p2p.ReachStatus.DIRECT
        return crdt.Reachability.DIRECT if direct else crdt.Reachability.RELAYED

    def _relay_candidates(self) -> list[tuple[str, list[str]]]:
        """Reachable servers of the swarm (relays to reserve on when we are not): the least
        loaded first."""
        now = now_ms()
        live = [r.record for r in self.view.state if r.record.peer_id != self.view.peer_id
                and r.record.state == ServerState.ONLINE and r.record.reachability == crdt.Reachability.DIRECT
                and r.record.expires_ms > now]
        live.sort(key=lambda r: r.load.active_sessions)
        return [(crdt.peer_id_to_str(r.peer_id), list(r.addrs)) for r in live]

    async def _follow_reachability(self) -> None:
        """Re-announce at once when our reachability or relay addresses change, and keep the
        relay candidates current."""
        nat = self.host.nat
        nat.set_relay_candidates(self._relay_candidates)
        assert self.announcer is not None
        while True:
            async with trio.open_nursery() as nursery:   # whichever changes first
                async def on(wait) -> None:  # type: ignore[no-untyped-def]
                    await wait()
                    nursery.cancel_scope.cancel()
                if nat.reach is not None:
                    nursery.start_soon(on, nat.reach.wait_changed)
                if nat.reservations is not None:
                    nursery.start_soon(on, nat.reservations.wait_changed)
                nursery.start_soon(on, self.view.wait_changed)
            if self.addrs != list(self.announcer.last.record.addrs if self.announcer.last else ()) or \
                    self._reachability() != (self.announcer.last.record.reachability if self.announcer.last else None):
                await self.announcer.refresh()

    # -- bring-up ----------------------------------------------------------------------------
    async def _choose_blocks(self) -> tuple[int, int]:
        total = self.checkpoint.config.num_hidden_layers
        cfg = self.config
        if cfg.blocks is not None:
            start, end = cfg.blocks
            if end > total:
                raise InvalidSpanError(f"--blocks {start}:{end} is outside the model's {total} blocks")
            return start, end
        assert cfg.num_blocks is not None
        if cfg.num_blocks > total:
            raise InvalidSpanError(f"--num-blocks {cfg.num_blocks} exceeds the model's {total} blocks")
        if not cfg.new_swarm:
            # learn who serves what first (anti-entropy with the initial peers runs on connect)
            with trio.move_on_after(cfg.join_wait):
                await self.view.wait_until(lambda s: any(
                    r.record.model.config_hash == self.model.config_hash for r in s))
        records = [r.record for r in self.view.state]
        start, end = choose_blocks(records, self.model.config_hash, total, cfg.num_blocks, now_ms(),
                                   exclude=self.view.peer_id)
        logger.info("chose blocks %d:%d (the weakest span of %d blocks among %d known servers)",
                    start, end, cfg.num_blocks, len(records))
        return start, end

    async def _load_span(self, start: int, end: int) -> Span:
        cfg = self.config
        names = [n for i in range(start, end) for n in hf_block_names(self.checkpoint.config, i)]
        logger.info("loading blocks %d:%d of %s: %s in %d tensors, onto %s (dtype %s)", start, end, self.model.name,
                    _size(self.checkpoint.tensor_bytes(names)), len(names), self.device, cfg.dtype)
        began = time.monotonic()
        span = await trio.to_thread.run_sync(load_span, self.checkpoint, start, end, self.device, cfg.dtype)
        report = span.load_report
        logger.info("loaded blocks %d:%d in %.1f s: %s read from %d file%s (%d tensors), computing in %s",
                    start, end, time.monotonic() - began, _size(report.bytes_read), len(set(report.files)),
                    "" if len(set(report.files)) == 1 else "s", report.tensors, str(span.dtype).removeprefix("torch."))
        self.live.throughput = await span_throughput(span, self.checkpoint.model_hash, cfg.cache_dir)
        return span

    def _budget(self, span: Span) -> CacheBudget:
        tokens = self.config.cache_tokens or default_cache_tokens(span)
        return CacheBudget(tokens, self.config.max_sessions)

    # -- loops -------------------------------------------------------------------------------
    def _next_servers(self) -> list[crdt.ServerRecord]:
        return next_block_servers(self.view.servers(self.model.config_hash), self.view.peer_id, self.live.end)

    async def _rtt_loop(self) -> None:
        """Ping the next blocks' servers every RTT_INTERVAL, and at once when that set changes."""
        while True:
            records = self._next_servers()
            self.rtts = await measure_rtts(self.host, records) if records else {}
            peers = {r.peer_id for r in records}
            generation = self.view.generation
            with trio.move_on_after(RTT_INTERVAL):
                while {r.peer_id for r in self._next_servers()} == peers:
                    generation = await self.view.wait_changed(generation)

    async def _rebalance_loop(self) -> None:
        total = self.checkpoint.config.num_hidden_layers
        while True:
            await trio.sleep(self.config.rebalance_interval)
            assert self.announcer is not None
            last = self.announcer.last
            if self.draining or last is None or last.record.state is not ServerState.ONLINE:
                continue
            target = should_rebalance([r.record for r in self.view.state], last.record, total, now_ms())
            if target is not None:
                await self._move(*target)

    async def _move(self, start: int, end: int) -> None:
        """Serve other blocks: drain (never killing a session), reload, come back online."""
        assert self.server is not None and self.announcer is not None
        logger.info("rebalancing from blocks %d:%d to %d:%d: draining first", *self.blocks, start, end)
        await self.set_state(ServerState.DRAINING)
        await self.server.wait_idle()
        if self.draining:
            return  # shutting down instead
        self.live.start, self.live.end = start, end
        await self.set_state(ServerState.JOINING)
        span = await self._load_span(start, end)
        self.server.set_span(span)
        self.server.budget = self._budget(span)
        await self.set_state(ServerState.ONLINE)
        logger.info("now serving blocks %d:%d", start, end)

    async def _drain_and_leave(self) -> None:
        assert self.server is not None and self.announcer is not None
        logger.info("draining: %d sessions open, waiting up to %ss", self.server.active_sessions,
                    self.config.drain_timeout)
        # The server refuses new sessions at once, and the record is merged and gossiped at
        # once; only the anti-entropy push that follows may wait on a peer that is gone (each
        # exchange is bounded by the view's sync deadline).
        with trio.move_on_after(LEAVE_ANNOUNCE_DEADLINE):
            await self.set_state(ServerState.DRAINING)
        with trio.move_on_after(self.config.drain_timeout) as scope:
            await self.server.wait_idle()
        if scope.cancelled_caught:
            logger.warning("drain timeout: closing %d sessions still open", self.server.active_sessions)
        with trio.move_on_after(LEAVE_ANNOUNCE_DEADLINE):
            await self.set_state(ServerState.OFFLINE)
        stats = self.batcher.stats
        logger.info("left the swarm (%d forward passes, %d of them batched, %.2f segments per pass, %d tokens, "
                    "%.1f s computing)", stats.passes, stats.batched_passes, stats.segments / max(stats.passes, 1),
                    stats.tokens, stats.compute_seconds)


async def serve_node(config: NodeConfig, *, task_status: trio.TaskStatus[Node] = trio.TASK_STATUS_IGNORED) -> None:
    """Run a node until it has drained (see the module docstring)."""
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    raise_descriptor_limit(config.max_connections, config.max_sessions)
    # a missing or bad model or device fails before any networking (the dtype: checked at load)
    checkpoint = Checkpoint(config.model)
    device, device_line = resolve_device(config.device)
    check_device(device, torch.float32)
    logger.info("%s", device_line)
    began = time.monotonic()
    identity_hash = await trio.to_thread.run_sync(lambda: checkpoint.model_hash)
    logger.info("model %s: identity %s (config and weights, %.2f s)", checkpoint.name, identity_hash[:16],
                time.monotonic() - began)
    identity = p2p.Identity.load_or_create(config.identity) if config.identity else p2p.Identity.generate()
    nat = p2p.NatConfig(enabled=True, relay=config.relay, reachability=config.reachability,
                        relay_limits=p2p.RelayLimits(max_reservations=config.relay_slots,
                                                     max_circuits=config.relay_circuits,
                                                     circuit_duration=int(config.relay_duration),
                                                     circuit_bytes=config.relay_bytes))
    host_config = p2p.HostConfig(identity=identity, listen_addrs=list(config.listen), nat=nat,
                                 announce_addrs=list(config.announce_addrs),
                                 enable_lanes=config.lanes, lane_port=config.lane_port,
                                 swarm_key=config.swarm_key, max_connections=config.max_connections,
                                 bootstrap_peers=list(config.initial_peers), gossip_topics=swarm_topics())
    if config.swarm_key is not None:
        logger.info("private swarm: swarm key %s", config.swarm_key.fingerprint())
    async with p2p.open_host(host_config) as host:
        if config.initial_peers:
            check_joined(host, config.initial_peers)
        async with trio.open_nursery() as nursery:
            view = SwarmView(host)
            await nursery.start(view.serve)
            node = Node(config, host, checkpoint, view, device)
            node.live.start, node.live.end = await node._choose_blocks()
            fields = record_fields(model=node.model, span=lambda: node.blocks,
                                   throughput=lambda: node.live.throughput, load=node._load,
                                   rtts=lambda: node.rtts, version=VERSION[:32], public_name=config.public_name,
                                   reachability=node._reachability)
            node.announcer = Announcer(view, signer_for(identity), fields, heartbeat=config.heartbeat,
                                       lease=config.lease, state=ServerState.JOINING)
            await nursery.start(node.announcer.serve)
            span = await node._load_span(*node.blocks)
            await nursery.start(node.batcher.serve)
            node.server = SpanServer(host, span, checkpoint.model_hash, node._budget(span), node.batcher,
                                     idle_timeout=config.session_idle_timeout, peer_addrs=node._peer_addrs,
                                     max_length=config.inference_max_length, metrics=node.metrics,
                                     limits=PeerLimits(config.max_sessions_per_peer, config.max_cache_tokens_per_peer,
                                                       config.session_open_rate))
            node.server.install()
            await node.set_state(ServerState.ONLINE)
            nursery.start_soon(node._rtt_loop)
            nursery.start_soon(node._follow_reachability)
            if config.num_blocks is not None and config.rebalance_interval > 0:
                nursery.start_soon(node._rebalance_loop)
            logger.info("serving blocks %d:%d of %s as %s", *node.blocks, node.model.name, node.peer_id)
            task_status.started(node)
            await node._drain.wait()
            await node._drain_and_leave()
            nursery.cancel_scope.cancel()


__all__ = ["Node", "serve_node", "learn_addrs", "auto_device", "resolve_device", "check_joined"]
