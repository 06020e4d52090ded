"""The swarm map: peer id -> signed server record, last writer wins.

`SwarmState` is an immutable value. Its join (`merge`) keeps, per peer, the record with the
greatest LWW marker `(hlc, peer id)` (two records of one signer with the same hlc, which an
honest signer never makes, are ordered by signature so the join stays deterministic) among the
records that pass validation. Graceful leave is just a newer `OFFLINE` record; leases end by
`gc(now_ms)`.

Validation (`check` on every incoming record that would win):
  * signature and key binding (cached per record; see _record.py),
  * lease expired (`expires_ms <= now_ms`), dated beyond `now_ms + max_skew_ms`, or lease longer
    than `max_lease_ms` after the record's own timestamp.
Structural problems (malformed, oversized) are caught when bytes are decoded, and are reported by
`merge` too when they came inside a `Delta`.

Laws: for one `now_ms` and states whose records are valid at `now_ms` (what `gc(now_ms)` leaves),
`merge` is commutative, associative and idempotent; invalid records are never admitted so they
cannot break that. Records already held are not re-validated on every merge (that is `gc`'s job),
so merging states that still hold expired records may keep them until the next `gc`.

Representation, for 10k-replica simulations in one process: the map is split into 256 buckets by
the first byte of each peer's raw public key (the hash tree of _messages.py). A bucket is
immutable and interned by content, so replicas holding the same bucket content share one object;
each bucket caches its sorted 24-byte version entries, their BLAKE2b hash, its earliest lease
expiry, and lazily its 16 sub-buckets. A merge copies only the buckets it changes (memoized per
(bucket, record): while an update spreads, every replica applies the same step to the same
interned bucket); `root` and the digest are recomputed lazily from the cached bucket hashes.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from ._errors import RejectReason, Rejection
from ._messages import BUCKET_HASH_LEN, NUM_BUCKETS, NUM_SUBBUCKETS, VERSION_ENTRY_LEN, Delta
from ._record import ModelId, ServerRecord, SignedRecord

DEFAULT_MAX_SKEW_MS = 10_000
DEFAULT_MAX_LEASE_MS = 600_000


@dataclass(frozen=True, slots=True)
class SwarmConfig:
    """Admission policy shared by all replicas of a swarm."""

    max_skew_ms: int = DEFAULT_MAX_SKEW_MS  # how far in the future a record's hlc may be
    max_lease_ms: int = DEFAULT_MAX_LEASE_MS  # longest lease after the record's own timestamp

    def __post_init__(self) -> None:
        if self.max_skew_ms < 0 or self.max_lease_ms <= 0:
            raise ValueError("max_skew_ms must be >= 0 and max_lease_ms > 0")

    def check(self, r: SignedRecord, now_ms: int) -> Rejection | None:
        """Full admission check of one record at local time `now_ms`."""
        bad = r.check()
        if bad is not None:
            return bad
        rec = r.record
        if rec.expires_ms <= now_ms:
            return Rejection(RejectReason.EXPIRED, rec.peer_id, f"lease ended at {rec.expires_ms}, now {now_ms}")
        if rec.hlc.wall_ms > now_ms + self.max_skew_ms:
            return Rejection(
                RejectReason.FUTURE,
                rec.peer_id,
                f"hlc {rec.hlc.wall_ms} is {rec.hlc.wall_ms - now_ms} ms ahead (max skew {self.max_skew_ms})",
            )
        if rec.expires_ms - rec.hlc.wall_ms > self.max_lease_ms:
            return Rejection(
                RejectReason.LEASE_TOO_LONG,
                rec.peer_id,
                f"lease of {rec.expires_ms - rec.hlc.wall_ms} ms (max {self.max_lease_ms})",
            )
        return None


class _Bucket:
    """An immutable, interned set of records whose peers share a first key byte.

    Caches (computed once per distinct bucket, shared by every replica holding it): sorted
    version entries and their hash, and lazily the fingerprint map and the 16 sub-buckets.
    """

    __slots__ = ("entries", "blob", "hash", "h8", "min_expiry", "_fpmap", "_records", "_subs", "_subhashes", "__weakref__")

    entries: dict[bytes, SignedRecord]  # never mutated after construction
    blob: bytes  # sorted version entries
    hash: bytes  # BLAKE2b-128 of blob
    h8: bytes

    @property
    def records(self) -> tuple[SignedRecord, ...]:
        r = self._records
        if r is None:
            r = self._records = tuple(self.entries.values())
        return r

    @property
    def fpmap(self) -> dict[bytes, tuple[bytes, SignedRecord]]:
        """fingerprint -> (hlc | signature prefix: 16 bytes, record)."""
        m = self._fpmap
        if m is None:
            m = self._fpmap = {r.version_entry[:8]: (r.version_entry[8:], r) for r in self.entries.values()}
        return m

    @property
    def subs(self) -> tuple[bytes, ...]:
        """The sorted version entries of each of the 16 sub-buckets."""
        subs = self._subs
        if subs is None:
            parts: list[list[bytes]] = [[] for _ in range(NUM_SUBBUCKETS)]
            blob, n = self.blob, VERSION_ENTRY_LEN
            for k in range(0, len(blob), n):
                parts[blob[k + 1] >> 4].append(blob[k : k + n])
            subs = self._subs = tuple(b"".join(p) for p in parts)
        return subs

    @property
    def subhashes(self) -> bytes:
        h = self._subhashes
        if h is None:
            h = self._subhashes = b"".join(
                hashlib.blake2b(sub, digest_size=16).digest()[:BUCKET_HASH_LEN] for sub in self.subs
            )
        return h

    def scope_blob(self, scope: int) -> bytes:
        return self.blob if scope < NUM_BUCKETS else self.subs[(scope - NUM_BUCKETS) & 15]

    def sub_records(self, sub: int) -> list[SignedRecord]:
        return [r for fp, (_, r) in self.fpmap.items() if fp[1] >> 4 == sub]


_INTERN: weakref.WeakValueDictionary[bytes, _Bucket] = weakref.WeakValueDictionary()


def _bucket(entries: dict[bytes, SignedRecord]) -> _Bucket:
    blob = b"".join(sorted([r.version_entry for r in entries.values()]))
    h = hashlib.blake2b(blob, digest_size=16).digest()
    b = _INTERN.get(h)
    if b is not None and b.entries == entries:  # equal blobs but unequal records: see version_entry
        return b
    b = _Bucket()
    b.entries = entries
    b.blob = blob
    b.hash = h
    b.h8 = h[:BUCKET_HASH_LEN]
    b.min_expiry = min((r.record.expires_ms for r in entries.values()), default=1 << 62)
    b._fpmap = None
    b._records = None
    b._subs = None
    b._subhashes = None
    _INTERN[h] = b
    return b


_WITH_MEMO: dict[tuple[_Bucket, SignedRecord], _Bucket] = {}
_MAX_MEMO = 1 << 16


def _with(b: _Bucket, r: SignedRecord) -> _Bucket:
    """`b` with `r` as its peer's entry. Memoized: replicas apply the same update to the same
    (interned) bucket over and over while it spreads."""
    key = (b, r)
    nb = _WITH_MEMO.get(key)
    if nb is None:
        entries = dict(b.entries)
        entries[r.record.peer_id] = r
        nb = _bucket(entries)
        if len(_WITH_MEMO) >= _MAX_MEMO:
            _WITH_MEMO.clear()
        _WITH_MEMO[key] = nb
    return nb


_EMPTY_BUCKET = _bucket({})
EMPTY_BUCKET_HASH = _EMPTY_BUCKET.h8


@dataclass(frozen=True, slots=True)
class MergeResult:
    """What a merge did: the new state, peers whose entry changed, and refused records."""

    state: SwarmState
    changed: frozenset[bytes]
    rejected: tuple[Rejection, ...]


class SwarmState:
    """Immutable CRDT map peer id -> `SignedRecord`. Equal when the contents are equal."""

    __slots__ = ("config", "_buckets", "_root", "_hashes", "_len", "_sorted")

    def __init__(self, config: SwarmConfig | None = None) -> None:
        self.config = config or SwarmConfig()
        self._buckets: tuple[_Bucket, ...] = (_EMPTY_BUCKET,) * NUM_BUCKETS
        self._root: bytes | None = None
        self._hashes: bytes | None = None
        self._len = 0
        self._sorted: tuple[SignedRecord, ...] | None = None

    @classmethod
    def _make(cls, config: SwarmConfig, buckets: tuple[_Bucket, ...]) -> SwarmState:
        s = object.__new__(cls)
        s.config = config
        s._buckets = buckets
        s._root = None
        s._hashes = None
        s._len = -1
        s._sorted = None
        return s

    @classmethod
    def of(cls, records: Iterable[SignedRecord], *, now_ms: int, config: SwarmConfig | None = None) -> SwarmState:
        """A state holding the valid ones of `records` (raises nothing; see `merge` for reports)."""
        return cls(config).merge(records, now_ms=now_ms).state

    # ---- content ----------------------------------------------------------------------------

    def __len__(self) -> int:
        if self._len < 0:
            self._len = sum(len(b.entries) for b in self._buckets)
        return self._len

    def __iter__(self) -> Iterator[SignedRecord]:
        """All signed records, in peer id order (sorted once per state value)."""
        s = self._sorted
        if s is None:
            s = self._sorted = tuple(
                sorted((r for b in self._buckets for r in b.entries.values()), key=lambda r: r.record.peer_id)
            )
        return iter(s)

    def __contains__(self, peer_id: object) -> bool:
        return isinstance(peer_id, bytes) and len(peer_id) > 6 and peer_id in self._buckets[peer_id[6]].entries

    def get(self, peer_id: bytes) -> SignedRecord | None:
        if len(peer_id) <= 6:
            return None
        return self._buckets[peer_id[6]].entries.get(peer_id)

    @property
    def root(self) -> bytes:
        """BLAKE2b-128 over the bucket hashes: equal roots <=> equal states."""
        r = self._root
        if r is None:
            r = self._root = hashlib.blake2b(b"".join(b.hash for b in self._buckets), digest_size=16).digest()
        return r

    @property
    def bucket_hashes(self) -> bytes:
        h = self._hashes
        if h is None:
            h = self._hashes = b"".join(b.h8 for b in self._buckets)
        return h

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SwarmState):
            return NotImplemented
        return self is other or self._buckets == other._buckets or self.root == other.root

    def __hash__(self) -> int:
        return hash(self.root)

    def __repr__(self) -> str:
        return f"SwarmState({len(self)} peers, root={self.root.hex()[:12]})"

    def wire_size(self) -> int:
        """Bytes of all signed records on the wire (the state's size per replica)."""
        return sum(len(r.wire) for b in self._buckets for r in b.entries.values())

    # ---- the join ---------------------------------------------------------------------------

    def merge(self, other: SwarmState | Delta | Iterable[SignedRecord], *, now_ms: int) -> MergeResult:
        """Join with another state, a delta, or loose records, validating at local time `now_ms`.

        Records refused by validation (or, for a `Delta`, already while decoding) are returned in
        `MergeResult.rejected`, with a reason. Never raises for bad remote input.
        """
        rejected: list[Rejection] = []
        if isinstance(other, SwarmState):
            incoming: Iterable[SignedRecord] = (
                r
                for a, b in zip(self._buckets, other._buckets)
                if a is not b and a.hash != b.hash
                for r in b.entries.values()
            )
        elif isinstance(other, Delta):
            rejected.extend(other.rejected)
            incoming = other.records
        else:
            incoming = other
        buckets = self._buckets
        config = self.config
        groups: dict[int, dict[bytes, SignedRecord]] = {}
        for r in incoming:
            pid = r.record.peer_id
            i = pid[6]
            g = groups.get(i)
            cur = g.get(pid) if g is not None else None
            if cur is None:
                cur = buckets[i].entries.get(pid)
            if cur is r or (cur is not None and not r.newer_than(cur)):
                continue
            bad = config.check(r, now_ms)
            if bad is not None:
                rejected.append(bad)
                continue
            if g is None:
                g = groups[i] = {}
            g[pid] = r
        if not groups:
            return MergeResult(self, frozenset(), tuple(rejected))
        new = list(buckets)
        changed: list[bytes] = []
        for i, g in groups.items():
            if len(g) <= 4:
                b = buckets[i]
                for r in g.values():
                    b = _with(b, r)
            else:
                entries = dict(buckets[i].entries)
                entries.update(g)
                b = _bucket(entries)
            new[i] = b
            changed.extend(g)
        return MergeResult(SwarmState._make(config, tuple(new)), frozenset(changed), tuple(rejected))

    def gc(self, now_ms: int) -> SwarmState:
        """Drop entries whose lease has ended (`expires_ms <= now_ms`). Returns self if none."""
        new = None
        for i, b in enumerate(self._buckets):
            if b.min_expiry <= now_ms:
                if new is None:
                    new = list(self._buckets)
                new[i] = _bucket({p: r for p, r in b.entries.items() if r.record.expires_ms > now_ms})
        return self if new is None else SwarmState._make(self.config, tuple(new))

    # ---- queries for the router and the node ------------------------------------------------

    def records(self, model: ModelId | None = None) -> list[ServerRecord]:
        """Every held record (any state, lease not checked), optionally for one model."""
        return [s.record for s in self if model is None or s.record.model == model]

    def live(self, now_ms: int, model: ModelId | None = None) -> list[ServerRecord]:
        """Routable servers: `ONLINE` with a lease that ends after `now_ms`."""
        return [r for r in self.records(model) if r.is_live(now_ms)]

    def models(self, now_ms: int) -> set[ModelId]:
        """Models with at least one live server."""
        return {r.model for r in self.live(now_ms)}

    def servers_for_block(self, model: ModelId, block: int, now_ms: int) -> list[ServerRecord]:
        """Live servers of `model` whose span covers `block`, fastest first (ties by peer id)."""
        found = [r for r in self.live(now_ms, model) if r.covers(block)]
        found.sort(key=lambda r: (-r.throughput, r.peer_id))
        return found

    def coverage(self, model: ModelId, num_blocks: int, now_ms: int) -> list[int]:
        """Number of live servers covering each block `0..num_blocks-1`."""
        counts = [0] * num_blocks
        for r in self.live(now_ms, model):
            for b in range(r.start, min(r.end, num_blocks)):
                counts[b] += 1
        return counts

    # ---- internals used by the sync step ----------------------------------------------------

    def _bucket(self, i: int) -> _Bucket:
        return self._buckets[i]


assert len(_EMPTY_BUCKET.blob) % VERSION_ENTRY_LEN == 0
