"""The inference protocol between clients and nodes (and node to node), as typed messages: the
whole client <-> node contract (streams, messages, error codes, node states). The client
(`pipeline/_chain.py`) and the node (`node/_server.py`) both import it; neither imports the other.

Streams (each a `p2p.Session`: framed, heartbeated, every read/write under a deadline):

``/lamina/inference/1``  client -> node, one stream per inference session and node.
    client: OpenSession            node: SessionOpened (or an error frame: BUSY, DRAINING,
                                         BAD_REQUEST; the stream then ends)
    client: Step | Replay | SetNextHop | CloseSession, in any order, one at a time per position
    node:   StepResult for every step it ran (the echo the client keeps for replay; from the last
            node of a chain, the final hidden states), StepFailed for a step it refused, and
            PushFailed when it could not forward a result to its next hop.
``/lamina/push/1``  node -> next node, one stream per session and hop.
    upstream node: PushOpen, then Step...  (the next node answers nothing on this stream; it
    sends its StepResult to the client on the client's own stream)
``/lamina/info/1``  unary: InfoRequest -> NodeInfo (span, model, load; also used as an RTT ping)

A step is `hidden [B, T, D]` at positions ``[position, position + T)``. Session ids are random
128-bit hex strings: knowing one is what lets a peer push steps into that session.

Step ids increase within a session. A node runs a Step whose step_id equals the last one it ran
(a resend after failover: it rewrites the same positions with the same values, idempotent) or is
higher; it silently drops a Step with a LOWER step_id (a stale push from an upstream node that
was replaced, e.g. one that was frozen and woke up). Replay carries the original step ids.

Error codes (`p2p.RemoteError.code` of an error frame, or `StepFailed.code`):

* on OpenSession (error frame, the stream ends): BUSY (no KV memory or session slot now, or the
  node is still starting: try another node), DRAINING, BAD_REQUEST (model fingerprint, blocks
  outside the node's, a duplicate session id);
* on a step (StepFailed, the stream stays usable): BAD_REQUEST (it does not fit the session:
  dtype, shape, position), UNKNOWN_SESSION (a session id other than the stream's), INTERNAL (the
  forward pass failed);
* ending an open session (error frame): IDLE_TIMEOUT; on a push stream, UNKNOWN_SESSION (the
  session is not, or no longer, open there).

Wire formats (`OpenSession.dtype`, parsed by `parse_wire_format`): how a session's hidden states
travel, both ways (client -> node, node -> next node, node -> client).

* ``<dtype>`` (``float32``, ``float16``, ``bfloat16``): every step as that dtype (a node converts
  to and from its compute dtype);
* ``<dtype>+int8:<N>``: the same, except that a step of at least N tokens (a prefill) travels as
  int8 blockwise (`PACKED_DTYPE`): ``[B, T, D + 2 * ceil(D / INT8_BLOCK) + 4 * INT8_OUTLIERS]``
  int8, each token's row its D values quantized by blocks of `INT8_BLOCK` along the hidden dim,
  then one float16 absmax scale per block, then its `INT8_OUTLIERS` largest values apart (int16
  indices, increasing, then float16 values), all little-endian (`pipeline/_wire_format.py`).
  The sender of a step decides by its length: a node packs its output of a step (or replay
  chunk) of at least N tokens; a receiver takes either form of any step. A Replay on such a
  session may carry float32 (every value of either form is exact in float32: the replacement
  gets the values the original node got). A packing a node does not know is refused with
  BAD_REQUEST.

`NodeInfo.state` is the lower-case name of the node's `crdt.ServerState` ("joining", "online",
"draining", "offline"): a client routes only to ONLINE.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

import p2p

INFERENCE_PROTOCOL = "/lamina/inference/1"
PUSH_PROTOCOL = "/lamina/push/1"
INFO_PROTOCOL = "/lamina/info/1"

# Error codes a node sends (error frames on open, `StepFailed.code` on steps).
BUSY = p2p.ErrorCode.BUSY  # no KV memory or session slot left now: try another node
DRAINING = "draining"  # the node is leaving: it takes no new sessions
BAD_REQUEST = p2p.ErrorCode.BAD_REQUEST  # the message does not fit the session (or the node)
UNKNOWN_SESSION = "unknown_session"  # no such session here (closed, idled out, never opened)
IDLE_TIMEOUT = "idle_timeout"  # the session sat idle too long and was closed
INTERNAL = p2p.ErrorCode.INTERNAL  # the forward pass failed unexpectedly
# The state a node reports in `NodeInfo.state` when it takes sessions (crdt.ServerState.ONLINE).
ONLINE = "online"

MAX_BATCH = 64
MAX_LENGTH = 1 << 20
MAX_BLOCK = 4096
MAX_CHUNKS = 4096
HIDDEN_DTYPES = ("float32", "bfloat16", "float16")
PACKED_DTYPE = "int8"  # a step's hidden states in the int8 blockwise packing
INT8_BLOCK = 64  # values per float16 scale in the int8 blockwise packing
INT8_OUTLIERS = 4  # values per token the int8 blockwise packing carries apart, in float16
PACKINGS = ("int8",)  # the packings this version's nodes take (`<dtype>+<packing>:<min tokens>`)
STEP_DTYPES = (*HIDDEN_DTYPES, PACKED_DTYPE)
_SESSION_ID = re.compile(r"^[0-9a-f]{32}$")
_WIRE_FORMAT = re.compile(r"^(float32|bfloat16|float16)(?:\+([a-z][a-z0-9]{0,7}):([1-9][0-9]{0,6}))?$")

__all__ = [
    "INFERENCE_PROTOCOL", "PUSH_PROTOCOL", "INFO_PROTOCOL",
    "BUSY", "DRAINING", "BAD_REQUEST", "UNKNOWN_SESSION", "IDLE_TIMEOUT", "INTERNAL", "ONLINE",
    "MAX_BATCH", "MAX_LENGTH", "MAX_BLOCK", "MAX_CHUNKS", "HIDDEN_DTYPES",
    "PACKED_DTYPE", "INT8_BLOCK", "INT8_OUTLIERS", "PACKINGS", "STEP_DTYPES",
    "new_session_id", "parse_wire_format",
    "OpenSession", "SessionOpened", "Step", "Replay", "StepResult", "StepFailed", "PushFailed",
    "SetNextHop", "CloseSession", "PushOpen", "InfoRequest", "NodeInfo",
]


def new_session_id() -> str:
    return secrets.token_hex(16)


def parse_wire_format(name: str) -> tuple[str, str | None, int | None]:
    """A session's wire format (module docstring) as (dtype, packing, min tokens):
    "float16" -> ("float16", None, None), "float32+int8:64" -> ("float32", "int8", 64). Raises
    `ValueError` for a malformed name; a well-formed packing may still be one a node does not
    know (it refuses the session with BAD_REQUEST)."""
    m = _WIRE_FORMAT.match(name)
    if m is None:
        raise ValueError(f"wire format {name!r} is not one of {HIDDEN_DTYPES}, alone or as "
                         f"<dtype>+<packing>:<min tokens> (e.g. float16+int8:64)")
    dtype, packing, tokens = m.groups()
    return dtype, packing, int(tokens) if tokens is not None else None


def _check_session_id(value: str | None) -> None:
    if value is not None and not _SESSION_ID.match(value):
        raise ValueError("session ids are 32 lowercase hex characters")


def _check_next_hop(msg: "OpenSession | SetNextHop") -> None:
    _check_session_id(msg.session_id)
    _check_session_id(msg.next_session)
    if (msg.next_peer is None) != (msg.next_session is None):
        raise ValueError("next_peer and next_session go together")


@p2p.message("lamina.open")
@dataclass(frozen=True)
class OpenSession(p2p.Message):
    session_id: str = p2p.field(max_len=32)
    model: str = p2p.field(max_len=64)             # the node's model fingerprint must match
    start: int = p2p.field(min_value=0, max_value=MAX_BLOCK)
    end: int = p2p.field(min_value=1, max_value=MAX_BLOCK)
    max_length: int = p2p.field(min_value=1, max_value=MAX_LENGTH)
    batch: int = p2p.field(min_value=1, max_value=MAX_BATCH)
    dtype: str = p2p.field(max_len=32)                # the wire format (module docstring)
    next_peer: str | None = p2p.field(default=None, max_len=128)
    next_session: str | None = p2p.field(default=None, max_len=32)

    def validate(self) -> None:
        _check_next_hop(self)
        if self.start >= self.end:
            raise ValueError(f"span [{self.start}, {self.end}) is empty")
        parse_wire_format(self.dtype)


@p2p.message("lamina.opened")
@dataclass(frozen=True)
class SessionOpened(p2p.Message):
    session_id: str = p2p.field(max_len=32)
    start: int = p2p.field(min_value=0, max_value=MAX_BLOCK)
    end: int = p2p.field(min_value=1, max_value=MAX_BLOCK)
    max_length: int = p2p.field(min_value=1, max_value=MAX_LENGTH)


@p2p.message("lamina.step")
@dataclass(frozen=True)
class Step(p2p.Message):
    """Hidden states entering a node's span. `push`: forward the result to the next hop."""

    session_id: str = p2p.field(max_len=32)
    step_id: int = p2p.field(min_value=0, max_value=2**62)
    position: int = p2p.field(min_value=0, max_value=MAX_LENGTH)
    hidden: p2p.Tensor = p2p.field(dtypes=STEP_DTYPES, ndim=3)
    push: bool = True

    def validate(self) -> None:
        _check_session_id(self.session_id)


