"""Anti-entropy messages: frozen values, shape-checked at construction.

Strict validation of bytes from the network (sizes, ordering, every field) happens in
`decode_message`; construction checks only the cheap invariants, because the sync step builds
these on the hot path.

The state is summarised as a fixed hash tree over peer fingerprints (the first 8 bytes of a
peer's raw Ed25519 key, uniformly distributed):

    root  ->  256 buckets (fingerprint byte 0)  ->  16 sub-buckets each (high nibble of byte 1)
          ->  per-peer version entries

A *scope* names a set of peers whose versions are being compared: `0 <= scope < 256` is a whole
bucket, `256 + bucket * 16 + sub` a sub-bucket.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._errors import Rejection
from ._record import SignedRecord

NUM_BUCKETS = 256  # protocol constant: bucket of a peer = first byte of its raw public key
NUM_SUBBUCKETS = 16  # per bucket: high nibble of the second byte of the raw public key
NUM_SCOPES = NUM_BUCKETS + NUM_BUCKETS * NUM_SUBBUCKETS
BUCKET_HASH_LEN = 8  # per-(sub)bucket hash (BLAKE2b-128 of its version entries, truncated)
ROOT_HASH_LEN = 16
VERSION_ENTRY_LEN = 24  # peer fingerprint(8) | packed hlc(8) | signature prefix(8)
FINGERPRINT_LEN = 8  # raw public key bytes [0:8]; byte 0 is the bucket
SUBHASHES_LEN = NUM_SUBBUCKETS * BUCKET_HASH_LEN


def bucket_of(peer_id: bytes) -> int:
    """The digest bucket of an Ed25519 peer id (first byte of the raw key: uniform)."""
    return peer_id[6]


def fingerprint(peer_id: bytes) -> bytes:
    return peer_id[6:14]


def sub_scope(bucket: int, sub: int) -> int:
    return NUM_BUCKETS + bucket * NUM_SUBBUCKETS + sub


def scope_contains(scope: int, fp: bytes) -> bool:
    """Whether the peer with fingerprint `fp` belongs to `scope`."""
    if scope < NUM_BUCKETS:
        return fp[0] == scope
    s = scope - NUM_BUCKETS
    return fp[0] == s >> 4 and fp[1] >> 4 == s & 15


@dataclass(frozen=True, slots=True)
class Digest:
    """Level 1 of anti-entropy: the state's root hash and one 8-byte hash per bucket.

    Fixed size (16 + 256*8 bytes of hashes, about 2 KiB) whatever the number of peers.
    """

    root: bytes
    hashes: bytes

    def __post_init__(self) -> None:
        if type(self.root) is not bytes or len(self.root) != ROOT_HASH_LEN:
            raise ValueError(f"digest root must be {ROOT_HASH_LEN} bytes")
        if type(self.hashes) is not bytes or len(self.hashes) != NUM_BUCKETS * BUCKET_HASH_LEN:
            raise ValueError(f"digest hashes must be {NUM_BUCKETS}*{BUCKET_HASH_LEN} bytes")

    def bucket_hash(self, bucket: int) -> bytes:
        return self.hashes[bucket * BUCKET_HASH_LEN : (bucket + 1) * BUCKET_HASH_LEN]


@dataclass(frozen=True, slots=True)
class Delta:
    """Records, plus the lower levels of the hash tree for the parts that differ.

    records: signed records the receiver lacks or holds older versions of.
    hashes: `(bucket, 16 sub-bucket hashes)` for differing buckets too big to list; the receiver
        answers with `versions` of the sub-buckets that differ (or their records, if the sender's
        sub-bucket is empty).
    versions: `(scope, entries)`: the sender's sorted 24-byte version entries for a scope; the
        receiver answers with its newer records and `want`s the ones the sender holds newer.
    want: 8-byte fingerprints of peers whose records the sender knows the receiver holds newer.
    rejected: records refused while decoding this delta (not on the wire); `merge` reports them.
    """

    records: tuple[SignedRecord, ...] = ()
    hashes: tuple[tuple[int, bytes], ...] = ()
    versions: tuple[tuple[int, bytes], ...] = ()
    want: tuple[bytes, ...] = ()
    rejected: tuple[Rejection, ...] = ()

    def __post_init__(self) -> None:
        for name in ("records", "hashes", "versions", "want", "rejected"):
            if type(getattr(self, name)) is not tuple:
                raise TypeError(f"Delta.{name} must be a tuple")
        last = -1
        for bucket, sub in self.hashes:
            if not last < bucket < NUM_BUCKETS or len(sub) != SUBHASHES_LEN:
                raise ValueError("hashes must be (bucket, 128 bytes) with ascending buckets")
            last = bucket
        last = -1
        for scope, entries in self.versions:
            if not last < scope < NUM_SCOPES or len(entries) % VERSION_ENTRY_LEN:
                raise ValueError("versions must be (scope, entries) with ascending scopes and 24-byte entries")
            last = scope
        if any(len(fp) != FINGERPRINT_LEN for fp in self.want):
            raise ValueError("want entries are 8-byte peer fingerprints")

    @classmethod
    def _trusted(cls, records, hashes, versions, want) -> Delta:
        """Construction without the checks, for deltas `sync` built itself (hot path)."""
        self = object.__new__(cls)
        object.__setattr__(self, "records", records)
        object.__setattr__(self, "hashes", hashes)
        object.__setattr__(self, "versions", versions)
        object.__setattr__(self, "want", want)
        object.__setattr__(self, "rejected", ())
        return self

    def __bool__(self) -> bool:
        return bool(self.records or self.hashes or self.versions or self.want)
