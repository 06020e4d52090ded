"""The client library, Hugging Face style.

    from pipeline import DistributedModelForCausalLM
    with DistributedModelForCausalLM.from_pretrained(path, initial_peers=[...]) as model:
        out = model.generate(input_ids, max_new_tokens=32)
        logits = model(input_ids).logits
        with model.inference_session(max_length=256) as session:
            a = model.generate(prompt, max_new_tokens=8, session=session)
            b = model.generate(more_ids, max_new_tokens=8, session=session)   # continues

The client loads only the embeddings, final norm and LM head; every block runs on the swarm.
`AsyncDistributedModelForCausalLM` is the trio-native API; `DistributedModelForCausalLM`
runs it on a dedicated trio thread, so it works from plain scripts and from Jupyter (where an
event loop is already running in the caller's thread).

Every error a public call raises is one `LaminaError` (never a trio `ExceptionGroup`): the
swarm's failures as `SwarmUnavailableError`, `NoReplacementError` ..., bad arguments as
`InvalidOptionError` / `UnknownOptionError` / `InvalidInputError` (also ValueError and
TypeError), a closed model as `ModelClosedError` (see `pipeline._bridge`).
"""

from __future__ import annotations

import logging
import os
from contextlib import AsyncExitStack, ExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, AsyncContextManager, AsyncIterator, Iterator, Sequence

import torch
import trio

import p2p

from ._bridge import Held, TrioThread, clear_errors, cleared
from ._chain import Chain, ChainConfig, unpushable_pairs
from ._spotcheck import SpotCheckStats
from ._checkpoint import Checkpoint, load_client_head
from ._errors import (CacheError, InvalidInputError, InvalidOptionError, LaminaError,
                      ModelClosedError, SpotCheckError, SwarmUnavailableError, UnknownOptionError)
from ._generation import GenerationConfig, Redo, Streamer, agenerate, generate
from ._genconfig import read_generation_config
from ._inputs import Padding, as_batch
from ._local import CausalLMOutput, pick_dtype
from ._routing import RouteOptions
from ._streamers import telling
from ._swarm import SWARM_TOPIC, SwarmView, now_ms
from ._tokenizer import Tokenizer

log = logging.getLogger("lamina.client")

__all__ = ["AsyncDistributedModelForCausalLM", "DistributedModelForCausalLM", "RemoteSession",
           "SwarmUnavailableError", "ClientOptions", "resolve_swarm_key"]


@dataclass(frozen=True)
class ClientOptions:
    connect_timeout: float = 30.0       # reach a peer and see servers for the model
    chain: ChainConfig = field(default_factory=ChainConfig)
    max_length: int = 2048              # default max_length of implicit sessions (capped by the model)


def _options(kwargs: dict[str, Any]) -> ClientOptions:
    chain_fields = set(ChainConfig.__dataclass_fields__) - {"route_options", "spot_check_stats"}
    unknown = set(kwargs) - chain_fields - {"allowed_servers", "blocked_servers", "connect_timeout", "max_length"}
    if unknown:
        raise UnknownOptionError(
            f"unknown option(s) for from_pretrained: {', '.join(sorted(unknown))} (it takes device, dtype or "
            f"torch_dtype, identity, swarm_key, allowed_servers, blocked_servers, connect_timeout, max_length, "
            f"{', '.join(sorted(chain_fields))})")
    route = RouteOptions(
        allowed_peers=frozenset(kwargs.pop("allowed_servers")) if kwargs.get("allowed_servers") else None,
        blocked_peers=frozenset(kwargs.pop("blocked_servers", None) or ()))
    kwargs.pop("allowed_servers", None)
    chain = ChainConfig(route_options=route, **{k: kwargs.pop(k) for k in list(kwargs) if k in chain_fields})
    return ClientOptions(chain=chain, **kwargs)


