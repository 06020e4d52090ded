"""Anti-entropy as pure functions, and the wire encoding of its messages.

A message's size grows with the difference between two replicas, not with the swarm (a full
per-peer version list of 10k peers would be 240 KB per exchange). The state is a fixed hash tree
(see _messages.py) and an exchange descends it only where the hashes differ:

  level 1  `digest(state)`: root hash + one 8-byte hash per bucket (256 buckets: 2 KiB, always).
  level 2  for a differing bucket of more than SUBTREE_MIN_PEERS peers: its 16 sub-bucket hashes
           (128 bytes); smaller buckets skip straight to level 3.
  level 3  for a differing (sub-)bucket: its sorted 24-byte version entries
           `fingerprint(8) | hlc(8) | signature prefix(8)`; then exactly the newer records.
A side whose (sub-)bucket is empty gets the records at once, without the version round trip, so
a new node's first exchange is a plain state transfer.

Measured on scripts/sim_gossip.py (10k peers, 39 per bucket) the sub-bucket level cuts the bytes
spent on versions about 4x over sending whole-bucket versions (a two-level scheme), at the cost
of one more message in exchanges that reach it.

One push-pull exchange, initiator A and responder B (`sync(message, state) -> reply | None`; the
receiver of a `Delta` merges its records *before* calling `sync` on it):

    A -> B  d  = digest(A)
    B -> A  r1 = sync(d, B)     records for buckets A has empty; B's sub-hashes or versions of the
                                other differing buckets
    A -> B  r2 = sync(r1, A)    records A holds newer than B's versions (+ `want` for B's newer);
                                A's versions of the differing sub-buckets
    B -> A  r3 = sync(r2, B)    the same, one level down
    A -> B  r4 = sync(r3, A)    the wanted records; then sync(r4, B) is None: done.

At most five messages; replicas that agree stop after the first (equal roots -> None). Every
reply descends at least one level, so an exchange always terminates. Each delta is capped at
`max_bytes` of records: whatever is left over still shows as a differing bucket, and the next
exchange carries on. The functions are pure; the I/O (streams, deadlines, peer choice) lives in
the node.

Wire messages are msgpack arrays, tag first:

    Digest  [1, root: bin(16), bucket_hashes: bin(256*8)]
    Delta   [2, [signed_record: bin, ...], [[bucket, sub_hashes: bin(16*8)], ...],
             [[scope, entries: bin(24*n)], ...], want: bin(8*n)]

`decode_message` is strict (exact shape and types, ascending buckets and scopes, sorted unique
entries inside their scope, every size limit). A malformed *message* raises `ValidationError`; a
malformed or oversized *record* inside a delta is dropped and reported in `Delta.rejected`, so
one bad record does not cost the rest.
"""

from __future__ import annotations

import msgpack
import numpy as np

from ._errors import RejectReason, ValidationError
from ._messages import (
    BUCKET_HASH_LEN,
    FINGERPRINT_LEN,
    NUM_BUCKETS,
    NUM_SCOPES,
    NUM_SUBBUCKETS,
    ROOT_HASH_LEN,
    SUBHASHES_LEN,
    VERSION_ENTRY_LEN,
    Delta,
    Digest,
    scope_contains,
    sub_scope,
)
from ._record import MAX_RECORD_BYTES, SignedRecord, decode_record
from ._state import EMPTY_BUCKET_HASH, SwarmState, _Bucket

KIND_DIGEST = 1
KIND_DELTA = 2

MAX_DELTA_BYTES = 16 << 20  # hard limit on any decoded message
DEFAULT_SYNC_BUDGET = 8 << 20  # records per delta built by `sync`
MAX_DELTA_RECORDS = 1 << 15
MAX_VERSIONS_BLOB = 64 << 10  # 2048 peers in one bucket (~500k peers in the swarm)
MAX_WANT = 1 << 16
SUBTREE_MIN_PEERS = 8  # a differing bucket with more peers is split into sub-buckets first


def digest(state: SwarmState) -> Digest:
    """Level-1 summary of `state` (constant size)."""
    return Digest(state.root, state.bucket_hashes)


