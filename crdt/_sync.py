"""Anti-entropy as pure functions, and the wire encoding of its messages.

Two levels, so a message's size grows with the difference between two replicas, not with the
swarm (a full per-peer digest of 10k peers would be ~240 KB per exchange):

  level 1  `digest(state)`: root hash + one 8-byte hash per bucket (256 buckets, ~2 KiB).
  level 2  for the buckets whose hashes differ only: sorted 24-byte per-peer version entries
           `fingerprint(8) | hlc(8) | signature prefix(8)`; then exactly the newer records.

One push-pull exchange, initiator A and responder B (`sync(message, state) -> reply | None`; the
receiver of a `Delta` merges its records *before* calling `sync` on it):

    A -> B  d  = digest(A)
    B -> A  r1 = sync(d, B)     records of buckets A has empty; B's versions of other differing buckets
    A -> B  r2 = sync(r1, A)    records A holds newer than B's versions; `want` for those B holds newer
    B -> A  r3 = sync(r2, B)    the wanted records
            sync(r3, A) is None: done.

At most four messages; replicas that agree stop after the first (equal roots -> None). Each delta
is capped at `max_bytes` of records: whatever is left over still shows as a differing bucket, so
the next exchange carries on. The functions are pure; the I/O (streams, deadlines, peer choice)
lives in the node.

Wire messages are msgpack arrays, tag first:

    Digest  [1, root: bin(16), bucket_hashes: bin(256*8)]
    Delta   [2, [signed_record: bin, ...], [[bucket: int, entries: bin(24*n)], ...], want: bin(8*n)]

`decode_message` is strict (exact shape and types, ascending buckets, sorted unique entries in the
right bucket, every size limit). A malformed *message* raises `ValidationError`; a malformed or
oversized *record* inside a delta is dropped and reported in `Delta.rejected` so one bad record
does not cost the rest.
"""

from __future__ import annotations

import msgpack
import numpy as np