def _initial_peers(initial_peers: Sequence[str] | str | None) -> list[str]:
    """The checked multiaddrs of `initial_peers` (one string is one address)."""
    from p2p._addrs import parse_tcp_addr

    if isinstance(initial_peers, str):
        initial_peers = [initial_peers]
    if not initial_peers:
        raise SwarmUnavailableError("initial_peers is empty: give the multiaddr of at least one node of the "
                                    "swarm (run-node prints it: 'serving blocks A:B /ip4/.../p2p/...')")
    peers = []
    for addr in initial_peers:
        if not isinstance(addr, str):
            raise InvalidOptionError(f"initial_peers must be multiaddr strings, got {addr!r}")
        try:
            parse_tcp_addr(addr, what="initial_peers", peer="must")
        except ValueError as e:
            raise InvalidOptionError(f"{e} (a peer's address looks like /ip4/<ip>/tcp/<port>/p2p/<peer id>)") from None
        peers.append(addr)
    return peers


def _unreachable(errors: dict[str, BaseException], peers: list[str]) -> str:
    """One sentence on why no initial peer could be reached."""
    if not errors:
        return f"could not reach any of initial_peers ({', '.join(peers)})"
    from p2p._pnet import dial_failure

    addr, exc = next(iter(errors.items()))
    why = dial_failure(exc.__cause__) if exc.__cause__ is not None else str(exc)
    others = len(peers) - 1
    more = f" and {others} other{'s' if others > 1 else ''}" if others else ""
    return f"could not reach any of initial_peers ({addr}{more}): {why}"


def _ranges(blocks: list[int]) -> str:
    """[1, 2, 3, 7] -> "[1, 4), [7, 8)"."""
    out: list[list[int]] = []
    for b in blocks:
        if out and out[-1][1] == b:
            out[-1][1] = b + 1
        else:
            out.append([b, b + 1])
    return ", ".join(f"[{a}, {b})" for a, b in out)


class RemoteSession:
    """Server-side caches kept across calls: a chain through the swarm plus where it stands."""

    def __init__(self, chain: Chain) -> None:
        self.chain = chain
        self.pending: torch.Tensor | None = None     # generated tokens not yet run through the blocks

    @property
    def position(self) -> int:
        return self.chain.position

    @property
    def route(self):
        return self.chain.route


def rows_step(sessions: Sequence[RemoteSession], padding: Padding):
    """An async step over a padded batch: row i through its own session (`pipeline._inputs`),
    all rows at once (the nodes batch their steps)."""
    async def step(hidden: torch.Tensor, position: int) -> torch.Tensor:
        rows = padding.split(hidden, position)
        outs: list[Any] = [None] * len(rows)

        async def one(i: int) -> None:
            outs[i] = await sessions[i].chain.step(*rows[i])

        async with trio.open_nursery() as nursery:
            for i in range(len(rows)):
                nursery.start_soon(one, i)
        return padding.merge(outs, hidden, position)

    return step


def _refuse_padding_in(session: RemoteSession | None) -> None:
    if session is not None:
        raise InvalidInputError("a padded batch (an attention_mask with zeros) runs each row in a session "
                                "of its own, so it cannot run inside an inference session")