def _differing(a: bytes, b: bytes) -> list[int]:
    """Indices of the 8-byte hashes that differ (vectorised: this runs on every exchange)."""
    return np.flatnonzero(np.frombuffer(a, "<u8") != np.frombuffer(b, "<u8")).tolist()


# Process-wide memo tables for the two comparisons of the sync step. Both are pure functions of
# an interned bucket and bytes from the other side; bounded in entries and (for `_compare`) in
# key size, so a peer sending odd blobs cannot grow them past a few tens of MB.
_MAX_MEMO = 1 << 14
_MAX_MEMO_BLOB = 4096
_COMPARE_MEMO: dict[tuple[_Bucket, int, bytes], tuple[tuple[SignedRecord, ...], tuple[bytes, ...]]] = {}


def _compare(bucket: _Bucket, scope: int, theirs_blob: bytes) -> tuple[tuple[SignedRecord, ...], tuple[bytes, ...]]:
    """(my records in `scope` newer than theirs or missing there, fingerprints they hold newer).

    Memoized: both inputs are immutable and, with interned buckets, the same pairs recur while
    an update spreads."""
    key = (bucket, scope, theirs_blob)
    hit = _COMPARE_MEMO.get(key)
    if hit is not None:
        return hit
    n = VERSION_ENTRY_LEN
    theirs = {theirs_blob[k : k + 8]: theirs_blob[k + 8 : k + n] for k in range(0, len(theirs_blob), n)}
    mine = bucket.fpmap
    send = []
    for fp, (ver, rec) in mine.items():
        if scope >= NUM_BUCKETS and not scope_contains(scope, fp):
            continue
        t = theirs.get(fp)
        if t is None or ver > t:
            send.append(rec)
    want = []
    for fp, t in theirs.items():
        m = mine.get(fp)
        if m is None or t > m[0]:
            want.append(fp)
    result = (tuple(send), tuple(want))
    if len(theirs_blob) <= _MAX_MEMO_BLOB:
        if len(_COMPARE_MEMO) >= _MAX_MEMO:
            _COMPARE_MEMO.clear()
        _COMPARE_MEMO[key] = result
    return result


_DESCEND_MEMO: dict[tuple[_Bucket, bytes], tuple[tuple[SignedRecord, ...], tuple[tuple[int, bytes], ...]]] = {}


def _descend(bucket: _Bucket, i: int, theirs: bytes) -> tuple[tuple[SignedRecord, ...], tuple[tuple[int, bytes], ...]]:
    """Answer to another replica's 16 sub-bucket hashes of bucket `i`: my records for the
    sub-buckets they have empty, my versions for the other differing ones. Memoized."""
    key = (bucket, theirs)
    hit = _DESCEND_MEMO.get(key)
    if hit is not None:
        return hit
    records: list[SignedRecord] = []
    versions = []
    mine = bucket.subhashes
    n = BUCKET_HASH_LEN
    for j in range(NUM_SUBBUCKETS):
        h = theirs[j * n : (j + 1) * n]
        if h != mine[j * n : (j + 1) * n]:
            if h == EMPTY_BUCKET_HASH:
                records.extend(bucket.sub_records(j))
            else:
                versions.append((sub_scope(i, j), bucket.subs[j]))
    result = (tuple(records), tuple(versions))
    if len(_DESCEND_MEMO) >= _MAX_MEMO:
        _DESCEND_MEMO.clear()
    _DESCEND_MEMO[key] = result
    return result


class _Reply:
    """Accumulates one reply under a byte budget for records."""

    __slots__ = ("records", "hashes", "versions", "want", "budget")

    def __init__(self, budget: int) -> None:
        self.records: list[SignedRecord] = []
        self.hashes: list[tuple[int, bytes]] = []
        self.versions: list[tuple[int, bytes]] = []
        self.want: list[bytes] = []
        self.budget = budget

    def add(self, records) -> None:
        for r in records:
            size = len(r.wire)
            if size > self.budget:
                self.budget = -1  # full: the rest goes in a later exchange
                return
            self.budget -= size
            self.records.append(r)

    def delta(self) -> Delta | None:
        if not (self.records or self.hashes or self.versions or self.want):
            return None
        self.versions.sort()
        return Delta._trusted(tuple(self.records), tuple(self.hashes), tuple(self.versions), tuple(self.want))


