"""An OpenAI-compatible gateway to a swarm: the lamina client and an HTTP server on one trio loop.

    async with trio.open_nursery() as nursery:
        binds = await nursery.start(serve_gateway, GatewayConfig(initial_peers=(addr,), port=8000))
        # POST {binds[0]}/v1/chat/completions ... ; GET / (the swarm map), /api/swarm, /metrics

`serve_gateway` opens an `AsyncDistributedModelForCausalLM` (its own libp2p host and swarm
replica), wraps it in a `Gateway`, and serves `pipeline._gateway_http.create_app(gateway)` with
hypercorn's trio worker: that is `run-gateway` (`pipeline._gateway_cli`). `run-node --http-port`
(`node._http`) serves the same app from the node's own replica at once, and attaches a client in
the background once the swarm covers every block (`keep_client_attached`); until then a
generation request gets a 503 naming the missing blocks.

`Gateway` is the part without HTTP: it checks a parsed request against the model (name, prompt
length, chat template), admits it (at most `max_sessions` generations at once, FIFO, at most
`max_queue` waiting: beyond that a 429), checks that the swarm covers every block (a 503 naming
the missing ones), and runs the generation, one inference session per request, handing text out
as it comes. Every failure is an `ApiError` in the OpenAI shape.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Sequence

import torch
import trio

from ._errors import LaminaError
from ._metrics import CollectorRegistry, GatewayMetrics, SwarmCollector
from ._openai import ApiError, GenRequest, StopText, bad_request, model_not_found, overloaded, server_error, \
    swarm_unavailable
from ._streamers import IncrementalDecoder
from ._swarm_map import block_ranges, describe_missing, swarm_map

log = logging.getLogger("lamina.gateway")

COMPLETION_DEFAULT_MAX_TOKENS = 16     # the API's default for /v1/completions


@dataclass(frozen=True)
class GatewayConfig:
    """What `serve_gateway` serves, and how many requests it runs at once."""

    model: str | None = None             # checkpoint, .gguf file or name; None: the embedded SmolLM2
    initial_peers: tuple[str, ...] = ()
    swarm_key: Any = None                # a private swarm's key file (path) or p2p.SwarmKey
    host: str = "127.0.0.1"
    port: int = 8000                     # 0: any free port (serve_gateway reports the bound address)
    served_name: str | None = None       # the model id clients use (default: see `served_name`)
    max_sessions: int = 8                # generations running at once (one inference session each)
    max_queue: int = 64                  # requests waiting for a session slot; beyond: 429
    default_max_tokens: int = 512        # chat completions' max_tokens when a request gives none
    dtype: str = "auto"
    connect_timeout: float = 30.0        # to reach the swarm and see every block served
    client_options: dict[str, Any] = field(default_factory=dict)   # more from_pretrained options

    def __post_init__(self) -> None:
        for name in ("max_sessions", "default_max_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.max_queue, int) or self.max_queue < 0:
            raise ValueError(f"max_queue must be an integer >= 0, got {self.max_queue!r}")
        if not isinstance(self.port, int) or not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port!r}")


def served_name(model: str | os.PathLike | None) -> str:
    """The model id a gateway answers to: "smollm2" for the embedded model, else the file or
    directory name (without .gguf)."""
    from ._embedded import NAME, is_embedded_name

    if model is None or is_embedded_name(str(model)):
        return NAME
    name = Path(model).name
    return name[:-5] if name.lower().endswith(".gguf") else name


@dataclass
class Job:
    """A checked request, ready to run: its prompt ids and generation options."""

    request: GenRequest
    ids: list[int]
    max_tokens: int
    options: dict[str, Any]
    id: str
    created: int
    t0: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True)
class Outcome:
    finish_reason: str        # "stop" (eos, end of turn, a stop sequence) or "length"
    prompt_tokens: int
    completion_tokens: int


class _ReplyText:
    """The streamer of one generation: counts the new tokens, turns them into text (never half a
    character), cut before a stop sequence, and hands each piece to `emit` as it comes."""

    def __init__(self, tokenizer, stop_ids: frozenset[int], stops: tuple[str, ...],
                 emit: Callable[[str], None]) -> None:
        self.decoder = IncrementalDecoder(tokenizer)
        self.text = StopText(stops)
        self.stop_ids, self.emit = stop_ids, emit
        self.prompt_seen = False
        self.count = 0
        self.ended_on_stop = False     # an eos / end-of-turn token or a stop sequence ended it

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:       # generate hands the prompt first
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.count += 1
            if self.ended_on_stop:
                continue
            if token in self.stop_ids:
                self.ended_on_stop = True
                continue
            self._show(self.text.feed(self.decoder.step(token)))

    def end(self) -> None:
        if not self.ended_on_stop:
            self._show(self.text.feed(self.decoder.flush()))
        self._show(self.text.flush())

    def _show(self, piece: str) -> None:
        if self.text.stopped:
            self.ended_on_stop = True
        if piece:
            self.emit(piece)


def as_api_error(exc: BaseException) -> ApiError:
    """The HTTP answer to a failed generation: the caller's mistake 400, the swarm's 503, ours 500."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, LaminaError) and isinstance(exc, (ValueError, TypeError)):
        return bad_request(str(exc))
    if isinstance(exc, LaminaError):
        return swarm_unavailable(f"the swarm could not run this request: {exc}")
    return server_error(f"internal error: {type(exc).__name__}: {exc}")