class AsyncDistributedModelForCausalLM:
    """Trio-native client. Create with `async with ...from_pretrained(...) as model`."""

    def __init__(self, checkpoint: Checkpoint, host: p2p.Host, view: SwarmView, head,
                 options: ClientOptions, dtype: torch.dtype, nursery: trio.Nursery) -> None:
        self.checkpoint, self.config = checkpoint, checkpoint.config
        self.host, self.view, self.head = host, view, head
        self.options, self.dtype, self._nursery = options, dtype, nursery
        self._unpushable = unpushable_pairs()   # shared by this client's sessions
        self.tokenizer = Tokenizer.from_checkpoint(checkpoint.path)
        self.generation_defaults = read_generation_config(checkpoint)   # generation_config.json
        self.model_hash = checkpoint.model_hash

    @property
    def spot_check_stats(self) -> SpotCheckStats:
        """What this client's spot checks did (`spot_check=` option): steps and hops checked,
        mismatches, the nodes found faulty (never routed through again) and why."""
        return self.options.chain.spot_check_stats

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, initial_peers: Sequence[str] | None = None,
                        device: str = "cpu", dtype: str | torch.dtype | None = None,
                        torch_dtype: str | torch.dtype | None = None, identity: p2p.Identity | None = None,
                        swarm_key: p2p.SwarmKey | str | os.PathLike | None = None, **options: Any
                        ) -> AsyncContextManager["AsyncDistributedModelForCausalLM"]:
        """`async with` it. `dtype` (or `torch_dtype`, transformers' name): "auto" (the
        checkpoint's), float32, bfloat16, float16. `swarm_key`: a private swarm's key (a
        `p2p.SwarmKey`, or the path of its swarm.key file; default: the file
        $LAMINA_SWARM_KEY names, else an open swarm); a bad key file raises `p2p.SwarmKeyError`.
        `wire_format`: how hidden states travel: "model" (the default: in `dtype`), "float16",
        "bfloat16", "float32", "int8" (steps of 64 tokens or more int8 blockwise, the others in
        `dtype`), "int8:N", or "<dtype>+int8[:N]" (see `pipeline._wire_format`)."""
        return cleared(cls._open(name_or_path, initial_peers, device, pick_dtype(dtype, torch_dtype),
                                 identity, swarm_key, options))

    @classmethod
    @asynccontextmanager
    async def _open(cls, name_or_path, initial_peers, device, dtype, identity, swarm_key, options):
        opts = _options(dict(options))
        peers = _initial_peers(initial_peers)
        key = resolve_swarm_key(swarm_key)
        checkpoint = Checkpoint(name_or_path)
        head = load_client_head(checkpoint, device, dtype)
        # A swarm on this machine needs no listener beyond loopback; any other gets one on every
        # interface: a hole punch to a node behind a NAT leaves from our listen port.
        local = all("/ip4/127." in a or "/ip6/::1/" in a for a in peers)
        config = p2p.HostConfig(identity=identity or p2p.Identity.generate(),
                                listen_addrs=["/ip4/127.0.0.1/tcp/0" if local else "/ip4/0.0.0.0/tcp/0"],
                                bootstrap_peers=peers, dht_mode="client",
                                gossip_topics=[SWARM_TOPIC], swarm_key=key,
                                nat=p2p.NatConfig(enabled=True, reserve=False))
        async with p2p.open_host(config) as host, trio.open_nursery() as nursery:
            view = SwarmView(host)
            await nursery.start(view.serve)
            model = cls(checkpoint, host, view, head, opts, head.dtype, nursery)
            await model._wait_for_servers(peers)
            try:
                yield model
            finally:
                nursery.cancel_scope.cancel()

    async def _wait_for_servers(self, peers: list[str]) -> None:
        if not self.host.connected_peers():
            raise SwarmUnavailableError(_unreachable(self.host.bootstrap_errors, peers))
        blocks = self.config.num_hidden_layers
        timeout = self.options.connect_timeout
        with trio.move_on_after(timeout):
            await self.view.wait_until(lambda _state: not self._missing(blocks))
            return
        missing = self._missing(blocks)
        raise SwarmUnavailableError(
            f"no node of the swarm serves block{'s' if len(missing) > 1 else ''} {_ranges(missing)} of this "
            f"model's {blocks} (model hash {self.model_hash[:12]}) after {timeout:g} s; start run-node "
            f"--blocks for them, or check that the nodes run the same model")

    def _missing(self, blocks: int) -> list[int]:
        covered: set[int] = set()
        now = now_ms()
        for r in self.view.servers(self.model_hash):
            if r.is_live(now):
                covered.update(range(r.start, r.end))
        return [b for b in range(blocks) if b not in covered]

    # --- sessions ------------------------------------------------------------------------
    def inference_session(self, max_length: int | None = None, batch: int = 1
                          ) -> AsyncContextManager[RemoteSession]:
        """`async with` it: server-side caches for `batch` rows of up to `max_length` positions."""
        return cleared(self._session(max_length, batch))

    @asynccontextmanager
    async def _session(self, max_length: int | None, batch: int) -> AsyncIterator[RemoteSession]:
        limit = self.config.max_position_embeddings
        max_length = max_length or min(self.options.max_length, limit)
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
            raise CacheError(f"max_length must be an integer >= 1, got {max_length!r}")
        if max_length > limit:
            raise CacheError(f"{max_length} positions (the prompt plus the new tokens, or an inference "
                             f"session's max_length) exceed the model's {limit}")
        if not isinstance(batch, int) or batch < 1:
            raise CacheError(f"batch must be an integer >= 1, got {batch!r}")
        chain = Chain(self.host, self.view, self.model_hash, self.config.num_hidden_layers,
                      batch=batch, max_length=max_length, dtype=self.dtype, config=self.options.chain,
                      unpushable=self._unpushable, hidden_size=self.config.hidden_size)
        async with trio.open_nursery() as nursery:
            try:
                await chain.open(nursery)
                yield RemoteSession(chain)
            finally:
                with trio.CancelScope(shield=True):
                    await chain.close()
                nursery.cancel_scope.cancel()

    # --- HF-style calls ------------------------------------------------------------------
    async def forward(self, input_ids: torch.Tensor, session: RemoteSession | None = None,
                      attention_mask: torch.Tensor | None = None) -> CausalLMOutput:
        with clear_errors():
            return await self._forward(input_ids, session, attention_mask)

    async def _forward(self, input_ids: torch.Tensor, session: RemoteSession | None,
                       attention_mask: torch.Tensor | None) -> CausalLMOutput:
        ids = as_batch(input_ids)
        padding = Padding.of(attention_mask, ids, generating=False)
        if padding is not None:
            _refuse_padding_in(session)
            async with AsyncExitStack() as stack:
                sessions = [await stack.enter_async_context(self._session(n, 1)) for n in padding.lengths]
                hidden = await rows_step(sessions, padding)(self.head.embed(ids), 0)
            return CausalLMOutput(padding.mask_logits(self.head.logits(hidden).clone()))
        if session is not None:
            run = ids if session.pending is None else torch.cat([session.pending, ids], dim=1)
            try:
                hidden = await session.chain.step(self.head.embed(run), session.position)
            except Redo as e:
                raise SpotCheckError(f"node {e.peer} returned wrong outputs from position {e.position}, before "
                                     f"this call: what earlier calls on this session returned may be wrong "
                                     f"(the session now runs without that node)") from None
            session.pending = None
            return CausalLMOutput(self.head.logits(hidden[:, run.shape[1] - ids.shape[1]:]))
        async with self._session(ids.shape[1], ids.shape[0]) as s:
            hidden = await s.chain.step(self.head.embed(ids), 0)
        return CausalLMOutput(self.head.logits(hidden))

    async def generate(self, input_ids: torch.Tensor | None = None, *, streamer: Streamer | None = None,
                       session: RemoteSession | None = None, attention_mask: torch.Tensor | None = None,
                       **generation: Any) -> torch.Tensor:
        """HF-style generate (options: see `pipeline._generation`; a left-padded batch with its
        `attention_mask` gives each row the tokens it gets alone). The streamer (and everything
        else of the caller's) runs on this event loop: while it blocks, this client's network
        I/O waits too, heartbeats included. Nodes drop sessions that sent nothing for
        `p2p.HEARTBEAT_TIMEOUT` (2 s); the client then re-opens them on the same nodes and
        replays, so the tokens are the same, at the cost of a replay. Slow work belongs in a
        thread (or use the synchronous class, whose streamer runs in the caller's thread)."""
        with telling(streamer), clear_errors():
            ids, cfg = self._generation_request(input_ids, session, generation)
            padding = Padding.of(attention_mask, ids, generating=True)
            if padding is not None:
                _refuse_padding_in(session)
                async with AsyncExitStack() as stack:
                    sessions = [await stack.enter_async_context(self._session(n + cfg.max_new_tokens, 1))
                                for n in padding.lengths]
                    return await agenerate(rows_step(sessions, padding), self.head, ids, cfg, streamer)
            if session is None:
                max_length = ids.shape[1] + cfg.max_new_tokens
                async with self._session(max_length, ids.shape[0]) as s:
                    return await self._generate_in(s, ids, cfg, streamer)
            return await self._generate_in(session, ids, cfg, streamer)

    def _generation_request(self, input_ids: Any, session: RemoteSession | None,
                            generation: dict[str, Any]) -> tuple[torch.Tensor, GenerationConfig]:
        """The checked ids and options of a generate call."""
        if input_ids is None:
            input_ids = generation.pop("inputs", None)    # transformers' name of the first argument
        if input_ids is None:
            # continue a session from the token its last generate call produced
            if session is None or session.pending is None:
                raise InvalidInputError("input_ids=None continues an inference session; there is none to continue")
            ids = session.pending[:, :0]
        else:
            ids = as_batch(input_ids)
        cfg = GenerationConfig.build(self.config.eos_token_ids, self.tokenizer, prompt_length=ids.shape[1],
                                     model_defaults=self.generation_defaults, **generation)
        return ids, cfg

    @staticmethod
    def _session_input(session: RemoteSession, ids: torch.Tensor, cfg: GenerationConfig) -> tuple[torch.Tensor, int]:
        """What a generate call on `session` runs first (the pending token, then `ids`), and at
        which position."""
        run = ids if session.pending is None else torch.cat([session.pending, ids], dim=1)
        start = session.position
        if start + run.shape[1] + cfg.max_new_tokens > session.chain.max_length + 1:
            raise CacheError(f"the session's max_length {session.chain.max_length} is too short "
                             f"for {start} + {run.shape[1]} + {cfg.max_new_tokens} tokens")
        return run, start

    @staticmethod
    def _session_output(session: RemoteSession, ids: torch.Tensor, run: torch.Tensor,
                        out: torch.Tensor) -> torch.Tensor:
        # the last token generated has not been run through the blocks yet (and with
        # max_new_tokens=0, nothing has): it opens the next call on this session
        session.pending = out[:, -1:] if out.shape[1] > run.shape[1] else run
        return out[:, run.shape[1] - ids.shape[1]:]

    async def _generate_in(self, session: RemoteSession, ids: torch.Tensor, cfg: GenerationConfig,
                           streamer: Streamer | None) -> torch.Tensor:
        run, start = self._session_input(session, ids, cfg)
        out = await agenerate(session.chain.step, self.head, run, cfg, streamer, start=start)
        return self._session_output(session, ids, run, out)


