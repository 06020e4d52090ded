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
"""

from __future__ import annotations

import logging
import os
import threading
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator, Sequence

import torch
import trio

import p2p

from ._chain import Chain, ChainConfig, unpushable_pairs
from ._checkpoint import Checkpoint, load_client_head
from ._errors import LaminaError
from ._generation import GenerationConfig, Streamer, agenerate, generate
from ._local import CausalLMOutput
from ._routing import RouteOptions
from ._swarm import SWARM_TOPIC, SwarmView, now_ms
from ._threads import start_thread
from ._tokenizer import Tokenizer

log = logging.getLogger("lamina.client")


class SwarmUnavailableError(LaminaError):
    """The swarm could not be reached, or does not serve this model."""


@dataclass(frozen=True)
class ClientOptions:
    connect_timeout: float = 30.0       # reach a peer and see servers for the model
    chain: ChainConfig = field(default_factory=ChainConfig)
    max_length: int = 2048              # default max_length of implicit sessions (capped by the model)


def _options(kwargs: dict[str, Any]) -> ClientOptions:
    chain_fields = set(ChainConfig.__dataclass_fields__)
    route = RouteOptions(
        allowed_peers=frozenset(kwargs.pop("allowed_servers")) if kwargs.get("allowed_servers") else None,
        blocked_peers=frozenset(kwargs.pop("blocked_servers", None) or ()))
    kwargs.pop("allowed_servers", None)
    chain = ChainConfig(route_options=route, **{k: kwargs.pop(k) for k in list(kwargs) if k in chain_fields})
    opts = ClientOptions(chain=chain, **{k: kwargs.pop(k) for k in list(kwargs)
                                         if k in ("connect_timeout", "max_length")})
    if kwargs:
        raise TypeError(f"unknown option(s): {', '.join(sorted(kwargs))}")
    return opts


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


class AsyncDistributedModelForCausalLM:
    """Trio-native client. Create with `async with ...from_pretrained(...) as model`."""

    def __init__(self, checkpoint: Checkpoint, host: p2p.Host, view: SwarmView, head,
                 options: ClientOptions, dtype: torch.dtype, nursery: trio.Nursery) -> None:
        self.checkpoint, self.config = checkpoint, checkpoint.config
        self.host, self.view, self.head = host, view, head
        self.options, self.dtype, self._nursery = options, dtype, nursery
        self._unpushable = unpushable_pairs()   # shared by this client's sessions
        self.tokenizer = Tokenizer.from_checkpoint(checkpoint.path)
        self.model_hash = checkpoint.model_hash

    @classmethod
    @asynccontextmanager
    async def from_pretrained(cls, name_or_path: str | os.PathLike, *, initial_peers: Sequence[str],
                              device: str = "cpu", dtype: str | torch.dtype = "auto",
                              identity: p2p.Identity | None = None,
                              swarm_key: p2p.SwarmKey | str | os.PathLike | None = None, **options: Any
                              ) -> AsyncIterator["AsyncDistributedModelForCausalLM"]:
        """`swarm_key`: a private swarm's key (a `p2p.SwarmKey`, or the path of its swarm.key
        file; default: the file $LAMINA_SWARM_KEY names, else an open swarm). A bad key file
        raises `p2p.SwarmKeyError`."""
        opts = _options(dict(options))
        if not initial_peers:
            raise SwarmUnavailableError("initial_peers is empty: give at least one multiaddr of the swarm")
        key = resolve_swarm_key(swarm_key)
        checkpoint = Checkpoint(name_or_path)
        head = load_client_head(checkpoint, device, dtype)
        # A swarm on this machine needs no listener beyond loopback; any other gets one on every
        # interface: a hole punch to a node behind a NAT leaves from our listen port.
        local = all("/ip4/127." in a or "/ip6/::1/" in a for a in initial_peers)
        config = p2p.HostConfig(identity=identity or p2p.Identity.generate(),
                                listen_addrs=["/ip4/127.0.0.1/tcp/0" if local else "/ip4/0.0.0.0/tcp/0"],
                                bootstrap_peers=list(initial_peers), dht_mode="client",
                                gossip_topics=[SWARM_TOPIC], swarm_key=key,
                                nat=p2p.NatConfig(enabled=True, reserve=False))
        async with p2p.open_host(config) as host, trio.open_nursery() as nursery:
            view = SwarmView(host)
            await nursery.start(view.serve)
            model = cls(checkpoint, host, view, head, opts, head.dtype, nursery)
            await model._wait_for_servers()
            try:
                yield model
            finally:
                nursery.cancel_scope.cancel()

    async def _wait_for_servers(self) -> None:
        if not self.host.connected_peers():
            # why the first one failed (a swarm key mismatch says so), if it failed rather than timed out
            why = next((f" ({e})" for e in self.host.bootstrap_errors.values()), "")
            raise SwarmUnavailableError(f"could not reach any of initial_peers{why}")
        blocks = self.config.num_hidden_layers
        with trio.move_on_after(self.options.connect_timeout):
            await self.view.wait_until(lambda _state: self._covered(blocks))
            return
        raise SwarmUnavailableError(
            f"the swarm does not serve every block of this model (config hash "
            f"{self.model_hash[:12]}) after {self.options.connect_timeout:.0f} s")

    def _covered(self, blocks: int) -> bool:
        covered: set[int] = set()
        now = now_ms()
        for r in self.view.servers(self.model_hash):
            if r.is_live(now):
                covered.update(range(r.start, r.end))
        return len(covered) >= blocks

    # --- sessions ------------------------------------------------------------------------
    @asynccontextmanager
    async def inference_session(self, max_length: int | None = None, batch: int = 1
                                ) -> AsyncIterator[RemoteSession]:
        max_length = max_length or min(self.options.max_length, self.config.max_position_embeddings)
        if max_length > self.config.max_position_embeddings:
            raise ValueError(f"max_length {max_length} exceeds the model's "
                             f"{self.config.max_position_embeddings} positions")
        chain = Chain(self.host, self.view, self.model_hash, self.config.num_hidden_layers,
                      batch=batch, max_length=max_length, dtype=self.dtype, config=self.options.chain,
                      unpushable=self._unpushable)
        async with trio.open_nursery() as nursery:
            try:
                await chain.open(nursery)
                yield RemoteSession(chain)
            finally:
                with trio.CancelScope(shield=True):
                    await chain.close()
                nursery.cancel_scope.cancel()

    # --- HF-style calls ------------------------------------------------------------------
    async def forward(self, input_ids: torch.Tensor, session: RemoteSession | None = None) -> CausalLMOutput:
        with _clear_errors():
            return await self._forward(input_ids, session)

    async def _forward(self, input_ids: torch.Tensor, session: RemoteSession | None) -> CausalLMOutput:
        ids = _as_batch(input_ids)
        if session is not None:
            run = ids if session.pending is None else torch.cat([session.pending, ids], dim=1)
            hidden = await session.chain.step(self.head.embed(run), session.position)
            session.pending = None
            return CausalLMOutput(self.head.logits(hidden[:, run.shape[1] - ids.shape[1]:]))
        async with self.inference_session(max_length=ids.shape[1], batch=ids.shape[0]) as s:
            hidden = await s.chain.step(self.head.embed(ids), 0)
        return CausalLMOutput(self.head.logits(hidden))

    async def generate(self, input_ids: torch.Tensor | None, *, streamer: Streamer | None = None,
                       session: RemoteSession | None = None, **generation: Any) -> torch.Tensor:
        """HF-style generate. The streamer (and everything else of the caller's) runs on this
        event loop: while it blocks, this client's network I/O waits too, heartbeats included.
        Nodes drop sessions that sent nothing for `p2p.HEARTBEAT_TIMEOUT` (2 s); the client
        then re-opens them on the same nodes and replays, so the tokens are the same, at the
        cost of a replay. Slow work belongs in a thread (or use the synchronous class, whose
        streamer runs in the caller's thread)."""
        with _clear_errors():
            ids, cfg = self._generation_request(input_ids, session, generation)
            if session is None:
                max_length = ids.shape[1] + cfg.max_new_tokens
                async with self.inference_session(max_length=max_length, batch=ids.shape[0]) as s:
                    return await self._generate_in(s, ids, cfg, streamer)
            return await self._generate_in(session, ids, cfg, streamer)

    def _generation_request(self, input_ids: torch.Tensor | None, session: RemoteSession | None,
                            generation: dict[str, Any]) -> tuple[torch.Tensor, GenerationConfig]:
        """The checked ids and options of a generate call."""
        cfg = GenerationConfig.build(self.config.eos_token_ids, self.tokenizer, **generation)
        if input_ids is None:
            # continue a session from the token its last generate call produced
            if session is None or session.pending is None:
                raise ValueError("input_ids=None continues an inference session; there is none to continue")
            return session.pending[:, :0], cfg
        return _as_batch(input_ids), cfg

    @staticmethod
    def _session_input(session: RemoteSession, ids: torch.Tensor, cfg: GenerationConfig) -> tuple[torch.Tensor, int]:
        """What a generate call on `session` runs first (the pending token, then `ids`), and at
        which position."""
        run = ids if session.pending is None else torch.cat([session.pending, ids], dim=1)
        start = session.position
        if start + run.shape[1] + cfg.max_new_tokens > session.chain.max_length + 1:
            raise ValueError(f"the session's max_length {session.chain.max_length} is too short "
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
    raise TypeError(f"swarm_key must be a p2p.SwarmKey or a path, not {type(swarm_key).__name__}")


def _as_batch(input_ids: torch.Tensor) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor):
        input_ids = torch.tensor(input_ids)
    ids = input_ids[None] if input_ids.dim() == 1 else input_ids
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, tokens] with at least one token, got {list(ids.shape)}")
    return ids.long()


class _TrioThread:
    """A trio event loop on a daemon thread; sync code submits coroutines to it."""

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self.nursery: trio.Nursery | None = None
        self._thread = start_thread(self._main, "lamina-client")
        self._ready.wait()

    def _main(self) -> None:
        try:
            trio.run(self._amain)
        except BaseException as e:  # surfaced to the caller of run()
            self._error = e
            self._ready.set()

    async def _amain(self) -> None:
        self.token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            self._ready.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    def start_task(self, afn) -> None:
        """`nursery.start(afn)` on the loop thread: returns once `afn` called
        `task_status.started()`; an error before that is raised as itself, not as a group
        (`run` unwraps it)."""

        async def start() -> None:
            assert self.nursery is not None
            await self.nursery.start(afn)

        self.run(start)

    def run(self, afn, *args):
        if self.token is None:
            raise RuntimeError("the client's event loop is not running") from self._error
        with _clear_errors():
            return trio.from_thread.run(afn, *args, trio_token=self.token)

    def stop(self) -> None:
        if self.token is not None and self._stop is not None:
            try:
                trio.from_thread.run_sync(self._stop.set, trio_token=self.token)
            except trio.RunFinishedError:
                pass
        self._thread.join(timeout=10)


class DistributedModelForCausalLM:
    """Synchronous client: `from_pretrained(...)`, `model(ids).logits`, `generate`,
    `inference_session`, `close` (or use it as a context manager)."""

    def __init__(self, runner: _TrioThread, model: AsyncDistributedModelForCausalLM, stop) -> None:
        self._runner, self._model, self._stop_model = runner, model, stop
        self._active: RemoteSession | None = None
        self.config, self.tokenizer, self.head = model.config, model.tokenizer, model.head

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, initial_peers: Sequence[str],
                        swarm_key: p2p.SwarmKey | str | os.PathLike | None = None,
                        **options: Any) -> "DistributedModelForCausalLM":
        """See `AsyncDistributedModelForCausalLM.from_pretrained` (`swarm_key`: a private
        swarm's key or the path of its swarm.key file)."""
        swarm_key = resolve_swarm_key(swarm_key)  # a bad key file fails here, before any thread
        runner = _TrioThread()
        ready: dict[str, Any] = {}

        async def keep_open(task_status=trio.TASK_STATUS_IGNORED) -> None:
            stop = trio.Event()
            async with AsyncDistributedModelForCausalLM.from_pretrained(
                    name_or_path, initial_peers=initial_peers, swarm_key=swarm_key, **options) as model:
                ready["model"], ready["stop"] = model, stop
                task_status.started()
                await stop.wait()

        try:
            runner.start_task(keep_open)
        except BaseException:
            runner.stop()
            raise
        return cls(runner, ready["model"], ready["stop"])

    @property
    def route(self):
        return self._active.route if self._active else None

    def __call__(self, input_ids: torch.Tensor) -> CausalLMOutput:
        return self._runner.run(lambda: self._model.forward(input_ids, self._active))

    def generate(self, input_ids: torch.Tensor | None, *, streamer: Streamer | None = None,
                 session: RemoteSession | None = None, **generation: Any) -> torch.Tensor:
        """HF-style generate. With a streamer, the generation loop (embeddings, LM head,
        sampling, the streamer) runs in the caller's thread and only the steps through the
        swarm run on the client's event loop, which keeps the sessions alive however long the
        streamer takes (a thread hop per step: 0.2-0.3 ms on this VM). Without one, nothing of
        the caller's runs during the call, and the whole loop runs on the event loop."""
        session = session or self._active
        model = self._model
        ids, cfg = model._generation_request(input_ids, session, generation)
        if session is None:
            with self.inference_session(max_length=ids.shape[1] + cfg.max_new_tokens, batch=ids.shape[0]) as s:
                return self._generate_in(s, ids, cfg, streamer)
        return self._generate_in(session, ids, cfg, streamer)

    def _generate_in(self, session: RemoteSession, ids: torch.Tensor, cfg: GenerationConfig,
                     streamer: Streamer | None) -> torch.Tensor:
        model = self._model
        if streamer is None:  # no user code to run: the whole loop on the event loop (no hop per step)
            return self._runner.run(model._generate_in, session, ids, cfg, None)
        run, start = model._session_input(session, ids, cfg)

        def step(hidden: torch.Tensor, position: int) -> torch.Tensor:
            return self._runner.run(session.chain.step, hidden, position)

        out = generate(step, model.head, run, cfg, streamer, start=start)
        return model._session_output(session, ids, run, out)

    def chat(self, messages, max_new_tokens: int = 256, streamer=None, **options) -> str:
        """The assistant's reply to `messages` through the model's chat template; see
        `pipeline._chat.chat` (`streamer(text)` gets text chunks as they come)."""
        from ._chat import chat

        return chat(self, messages, max_new_tokens=max_new_tokens, streamer=streamer, **options)

    @contextmanager
    def inference_session(self, max_length: int | None = None, batch: int = 1) -> Iterator[RemoteSession]:
        holder: dict[str, Any] = {}

        async def keep(task_status=trio.TASK_STATUS_IGNORED) -> None:
            done = trio.Event()
            async with self._model.inference_session(max_length, batch) as session:
                holder["session"], holder["done"] = session, done
                task_status.started()
                await done.wait()

        self._runner.start_task(keep)
        previous, self._active = self._active, holder["session"]
        try:
            yield holder["session"]
        finally:
            self._active = previous
            self._runner.run(_set_async, holder["done"])

    def close(self) -> None:
        if self._runner is None:
            return
        try:
            self._runner.run(_set_async, self._stop_model)
        except trio.RunFinishedError:
            pass
        self._runner.stop()
        self._runner = None

    def __enter__(self) -> "DistributedModelForCausalLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


async def _set_async(event: trio.Event) -> None:
    event.set()


@contextmanager
def _clear_errors() -> Iterator[None]:
    """What the client's calls raise: one exception, never a trio `ExceptionGroup` (a nursery
    wraps whatever crosses it), and a failure of the network as a `LaminaError` saying so."""
    try:
        yield
    except BaseExceptionGroup as group:  # noqa: F821 - py3.11 builtin
        leaves = _leaves(group)
        chosen = next((e for e in leaves if isinstance(e, LaminaError)), None) \
            or next((e for e in leaves if not isinstance(e, trio.Cancelled)), leaves[0])
        err = _as_client_error(chosen)
        raise err from err.__cause__  # its own cause (a wrapped P2PError's is that error), not the group
    except p2p.P2PError as e:
        raise _as_client_error(e) from e


def _leaves(group: BaseException) -> list[BaseException]:
    if isinstance(group, BaseExceptionGroup):  # noqa: F821
        return [leaf for e in group.exceptions for leaf in _leaves(e)]
    return [group]


def _as_client_error(exc: BaseException) -> BaseException:
    if isinstance(exc, p2p.P2PError):
        err = SwarmUnavailableError(f"the swarm connection failed: {exc}")
        err.__cause__ = exc
        return err
    return exc