def sync(message: Digest | Delta, state: SwarmState, *, max_bytes: int = DEFAULT_SYNC_BUDGET) -> Delta | None:
    """The reply of a replica holding `state` to `message`, or None when there is nothing to say.

    For a `Delta`, merge its records into `state` first; the reply answers its `hashes`,
    `versions` and `want`.
    """
    out = _Reply(max_bytes)
    if isinstance(message, Digest):
        if message.root == state.root:
            return None
        theirs = message.hashes
        for i in _differing(theirs, state.bucket_hashes):
            b = state._bucket(i)
            if theirs[i * BUCKET_HASH_LEN : (i + 1) * BUCKET_HASH_LEN] == EMPTY_BUCKET_HASH:
                out.add(b.records)  # they hold nothing here: skip the version round trip
            elif len(b.entries) > SUBTREE_MIN_PEERS:
                out.hashes.append((i, b.subhashes))
            else:
                out.versions.append((i, b.blob))
        return out.delta()
    if not isinstance(message, Delta):
        raise TypeError(f"cannot sync on {type(message).__name__}")
    for i, theirs in message.hashes:
        b = state._bucket(i)
        if theirs == b.subhashes:
            continue
        records, versions = _descend(b, i, theirs)
        out.add(records)
        out.versions.extend(versions)
    for scope, blob in message.versions:
        b = state._bucket(scope if scope < NUM_BUCKETS else (scope - NUM_BUCKETS) >> 4)
        if blob == b.scope_blob(scope):
            continue
        send, want = _compare(b, scope, blob)
        out.want.extend(want)
        out.add(send)
    for fp in message.want:
        hit = state._bucket(fp[0]).fpmap.get(fp)
        if hit is not None:
            out.add((hit[1],))
    return out.delta()


# ---- wire encoding ------------------------------------------------------------------------------


def encode_message(message: Digest | Delta) -> bytes:
    """Canonical msgpack bytes of a `Digest` or `Delta` (`Delta.rejected` is not sent)."""
    if isinstance(message, Digest):
        return msgpack.packb((KIND_DIGEST, message.root, message.hashes), use_bin_type=True)
    if isinstance(message, Delta):
        return msgpack.packb(
            (
                KIND_DELTA,
                tuple(r.wire for r in message.records),
                message.hashes,
                message.versions,
                b"".join(message.want),
            ),
            use_bin_type=True,
        )
    raise TypeError(f"cannot encode {type(message).__name__}")


def _bin(n: int) -> int:
    return n + (2 if n < 256 else 3 if n < 65536 else 5)


def _arr(n: int) -> int:
    return 1 if n < 16 else 3 if n < 65536 else 5


def _uint(n: int) -> int:
    return 1 if n < 128 else 2 if n < 256 else 3


DIGEST_WIRE_SIZE = 1 + 1 + _bin(ROOT_HASH_LEN) + _bin(NUM_BUCKETS * BUCKET_HASH_LEN)


def wire_size(message: Digest | Delta) -> int:
    """`len(encode_message(message))`, computed from cached sizes without encoding."""
    if isinstance(message, Digest):
        return DIGEST_WIRE_SIZE
    records = message.records
    size = 1 + 1 + _arr(len(records)) + _arr(len(message.hashes)) + _arr(len(message.versions))
    size += sum([r.wire_bin_size for r in records])
    for i, _ in message.hashes:
        size += 1 + _uint(i) + _bin(SUBHASHES_LEN)
    for scope, blob in message.versions:
        size += 1 + _uint(scope) + _bin(len(blob))
    return size + _bin(FINGERPRINT_LEN * len(message.want))


def _bad(detail: str) -> ValidationError:
    return ValidationError(RejectReason.MALFORMED, detail)


def _pairs(raw, what: str) -> list[tuple[int, bytes]]:
    if type(raw) is not tuple:
        raise _bad(f"{what} must be an array")
    out = []
    for v in raw:
        if type(v) is not tuple or len(v) != 2 or type(v[0]) is not int or type(v[1]) is not bytes:
            raise _bad(f"{what} entries must be [int, bin]")
        out.append(v)
    return out


