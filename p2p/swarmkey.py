"""`lamina-swarm-key` (or ``python -m p2p.swarmkey``): make a private swarm's key.

    lamina-swarm-key --out swarm.key      # written with mode 0600; refuses to overwrite
    lamina-swarm-key > swarm.key          # to stdout

The file is in the go-libp2p / IPFS ``swarm.key`` format, so kubo and other libp2p programs
read it too. Copy it to every peer and start each with ``--swarm-key swarm.key``.
"""

from __future__ import annotations

import argparse
import os
import sys

from ._pnet import SwarmKey

PROG = "lamina-swarm-key"


def write_key_file(path: str, key: SwarmKey, *, force: bool = False) -> None:
    """Write `key` to `path` with mode 0600 (created, never widened; replaced only with
    `force`). Raises OSError (FileExistsError when it exists and not `force`)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    fd = os.open(path, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an existing file (force) keeps no wider mode
        os.write(fd, key.to_text().encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description="Generate a private swarm key (swarm.key format) "
                                "for run-node --swarm-key and the client's swarm_key=.")
    p.add_argument("--out", metavar="FILE", help="write the key to FILE (mode 0600) instead of stdout")
    p.add_argument("--force", action="store_true", help="with --out, replace an existing FILE")
    args = p.parse_args(argv)
    key = SwarmKey.generate()
    if args.out is None:
        sys.stdout.write(key.to_text())
        sys.stdout.flush()
        return 0
    try:
        write_key_file(args.out, key, force=args.force)
    except FileExistsError:
        print(f"{PROG}: error: {args.out} exists; keep it, or pass --force to replace it", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{PROG}: error: cannot write {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(f"wrote swarm key {key.fingerprint()} to {args.out}; copy it to every peer", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