@p2p.message("lamina.replay")
@dataclass(frozen=True)
class Replay(p2p.Message):
    """Rebuild a fresh session's cache: run `hidden` [B, sum(chunks), D] from position 0 as the
    original steps did, one chunk after another (same shapes, so bit-identical caches). Chunk k
    is the original step `step_ids[k]`; its result is echoed as a StepResult with that id (and
    pushed on when `push`). On a session with a packing, `hidden` may be float32 (the values
    the original steps carried, in either form, exactly)."""

    session_id: str = p2p.field(max_len=32)
    step_ids: tuple[int, ...] = p2p.field(min_len=1, max_len=MAX_CHUNKS)
    chunks: tuple[int, ...] = p2p.field(min_len=1, max_len=MAX_CHUNKS)
    hidden: p2p.Tensor = p2p.field(dtypes=HIDDEN_DTYPES, ndim=3)
    push: bool = False

    def validate(self) -> None:
        _check_session_id(self.session_id)
        if len(self.step_ids) != len(self.chunks):
            raise ValueError("replay needs one step id per chunk")
        if any(b <= a for a, b in zip(self.step_ids, self.step_ids[1:])):
            raise ValueError("replay step ids must increase")
        if any(c <= 0 for c in self.chunks):
            raise ValueError("replay chunks must be positive lengths")
        if sum(self.chunks) != self.hidden.shape[1]:
            raise ValueError("replay chunks must add up to the hidden states' length")