SWARM_KEY_ENV = "LAMINA_SWARM_KEY"  # the swarm key file's path when the caller gives none


def resolve_swarm_key(swarm_key: p2p.SwarmKey | str | os.PathLike | None) -> p2p.SwarmKey | None:
    """A `SwarmKey` as given, loaded from a path, or from the file $LAMINA_SWARM_KEY names; None
    for an open swarm. Raises `p2p.SwarmKeyError` for a missing or bad key file."""
    if isinstance(swarm_key, p2p.SwarmKey):
        return swarm_key
    if swarm_key is None:
        path = os.environ.get(SWARM_KEY_ENV) or None
        if path is None:
            return None
        try:
            return p2p.SwarmKey.load(path)
        except p2p.SwarmKeyError as exc:
            raise p2p.SwarmKeyError(f"${SWARM_KEY_ENV}: {exc}") from None
    if isinstance(swarm_key, (str, os.PathLike)):
        return p2p.SwarmKey.load(swarm_key)
    raise InvalidOptionError(f"swarm_key must be a p2p.SwarmKey or a path, not {type(swarm_key).__name__}")


class DistributedModelForCausalLM:
    """Synchronous client: `from_pretrained(...)`, `model(ids).logits`, `generate`,
    `inference_session`, `chat`, `close` (or use it as a context manager)."""

    def __init__(self, runner: TrioThread, held: Held) -> None:
        self._runner: TrioThread | None = runner
        self._held = held                        # the async model, open on the runner's loop
        self._model: AsyncDistributedModelForCausalLM = held.value
        self._active: RemoteSession | None = None
        model = self._model
        self.config, self.tokenizer, self.head = model.config, model.tokenizer, model.head
        self.generation_defaults = model.generation_defaults

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, initial_peers: Sequence[str] | None = None,
                        swarm_key: p2p.SwarmKey | str | os.PathLike | None = None,
                        **options: Any) -> "DistributedModelForCausalLM":
        """See `AsyncDistributedModelForCausalLM.from_pretrained` (`swarm_key`: a private
        swarm's key or the path of its swarm.key file)."""
        swarm_key = resolve_swarm_key(swarm_key)  # a bad key file fails here, before any thread
        runner = TrioThread()
        try:
            held = Held(runner, lambda: AsyncDistributedModelForCausalLM.from_pretrained(
                name_or_path, initial_peers=initial_peers, swarm_key=swarm_key, **options))
        except BaseException:
            runner.stop()
            raise
        return cls(runner, held)

    def _open(self) -> TrioThread:
        """The runner, while the model is open and its connection to the swarm lives."""
        if self._runner is None:
            raise ModelClosedError("this model was closed: load it again with from_pretrained")
        if self._held.ended:
            raise SwarmUnavailableError(f"the client's connection to the swarm ended: {self._held.error}") \
                from self._held.error
        return self._runner

    @property
    def route(self):
        return self._active.route if self._active else None

    @property
    def spot_check_stats(self) -> SpotCheckStats:
        return self._model.spot_check_stats

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> CausalLMOutput:
        return self._open().run(self._model.forward, input_ids, self._active, attention_mask)

    def generate(self, input_ids: torch.Tensor | None = None, *, streamer: Streamer | None = None,
                 session: RemoteSession | None = None, attention_mask: torch.Tensor | None = None,
                 **generation: Any) -> torch.Tensor:
        """HF-style generate. With a streamer, the generation loop (embeddings, LM head,
        sampling, the streamer) runs in the caller's thread and only the steps through the
        swarm run on the client's event loop, which keeps the sessions alive however long the
        streamer takes (a thread hop per step: 0.2-0.3 ms on this VM). Without one, nothing of
        the caller's runs during the call, and the whole loop runs on the event loop."""
        runner = self._open()
        session = session or self._active
        if streamer is None:   # no user code to run: the whole loop on the event loop (no hop per step)
            return runner.run(partial(self._model.generate, input_ids, session=session,
                                      attention_mask=attention_mask, **generation))
        with telling(streamer):
            model = self._model
            ids, cfg = model._generation_request(input_ids, session, generation)
            padding = Padding.of(attention_mask, ids, generating=True)
            if padding is not None:
                _refuse_padding_in(session)
                with ExitStack() as stack:
                    sessions = [stack.enter_context(self._hold_session(n + cfg.max_new_tokens, 1))
                                for n in padding.lengths]
                    step = rows_step(sessions, padding)
                    return generate(lambda h, p: runner.run(step, h, p), model.head, ids, cfg, streamer)
            if session is None:
                with self._hold_session(ids.shape[1] + cfg.max_new_tokens, ids.shape[0]) as s:
                    return self._generate_in(s, ids, cfg, streamer)
            return self._generate_in(session, ids, cfg, streamer)

    def _generate_in(self, session: RemoteSession, ids: torch.Tensor, cfg: GenerationConfig,
                     streamer: Streamer) -> torch.Tensor:
        model, runner = self._model, self._open()
        run, start = model._session_input(session, ids, cfg)

        def step(hidden: torch.Tensor, position: int) -> torch.Tensor:
            return runner.run(session.chain.step, hidden, position)

        out = generate(step, model.head, run, cfg, streamer, start=start)
        return model._session_output(session, ids, run, out)

    def chat(self, messages, max_new_tokens: int = 256, streamer=None, **options) -> str:
        """The assistant's reply to `messages` through the model's chat template; see
        `pipeline._chat.chat` (`streamer(text)` gets text chunks as they come)."""
        from ._chat import chat

        self._open()
        return chat(self, messages, max_new_tokens=max_new_tokens, streamer=streamer, **options)

    @contextmanager
    def inference_session(self, max_length: int | None = None, batch: int = 1) -> Iterator[RemoteSession]:
        """Server-side caches kept across calls: `generate` and `model(ids)` inside the block
        continue it (see the module docstring)."""
        with self._hold_session(max_length, batch) as session:
            previous, self._active = self._active, session
            try:
                yield session
            finally:
                self._active = previous

    @contextmanager
    def _hold_session(self, max_length: int | None, batch: int) -> Iterator[RemoteSession]:
        held = Held(self._open(), lambda: self._model.inference_session(max_length, batch))
        try:
            yield held.value
        except BaseException:
            try:
                held.leave()
            except LaminaError as e:     # the body's error is the one to report
                log.info("closing an inference session after an error: %s", e)
            raise
        held.leave()

    def close(self) -> None:
        """Close the sessions and the connection to the swarm. Closing a client whose swarm is
        gone is not an error: what goes wrong while closing is logged, not raised."""
        if self._runner is None:
            return
        runner, self._runner = self._runner, None
        try:
            self._held.leave()
        except LaminaError as e:
            log.info("closing the client: %s", e)
        finally:
            runner.stop()

    def __enter__(self) -> "DistributedModelForCausalLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