def error_kind(exc: BaseException) -> str:
    """A short label for metrics: the OpenAI code, else the exception's class."""
    if isinstance(exc, ApiError):
        return exc.code or exc.type
    return type(exc).__name__


@dataclass(frozen=True)
class ModelFacts:
    """What a gateway knows of its model before any client opens (from the checkpoint's config):
    enough for /v1/models, the swarm map and the 503 that names the missing blocks."""

    name: str                    # the model id clients use
    aliases: frozenset[str]      # every name a request may give
    blocks: int
    context: int                 # max_position_embeddings
    model_hash: bytes            # crdt.ModelId.config_hash

    @classmethod
    def of(cls, config: GatewayConfig, model_config, model_hash: bytes | str) -> "ModelFacts":
        name = config.served_name or served_name(config.model)
        aliases = frozenset({name} | ({str(config.model)} if config.model is not None else set()))
        digest = bytes.fromhex(model_hash) if isinstance(model_hash, str) else bytes(model_hash)
        return cls(name, aliases, int(model_config.num_hidden_layers), int(model_config.max_position_embeddings),
                   digest)


class Gateway:
    """The OpenAI API over one model of a swarm (see the module docstring).

    It serves the map, /metrics and /v1/models from `view` (a replica of the swarm state) at
    once; generations need a client, `attach`ed once one is open (`serve_gateway` opens it
    first; `keep_client_attached` opens it in the background once the chain is complete).
    Until then a generation request gets a 503 naming the missing blocks."""

    def __init__(self, view, facts: ModelFacts, config: GatewayConfig, registry: CollectorRegistry | None = None,
                 *, peer_id: str, collect_swarm: bool = True) -> None:
        self.view, self.facts, self.config, self.peer_id = view, facts, config, peer_id
        self.name, self.aliases = facts.name, facts.aliases
        self.context, self.blocks, self.model_hash = facts.context, facts.blocks, facts.model_hash
        self.model = None              # the client (AsyncDistributedModelForCausalLM), once attached
        self.tokenizer = None
        self.stop_ids: frozenset[int] = frozenset()
        self.local: Callable[[], dict[str, Any]] | None = None   # more /api/swarm and /health data
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = GatewayMetrics(self.registry)
        self._swarm_collector = SwarmCollector(view) if collect_swarm else None
        if self._swarm_collector is not None:
            self.registry.register(self._swarm_collector)
        self.created = int(time.time())
        self._slots = trio.Semaphore(config.max_sessions)
        self._waiting = 0

    def attach(self, model) -> None:
        """Serve generations through `model` (an open AsyncDistributedModelForCausalLM of this
        gateway's model)."""
        from ._chat import stop_token_ids

        if model.tokenizer is None:
            raise LaminaError("this model has no tokenizer: the OpenAI API needs one (text in, text out)")
        self.stop_ids = frozenset(stop_token_ids(model.tokenizer, model.config.eos_token_ids))
        self.tokenizer, self.model = model.tokenizer, model

    def detach(self) -> None:
        """The client closed: generations get 503 until another is attached."""
        self.model = None

    def _model(self):
        """The attached client, or a 503: the missing blocks, else "still connecting"."""
        model = self.model
        if model is None:
            self.check_swarm()
            raise swarm_unavailable("the gateway is connecting to the swarm (every block is served); "
                                    "retry in a moment")
        return model

    # --- checking -----------------------------------------------------------------------
    def prepare(self, request: GenRequest) -> Job:
        """The request's prompt ids and options, or an `ApiError`: unknown model 404, a prompt
        too long for the context 400."""
        if request.model not in self.aliases:
            raise model_not_found(request.model, self.name)
        self._model()
        ids = self._prompt_ids(request)
        room = self.context - len(ids)
        param = "messages" if request.kind == "chat" else "prompt"
        asked = request.sampling.max_tokens
        if asked is None:
            default = self.config.default_max_tokens if request.kind == "chat" else COMPLETION_DEFAULT_MAX_TOKENS
            max_tokens = min(default, room)
        else:
            max_tokens = asked
        if room < 1 or len(ids) + max_tokens > self.context:
            raise bad_request(
                f"This model's maximum context length is {self.context} tokens. However, you requested "
                f"{len(ids) + max(max_tokens, 1)} tokens ({len(ids)} in the {param}, {max(max_tokens, 1)} for the "
                f"completion). Please reduce the length of the {param} or max_tokens.",
                param, "context_length_exceeded")
        options = request.sampling.generate_options()
        return Job(request, ids, max_tokens, options, _request_id(request.kind), int(time.time()))

    def _prompt_ids(self, request: GenRequest) -> list[int]:
        if request.kind == "chat":
            if self.tokenizer.chat_template is None:
                raise bad_request("this model has no chat template: use /v1/completions", "messages")
            try:
                text = self.tokenizer.apply_chat_template(list(request.messages), add_generation_prompt=True)
            except LaminaError as e:       # the template refused the messages
                raise bad_request(str(e), "messages") from None
            return self.tokenizer.encode(text, add_special_tokens=False)
        if isinstance(request.prompt, tuple):
            vocab = self.tokenizer.vocab_size
            if any(t >= vocab for t in request.prompt):
                raise bad_request(f"'prompt' holds token ids beyond the vocabulary ({vocab} tokens)", "prompt")
            return list(request.prompt)
        ids = self.tokenizer.encode(request.prompt, add_special_tokens=True)
        if not ids:
            raise bad_request("'prompt' is empty: give at least one token of text", "prompt")
        return ids

    def missing_blocks(self) -> list[list[int]]:
        """Block ranges of the model that no live node serves now (from the local replica)."""
        now = int(time.time() * 1000)
        covered: set[int] = set()
        for r in self.view.servers(self.model_hash):
            if r.is_live(now):
                covered.update(range(r.start, r.end))
        return block_ranges(b for b in range(self.blocks) if b not in covered)

    def check_swarm(self) -> None:
        """A 503 when the swarm has no full chain, saying which blocks are missing."""
        missing = self.missing_blocks()
        if missing:
            raise swarm_unavailable(
                f"the swarm has no full chain for {self.name}: no node serves "
                f"{describe_missing(missing, self.blocks)}; start run-node --blocks for them")

    # --- running ------------------------------------------------------------------------
    @asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """Hold one of `max_sessions` slots (FIFO); a 429 when `max_queue` requests already wait."""
        if self._slots.value == 0 and self._waiting >= self.config.max_queue:
            raise overloaded(f"the gateway is busy: {self.config.max_sessions} generations run and "
                             f"{self._waiting} requests wait (--max-queue {self.config.max_queue}); retry later")
        self._waiting += 1
        self.metrics.sessions_queued.inc()
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
            self.metrics.sessions_queued.dec()
        try:
            yield
        finally:
            self._slots.release()

    async def generate(self, job: Job, emit: Callable[[str], None]) -> Outcome:
        """Run `job` in an inference session of its own (closed on the nodes when this returns or
        is cancelled), handing each piece of text to `emit` as it comes."""
        model = self._model()
        reply = _ReplyText(self.tokenizer, self.stop_ids, job.request.sampling.stop, emit)
        self.metrics.sessions_open.inc()
        try:
            await model.generate(torch.tensor([job.ids]), max_new_tokens=job.max_tokens,
                                      eos_token_id=sorted(self.stop_ids), streamer=reply, **job.options)
        finally:
            self.metrics.sessions_open.dec()
        finish = "stop" if reply.ended_on_stop else "length"
        return Outcome(finish, len(job.ids), reply.count)

    def close(self) -> None:
        """Take this gateway's metrics off the registry (it may outlive the gateway)."""
        self.metrics.unregister()
        if self._swarm_collector is not None:
            self.registry.unregister(self._swarm_collector)

    def swarm(self) -> dict[str, Any]:
        """`/api/swarm`: the map of this model's swarm from the local replica."""
        data = swarm_map(self.view.state.records(), model_name=self.name, model_hash=self.model_hash,
                         blocks=self.blocks, now_ms=int(time.time() * 1000))
        data["gateway"] = {"peer_id": self.peer_id, "sessions_open": self.config.max_sessions - self._slots.value,
                           "waiting": self._waiting, "max_sessions": self.config.max_sessions,
                           "client": "open" if self.model is not None else "connecting"}
        if self.local is not None:
            data["node"] = self.local()
        return data

    def health(self) -> tuple[int, dict[str, Any]]:
        """`/health`: 200 when a generation can start now (a full chain and an open client)."""
        missing = self.missing_blocks()
        api = "incomplete" if missing else "ready" if self.model is not None else "connecting"
        body: dict[str, Any] = {"ok": api == "ready", "api": api, "missing": missing}
        if self.local is not None:
            body["node"] = self.local()
        return (200 if api == "ready" else 503), body


