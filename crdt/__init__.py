"""lamina.crdt: the replicated map of who serves what, as pure, I/O-free values.

Every peer holds a `SwarmState`: peer id -> `SignedRecord` (a `ServerRecord` signed by that peer's
libp2p Ed25519 key), last writer wins by `(hlc, peer id)`. Only a peer's own key can write its
entry; forged, expired, far-future, oversized and malformed records are refused at merge with a
`Rejection` (reason + detail) in `MergeResult.rejected`.

Announcing (node side)::

    clock = HybridClock(max_skew_ms=state.config.max_skew_ms)
    signer = Signer(identity_private_key_bytes)          # 32-byte seed or libp2p 64-byte form
    rec = ServerRecord(peer_id=signer.peer_id, model=ModelId.from_config(name, cfg), start=0,
                       end=16, state=ServerState.ONLINE, hlc=clock.now(wall_ms),
                       expires_ms=wall_ms + 60_000, ...)
    state = state.merge([signer.sign(rec)], now_ms=wall_ms).state

Anti-entropy (see `_sync.py` for the hash tree, the protocol and the wire format)::

    d = digest(state_a)                     # 2 KiB whatever the swarm size
    reply = sync(d, state_b)                # Delta or None
    while reply is not None:                # the receiver merges, then answers
        result = receiver_state.merge(reply, now_ms=now)
        reply = sync(reply, result.state)   # at most 5 messages per exchange in all

A restarted node should `clock.update(state.get(signer.peer_id).hlc, wall_ms)` before signing, and
keep leases non-decreasing (an OFFLINE record's lease at least as long as the last ONLINE one), so
a graceful leave shadows every older record until `gc` collects it.

Messages go on the wire with `encode_message` / `decode_message` (strict, size-limited); single
records with `SignedRecord.wire` / `decode_record`. Wall time is always passed in (`now_ms`,
`wall_ms`), so tests and the gossip simulation (scripts/sim_gossip.py) run on virtual time.
"""

from ._errors import RejectReason, Rejection, ValidationError
from ._hlc import HLC_ZERO, ClockSkewError, Hlc, HybridClock, hlc_now, hlc_update
from ._keys import b58decode, b58encode, peer_id_from_public_key, peer_id_from_str, peer_id_to_str, verify_signature
from ._messages import NUM_BUCKETS, Delta, Digest, bucket_of
from ._record import (
    MAX_RECORD_BYTES,
    SIGNING_DOMAIN,
    Load,
    ModelId,
    Reachability,
    ServerRecord,
    ServerState,
    SignedRecord,
    Signer,
    decode_record,
)
from ._state import DEFAULT_MAX_LEASE_MS, DEFAULT_MAX_SKEW_MS, MergeResult, SwarmConfig, SwarmState
from ._sync import DEFAULT_SYNC_BUDGET, MAX_DELTA_BYTES, decode_message, digest, encode_message, sync, wire_size

__all__ = [
    "DEFAULT_MAX_LEASE_MS",
    "DEFAULT_SYNC_BUDGET",
    "DEFAULT_MAX_SKEW_MS",
    "HLC_ZERO",
    "MAX_DELTA_BYTES",
    "MAX_RECORD_BYTES",
    "NUM_BUCKETS",
    "SIGNING_DOMAIN",
    "ClockSkewError",
    "Delta",
    "Digest",
    "Hlc",
    "HybridClock",
    "Load",
    "MergeResult",
    "ModelId",
    "Reachability",
    "RejectReason",
    "Rejection",
    "ServerRecord",
    "ServerState",
    "SignedRecord",
    "Signer",
    "SwarmConfig",
    "SwarmState",
    "ValidationError",
    "b58decode",
    "b58encode",
    "bucket_of",
    "decode_message",
    "decode_record",
    "digest",
    "encode_message",
    "hlc_now",
    "hlc_update",
    "peer_id_from_public_key",
    "peer_id_from_str",
    "peer_id_to_str",
    "sync",
    "verify_signature",
    "wire_size",
]