def _check_versions(scope: int, blob: bytes) -> None:
    if len(blob) % VERSION_ENTRY_LEN:
        raise _bad("version entries are 24 bytes each")
    if len(blob) > MAX_VERSIONS_BLOB:
        raise ValidationError(RejectReason.OVERSIZED, f"scope {scope} versions are {len(blob)} bytes")
    prev = b""
    for k in range(0, len(blob), VERSION_ENTRY_LEN):
        fp = blob[k : k + FINGERPRINT_LEN]
        if fp <= prev or not scope_contains(scope, fp):
            raise _bad("version entries must be sorted, unique, and inside their scope")
        prev = fp


def decode_message(data: bytes) -> Digest | Delta:
    """Strictly decode a `Digest` or `Delta`; raises `ValidationError` for a bad message."""
    if len(data) > MAX_DELTA_BYTES:
        raise ValidationError(RejectReason.OVERSIZED, f"message is {len(data)} bytes (max {MAX_DELTA_BYTES})")
    try:
        t = msgpack.unpackb(
            data,
            raw=False,
            use_list=False,
            strict_map_key=True,
            max_str_len=0,
            max_bin_len=MAX_DELTA_BYTES,
            max_array_len=MAX_DELTA_RECORDS,
            max_map_len=0,
            max_ext_len=0,
        )
    except (ValueError, msgpack.exceptions.UnpackException) as exc:
        raise _bad(f"not a msgpack message: {exc}") from None
    if type(t) is not tuple or not t or type(t[0]) is not int:
        raise _bad("message must be an array starting with its kind")
    if msgpack.packb(t, use_bin_type=True) != data:
        raise _bad("non-canonical message encoding")
    if t[0] == KIND_DIGEST:
        if len(t) != 3 or type(t[1]) is not bytes or type(t[2]) is not bytes:
            raise _bad("digest must be [1, root, hashes]")
        try:
            return Digest(t[1], t[2])
        except ValueError as exc:
            raise _bad(str(exc)) from None
    if t[0] != KIND_DELTA:
        raise _bad(f"unknown message kind {t[0]!r}")
    if len(t) != 5 or type(t[1]) is not tuple or type(t[4]) is not bytes:
        raise _bad("delta must be [2, records, hashes, versions, want]")
    _, raw_records, raw_hashes, raw_versions, raw_want = t
    hashes = _pairs(raw_hashes, "hashes")
    last = -1
    for bucket, sub in hashes:
        if not last < bucket < NUM_BUCKETS or len(sub) != SUBHASHES_LEN:
            raise _bad("hashes must be [bucket, 128 bytes] with ascending buckets < 256")
        last = bucket
    versions = _pairs(raw_versions, "versions")
    last = -1
    whole = set()
    for scope, blob in versions:
        if not last < scope < NUM_SCOPES:
            raise _bad(f"versions scopes must be ascending and < {NUM_SCOPES}")
        last = scope
        if scope < NUM_BUCKETS:
            whole.add(scope)
        elif (scope - NUM_BUCKETS) >> 4 in whole:
            raise _bad("a sub-bucket scope overlaps a whole-bucket scope")
        _check_versions(scope, blob)
    if len(raw_want) % FINGERPRINT_LEN or len(raw_want) > MAX_WANT * FINGERPRINT_LEN:
        raise _bad("want must be whole 8-byte fingerprints, at most 65536")
    want = tuple(raw_want[k : k + FINGERPRINT_LEN] for k in range(0, len(raw_want), FINGERPRINT_LEN))
    records = []
    rejected = []
    for raw in raw_records:
        if type(raw) is not bytes:
            raise _bad("records must be bin")
        if len(raw) > MAX_RECORD_BYTES:
            rejected.append(
                ValidationError(RejectReason.OVERSIZED, f"record is {len(raw)} bytes (max {MAX_RECORD_BYTES})").rejection()
            )
            continue
        try:
            records.append(decode_record(raw))
        except ValidationError as exc:
            rejected.append(exc.rejection())
    return Delta(tuple(records), tuple(hashes), tuple(versions), want, tuple(rejected))
