"""A userspace link emulator: what netem's delay, jitter, loss and rate do, for a kernel without
the netem qdisc (this one has tbf and htb, not netem).

It shapes what a lab host sends (`netlab.shape`). Inside the host's namespace, a policy route
sends every packet the host originates (``ip rule iif lo``) into a TUN device. This process reads
each packet, holds it, and writes it back into the same device. The kernel then forwards it out
of the host's real interface: the main table serves ``iif <tun>`` (``accept_local`` lets a
packet with the host's own source address in). The kernel segments TCP and computes checksums
before a packet reaches the TUN device (it offers no offloads), so what is read here are
MTU-sized IP packets ready to go.

The model of one direction of a link: a sender serializes packets at `rate` (a token bucket
with no burst: each packet leaves the wire `size / rate` after the previous one, or at once on
an idle link). The link drops a packet with probability `loss`, or when the bytes waiting to be
serialized exceed `limit` (a tail-drop queue, like a router's buffer). A packet arrives
`delay` (+ a uniform jitter in [-jitter, +jitter]) after it left the wire. Arrivals keep their
order, as on one path.

    python tests/linkemu.py --dev lemu0 --delay-ms 25 [--jitter-ms 1] [--loss 0.01] [--rate-mbit 100]

It prints ``ready`` once attached to the device, and runs until killed.
"""

from __future__ import annotations

import argparse
import collections
import fcntl
import os
import random
import struct
import sys
import threading
import time

TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000


def open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


class LinkModel:
    """When each packet arrives, or None if it is lost (see the module's doc)."""

    def __init__(self, delay: float, jitter: float = 0.0, loss: float = 0.0, rate_bps: float | None = None,
                 limit_bytes: int = 1 << 20, seed: int | None = None) -> None:
        if delay < 0 or jitter < 0 or jitter > delay or not 0 <= loss < 1 or (rate_bps is not None and rate_bps <= 0):
            raise ValueError("need delay >= jitter >= 0, 0 <= loss < 1 and a positive rate")
        self.delay, self.jitter, self.loss, self.rate_bps, self.limit = delay, jitter, loss, rate_bps, limit_bytes
        self.random = random.Random(seed)
        self.wire_free = 0.0         # when the sender finishes serializing what it holds
        self.last_arrival = 0.0
        self.sent = self.lost = self.dropped = 0

    def arrival(self, size: int, now: float) -> float | None:
        left = now
        if self.rate_bps is not None:
            backlog = max(0.0, self.wire_free - now) * self.rate_bps / 8
            if backlog + size > self.limit:
                self.dropped += 1
                return None
            self.wire_free = max(now, self.wire_free) + size * 8 / self.rate_bps
            left = self.wire_free
        if self.loss and self.random.random() < self.loss:
            self.lost += 1
            return None
        offset = self.random.uniform(-self.jitter, self.jitter) if self.jitter else 0.0
        self.last_arrival = max(self.last_arrival, left + self.delay + offset)
        self.sent += 1
        return self.last_arrival


def run(fd: int, model: LinkModel) -> None:
    """Read packets from `fd` and write each back at its arrival time, forever."""
    queue: collections.deque[tuple[float, bytes]] = collections.deque()
    ready = threading.Condition()

    def writer() -> None:
        while True:
            with ready:
                while not queue:
                    ready.wait()
                due, packet = queue[0]
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            with ready:
                queue.popleft()
            try:
                os.write(fd, packet)
            except OSError:          # e.g. the route changed under us: the packet is lost
                pass

    threading.Thread(target=writer, daemon=True).start()
    while True:
        packet = os.read(fd, 65536)
        due = model.arrival(len(packet), time.monotonic())
        if due is not None:
            with ready:
                queue.append((due, packet))
                ready.notify()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dev", required=True)
    ap.add_argument("--delay-ms", type=float, required=True)
    ap.add_argument("--jitter-ms", type=float, default=0.0)
    ap.add_argument("--loss", type=float, default=0.0, help="probability of losing a packet")
    ap.add_argument("--rate-mbit", type=float, default=None, help="link rate (default: unlimited)")
    ap.add_argument("--limit-bytes", type=int, default=1 << 20, help="queue before the link (tail drop)")
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args()
    model = LinkModel(args.delay_ms / 1e3, args.jitter_ms / 1e3, args.loss,
                      args.rate_mbit * 1e6 if args.rate_mbit else None, args.limit_bytes, args.seed)
    fd = open_tun(args.dev)
    print("ready", flush=True)
    try:
        run(fd, model)
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