@p2p.message("lamina.result")
@dataclass(frozen=True)
class StepResult(p2p.Message):
    session_id: str = p2p.field(max_len=32)
    step_id: int = p2p.field(min_value=0, max_value=2**62)
    position: int = p2p.field(min_value=0, max_value=MAX_LENGTH)
    hidden: p2p.Tensor = p2p.field(dtypes=STEP_DTYPES, ndim=3)


@p2p.message("lamina.step_failed")
@dataclass(frozen=True)
class StepFailed(p2p.Message):
    session_id: str = p2p.field(max_len=32)
    step_id: int = p2p.field(min_value=0, max_value=2**62)
    code: str = p2p.field(max_len=32)
    message: str = p2p.field(max_len=1000)


@p2p.message("lamina.push_failed")
@dataclass(frozen=True)
class PushFailed(p2p.Message):
    """The node could not push step `step_id`'s result to `target` (the next hop's session id
    it was pushing to: a report about a hop the client has replaced since is stale)."""

    session_id: str = p2p.field(max_len=32)
    step_id: int = p2p.field(min_value=0, max_value=2**62)
    target: str = p2p.field(max_len=32)
    message: str = p2p.field(max_len=1000)


@p2p.message("lamina.next_hop")
@dataclass(frozen=True)
class SetNextHop(p2p.Message):
    session_id: str = p2p.field(max_len=32)
    next_peer: str | None = p2p.field(default=None, max_len=128)
    next_session: str | None = p2p.field(default=None, max_len=32)

    def validate(self) -> None:
        _check_next_hop(self)


@p2p.message("lamina.close")
@dataclass(frozen=True)
class CloseSession(p2p.Message):
    session_id: str = p2p.field(max_len=32)


@p2p.message("lamina.push_open")
@dataclass(frozen=True)
class PushOpen(p2p.Message):
    session_id: str = p2p.field(max_len=32)

    def validate(self) -> None:
        _check_session_id(self.session_id)


@p2p.message("lamina.info_request")
@dataclass(frozen=True)
class InfoRequest(p2p.Message):
    pass


@p2p.message("lamina.info")
@dataclass(frozen=True)
class NodeInfo(p2p.Message):
    peer_id: str = p2p.field(max_len=128)
    model: str = p2p.field(max_len=64)
    start: int = p2p.field(min_value=0, max_value=MAX_BLOCK)
    end: int = p2p.field(min_value=1, max_value=MAX_BLOCK)
    state: str = p2p.field(max_len=16)
    active_sessions: int = p2p.field(min_value=0)
    free_cache_tokens: int = p2p.field(min_value=0)
    version: str = p2p.field(max_len=32)
