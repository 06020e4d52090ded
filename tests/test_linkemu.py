"""The lab's userspace link emulator (tests/linkemu.py, `netlab.shape`): its link model exactly,
and real traffic through it between namespaces (ping's RTT, a rate-limited TCP transfer).

The traffic tests assert only what the emulator guarantees whatever the machine's load: no
packet arrives before its delay (the least RTT of 20 pings is at least 2d, and one of them is
within 10% of it), and no transfer beats the rate.
"""

from __future__ import annotations

import re

import pytest

from linkemu import LinkModel
from netlab import read_line, shape, stop


def test_delay_only():
    link = LinkModel(delay=0.025)
    assert link.arrival(1500, 1.0) == pytest.approx(1.025)
    assert link.arrival(1500, 1.0) == pytest.approx(1.025)     # no rate: no serialization


def test_rate_serializes_and_queues():
    link = LinkModel(delay=0.01, rate_bps=8e6)                 # 1 MB/s: 1500 B take 1.5 ms
    assert link.arrival(1500, 0.0) == pytest.approx(0.0115)
    assert link.arrival(1500, 0.0) == pytest.approx(0.013)     # waits for the first on the wire
    assert link.arrival(1500, 1.0) == pytest.approx(1.0115)    # an idle link sends at once


def test_tail_drop_when_the_queue_is_full():
    link = LinkModel(delay=0.0, rate_bps=8e6, limit_bytes=4000)
    kept = [link.arrival(1500, 0.0) for _ in range(4)]
    assert [t is not None for t in kept] == [True, True, False, False]
    assert link.dropped == 2 and link.sent == 2


def test_jitter_keeps_order_and_bounds():
    link = LinkModel(delay=0.02, jitter=0.005, seed=1)
    times = [link.arrival(100, i * 0.001) for i in range(1000)]
    assert times == sorted(times)
    assert all(i * 0.001 + 0.015 <= t <= i * 0.001 + 0.025 + 1e-12 for i, t in enumerate(times))


def test_loss_rate_is_seeded():
    def pattern(seed):
        link = LinkModel(0.0, loss=0.1, seed=seed)
        return [link.arrival(100, 0.0) is None for _ in range(10000)], link

    lost, link = pattern(7)
    assert lost == pattern(7)[0] != pattern(8)[0]
    assert 800 < sum(lost) < 1200 and link.lost == sum(lost)


def test_bad_parameters():
    for kwargs in (dict(delay=-1), dict(delay=0.01, jitter=0.02), dict(delay=0, loss=1.0), dict(delay=0, rate_bps=0)):
        with pytest.raises(ValueError):
            LinkModel(**kwargs)


@pytest.mark.slow
def test_ping_sees_twice_the_delay(nat_lab):
    a, b = nat_lab.add_public_host("a"), nat_lab.add_public_host("b")
    assert shape(a, 25, emulator="user") is not None
    shape(b, 25, emulator="user")
    out = a.run(["ping", "-n", "-c", "20", "-i", "0.05", b.ip], timeout=60)
    rtts = [float(x) for x in re.findall(r"time=([\d.]+) ms", out)]
    assert len(rtts) == 20
    assert 50.0 <= min(rtts) <= 55.0, rtts


SINK = r"""
import socket, time
s = socket.socket(); s.bind(("0.0.0.0", 5001)); s.listen(1); print("up", flush=True)
c, _ = s.accept(); n = 0; t0 = None
while d := c.recv(1 << 20):
    t0 = t0 or time.monotonic()
    n += len(d)
print(n, time.monotonic() - t0, flush=True)
"""
SOURCE = r"""
import socket, sys
c = socket.create_connection((sys.argv[1], 5001)); buf = b"x" * (1 << 16)
for _ in range(48): c.sendall(buf)
c.close()
"""


@pytest.mark.slow
def test_rate_limits_a_transfer(nat_lab):
    a, b = nat_lab.add_public_host("a"), nat_lab.add_public_host("b")
    shape(a, 2, rate_mbit=20, emulator="user")
    sink = b.popen_python(SINK)
    try:
        assert read_line(sink) == "up"
        a.python(SOURCE, b.ip, timeout=60)
        n, seconds = read_line(sink, timeout=60).split()
    finally:
        stop(sink)
    assert int(n) == 48 << 16
    mbit = int(n) * 8 / float(seconds) / 1e6
    assert 5 < mbit <= 20 * 1.05, mbit