def _request_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


# --- serving --------------------------------------------------------------------------

def http_config(host: str, port: int):
    """hypercorn's config for one bind address, logging to lamina.gateway.http, no access log."""
    from hypercorn.config import Config

    http = Config()
    http.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    http.accesslog = None
    http.errorlog = logging.getLogger("lamina.gateway.http")
    http.graceful_timeout = 2.0
    return http


def open_client(config: GatewayConfig, initial_peers: Sequence[str]):
    """The lamina client of `config`'s model (`async with` it); `SwarmUnavailableError` when
    the swarm does not cover every block within `connect_timeout`."""
    from ._client import AsyncDistributedModelForCausalLM
    from ._embedded import resolve_model_name

    return AsyncDistributedModelForCausalLM.from_pretrained(
        resolve_model_name(config.model), initial_peers=list(initial_peers), swarm_key=config.swarm_key,
        dtype=config.dtype, connect_timeout=config.connect_timeout, **config.client_options)


async def serve_gateway(config: GatewayConfig, *, registry: CollectorRegistry | None = None,
                        task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
    """Open the client, then serve the HTTP API until cancelled. Ready (``nursery.start``
    returns the bound addresses, e.g. ``["http://127.0.0.1:8000"]``) once the swarm covers every
    block and the port listens; raises `SwarmUnavailableError` when it does not in
    `connect_timeout`."""
    from hypercorn.trio import serve

    from ._gateway_http import create_app

    async with open_client(config, config.initial_peers) as model:
        gateway = Gateway(model.view, ModelFacts.of(config, model.config, model.model_hash), config, registry,
                          peer_id=str(model.host.peer_id))
        gateway.attach(model)
        try:
            async with trio.open_nursery() as nursery:
                binds = await nursery.start(partial(serve, create_app(gateway), http_config(config.host, config.port),
                                                    mode="asgi"))
                log.info("gateway for %s serving %s", gateway.name, " ".join(binds))
                task_status.started(binds)
        finally:
            gateway.close()


async def wait_for_chain(gateway: Gateway, recheck: float = 1.0) -> None:
    """Until the gateway's replica shows a live node for every block (woken by the replica's
    changes; `recheck` bounds the wait for one, as leases also end without one)."""
    while gateway.missing_blocks():
        with trio.move_on_after(recheck):
            await gateway.view.wait_changed()


async def keep_client_attached(gateway: Gateway, initial_peers: Callable[[], Sequence[str]], *,
                               retry: float = 5.0) -> None:
    """Keep a client attached to `gateway` (for `run-node --http-port`): once the replica shows
    a full chain, open one through `initial_peers()` and attach it; when it fails to open or
    closes, log why, detach, wait `retry` seconds and start over. Never raises but
    `trio.Cancelled`: cancel it to stop (the client closes)."""
    from ._errors import SwarmUnavailableError

    while True:
        await wait_for_chain(gateway)
        try:
            async with open_client(gateway.config, initial_peers()) as model:
                gateway.attach(model)
                log.info("gateway client open: /v1 serves %s", gateway.name)
                try:
                    await trio.sleep_forever()
                finally:
                    gateway.detach()
        except SwarmUnavailableError as e:
            log.info("gateway client not open yet: %s (retrying in %g s)", e, retry)
        except Exception:
            log.warning("the gateway client failed (retrying in %g s)", retry, exc_info=True)
        await trio.sleep(retry)