from ._errors import RejectReason, ValidationError
from ._messages import (
    BUCKET_HASH_LEN,
    FINGERPRINT_LEN,
    NUM_BUCKETS,
    ROOT_HASH_LEN,
    VERSION_ENTRY_LEN,
    Delta,
    Digest,
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

def digest(state: SwarmState) -> Digest:
    """Level-1 summary of `state` (constant size)."""
    return Digest(state.root, state.bucket_hashes)


def _differing(a: bytes, b: bytes) -> list[int]:
    """Indices of the 8-byte bucket hashes that differ (vectorised: this runs on every exchange)."""
    return np.flatnonzero(np.frombuffer(a, "<u8") != np.frombuffer(b, "<u8")).tolist()


_COMPARE_MEMO: dict[tuple[_Bucket, bytes], tuple[tuple[SignedRecord, ...], tuple[bytes, ...]]] = {}
_MAX_MEMO = 1 << 16


def _compare(bucket: _Bucket, theirs_blob: bytes) -> tuple[tuple[SignedRecord, ...], tuple[bytes, ...]]:
    """(my records newer than theirs or missing there, fingerprints they hold newer). Memoized:
    both inputs are immutable and, with interned buckets, few distinct pairs occur."""
    key = (bucket, theirs_blob)
    hit = _COMPARE_MEMO.get(key)
    if hit is not None:
        return hit
    n = VERSION_ENTRY_LEN
    theirs = {theirs_blob[k : k + 8]: theirs_blob[k + 8 : k + n] for k in range(0, len(theirs_blob), n)}
    mine = bucket.fpmap
    send = []
    for fp, (ver, rec) in mine.items():
        t = theirs.get(fp)
        if t is None or ver > t:
            send.append(rec)
    want = []
    for fp, t in theirs.items():
        m = mine.get(fp)
        if m is None or t > m[0]:
            want.append(fp)
    result = (tuple(send), tuple(want))
    if len(_COMPARE_MEMO) >= _MAX_MEMO:
        _COMPARE_MEMO.clear()
    _COMPARE_MEMO[key] = result
    return result


def sync(message: Digest | Delta, state: SwarmState, *, max_bytes: int = DEFAULT_SYNC_BUDGET) -> Delta | None:
    """The reply of a replica holding `state` to `message`, or None when there is nothing to say.

    For a `Delta`, merge its records into `state` first; the reply only answers its level-2 parts.
    """
    records: list[SignedRecord] = []
    budget = max_bytes
    if isinstance(message, Digest):
        if message.root == state.root:
            return None
        theirs = message.hashes
        versions = []
        for i in _differing(theirs, state.bucket_hashes):
            b = state._bucket(i)
            if theirs[i * BUCKET_HASH_LEN : (i + 1) * BUCKET_HASH_LEN] == EMPTY_BUCKET_HASH:
                for r in b.records:  # they hold nothing here: skip the version round trip
                    budget -= len(r.wire)
                    if budget < 0:
                        break
                    records.append(r)
            else:
                versions.append((i, b.blob))
        if not records and not versions:
            return None
        return Delta(tuple(records), tuple(versions))
    if not isinstance(message, Delta):
        raise TypeError(f"cannot sync on {type(message).__name__}")
    want: list[bytes] = []
    for i, blob in message.versions:
        b = state._bucket(i)
        if blob == b.blob:
            continue
        send, w = _compare(b, blob)
        want.extend(w)
        for r in send:
            budget -= len(r.wire)
            if budget < 0:
                break
            records.append(r)
    for fp in message.want:
        hit = state._bucket(fp[0]).fpmap.get(fp)
        if hit is not None and budget - len(hit[1].wire) >= 0:
            budget -= len(hit[1].wire)
            records.append(hit[1])
    if not records and not want:
        return None
    return Delta(tuple(records), (), tuple(want))


# ---- wire encoding ------------------------------------------------------------------------------


def encode_message(message: Digest | Delta) -> bytes:
    """Canonical msgpack bytes of a `Digest` or `Delta` (`Delta.rejected` is not sent)."""
    if isinstance(message, Digest):
        return msgpack.packb((KIND_DIGEST, message.root, message.hashes), use_bin_type=True)
    if isinstance(message, Delta):
        return msgpack.packb(
            (KIND_DELTA, tuple(r.wire for r in message.records), message.versions, b"".join(message.want)),
            use_bin_type=True,
        )
    raise TypeError(f"cannot encode {type(message).__name__}")


def _bin(n: int) -> int:
    return n + (2 if n < 256 else 3 if n < 65536 else 5)


def _arr(n: int) -> int:
    return 1 if n < 16 else 3 if n < 65536 else 5


DIGEST_WIRE_SIZE = 1 + 1 + _bin(ROOT_HASH_LEN) + _bin(NUM_BUCKETS * BUCKET_HASH_LEN)


def wire_size(message: Digest | Delta) -> int:
    """`len(encode_message(message))`, computed from cached sizes without encoding."""
    if isinstance(message, Digest):
        return DIGEST_WIRE_SIZE
    records = message.records
    size = 1 + 1 + _arr(len(records)) + _arr(len(message.versions))
    lengths = [len(r.wire) for r in records]
    size += sum(lengths) + 3 * len(lengths) - sum(1 for n in lengths if n < 256)
    for i, blob in message.versions:
        size += 1 + (1 if i < 128 else 2) + _bin(len(blob))
    return size + _bin(FINGERPRINT_LEN * len(message.want))


def _bad(detail: str) -> ValidationError:
    return ValidationError(RejectReason.MALFORMED, detail)


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
    if len(t) != 4 or type(t[1]) is not tuple or type(t[2]) is not tuple or type(t[3]) is not bytes:
        raise _bad("delta must be [2, records, versions, want]")
    _, raw_records, raw_versions, raw_want = t
    versions = []
    last = -1
    for v in raw_versions:
        if type(v) is not tuple or len(v) != 2 or type(v[0]) is not int or type(v[1]) is not bytes:
            raise _bad("versions entries must be [bucket, entries]")
        i, blob = v
        if not last < i < NUM_BUCKETS:
            raise _bad("versions buckets must be ascending and < 256")
        last = i
        if len(blob) % VERSION_ENTRY_LEN:
            raise _bad("version entries are 24 bytes each")
        if len(blob) > MAX_VERSIONS_BLOB:
            raise ValidationError(RejectReason.OVERSIZED, f"bucket {i} versions are {len(blob)} bytes")
        prev = b""
        for k in range(0, len(blob), VERSION_ENTRY_LEN):
            fp = blob[k : k + FINGERPRINT_LEN]
            if fp[0] != i or fp <= prev:
                raise _bad("version entries must be sorted, unique, and in their bucket")
            prev = fp
        versions.append((i, blob))
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
    return Delta(tuple(records), tuple(versions), want, tuple(rejected))
