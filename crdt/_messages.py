"""Anti-entropy messages: frozen values, shape-checked at construction.

Strict validation of bytes from the network (sizes, ordering, every field) happens in
`decode_message`; construction checks only the cheap invariants, because the sync step builds
these on the hot path.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._errors import Rejection
from ._record import SignedRecord

NUM_BUCKETS = 256  # protocol constant: bucket of a peer = first byte of its raw public key
BUCKET_HASH_LEN = 8  # per-bucket hash in a digest (truncated BLAKE2b-128)
ROOT_HASH_LEN = 16
VERSION_ENTRY_LEN = 24  # peer fingerprint(8) | packed hlc(8) | signature prefix(8)
FINGERPRINT_LEN = 8  # raw public key bytes [0:8]; byte 0 is the bucket


def bucket_of(peer_id: bytes) -> int:
    """The digest bucket of an Ed25519 peer id (first byte of the raw key: uniform)."""
    return peer_id[6]


def fingerprint(peer_id: bytes) -> bytes:
    return peer_id[6:14]


@dataclass(frozen=True, slots=True)
class Digest:
    """Level 1 of anti-entropy: the state's root hash and one 8-byte hash per bucket.

    Fixed size (16 + 256*8 bytes of hashes, 2 KiB) whatever the number of peers.
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
    """Records, plus the two level-2 requests of anti-entropy.

    records: signed records the receiver lacks or holds older versions of.
    versions: `(bucket, entries)` for buckets whose digest hashes differed: the sender's sorted
        24-byte version entries; the receiver answers with its newer records and `want`s the rest.
    want: 8-byte fingerprints of peers whose records the sender knows the receiver holds newer.
    rejected: records refused while decoding this delta (not on the wire); `merge` reports them.
    """

    records: tuple[SignedRecord, ...] = ()
    versions: tuple[tuple[int, bytes], ...] = ()
    want: tuple[bytes, ...] = ()
    rejected: tuple[Rejection, ...] = ()

    def __post_init__(self) -> None:
        if type(self.records) is not tuple or type(self.versions) is not tuple or type(self.want) is not tuple:
            raise TypeError("Delta fields must be tuples")
        last = -1
        for bucket, entries in self.versions:
            if not last < bucket < NUM_BUCKETS or len(entries) % VERSION_ENTRY_LEN:
                raise ValueError("versions must be (bucket, entries) with ascending buckets and 24-byte entries")
            last = bucket
        if any(len(fp) != FINGERPRINT_LEN for fp in self.want):
            raise ValueError("want entries are 8-byte peer fingerprints")

    def __bool__(self) -> bool:
        return bool(self.records or self.versions or self.want)
