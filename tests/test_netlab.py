"""The NAT lab (`netlab.NatLab`) behaves as the NAT-traversal tests assume, with real sockets in
its namespaces: homes reach the internet and the internet does not reach them (packets vanish:
dials time out, they are not refused); an "eim" NAT keeps a local port for every destination, a
"symmetric" one picks new ports; TCP simultaneous open punches through two eim NATs and not
through a symmetric one; `disconnect` silences a host; nothing of a lab outlives it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from ipaddress import ip_address

import pytest

import netlab
from _wait import eventually_sync
from netlab import LabHost, NatLab, Observer, read_line, stop

pytestmark = pytest.mark.slow   # network namespaces and Python processes inside them

# connect to each argv[2:] ("ip:port") at once, within argv[1] s; print a line for each, in
# order: "ok <what the server sends first>" (read within 10 s) or what failed
_DIAL = r"""
import socket, sys, threading

def dial(i, target):
    ip, port = target.split(":")
    s = socket.socket()
    s.settimeout(float(sys.argv[1]))
    try:
        s.connect((ip, int(port)))
        s.settimeout(10)
        out[i] = "ok " + s.makefile().readline().strip()
    except socket.timeout:
        out[i] = "timeout"
    except ConnectionRefusedError:
        out[i] = "refused"
    except OSError as e:
        out[i] = f"error {e}"

out = [None] * (len(sys.argv) - 2)
threads = [threading.Thread(target=dial, args=(i, t)) for i, t in enumerate(sys.argv[2:])]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("\n".join(out))
"""

# listen on argv[1], say "ready", accept and answer "hello" until killed
_LISTEN = r"""
import socket, sys
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", int(sys.argv[1])))
srv.listen(8)
print("ready", flush=True)
while True:
    conn, _ = srv.accept()
    conn.sendall(b"hello\n")
    conn.close()
"""

# from local port argv[1], connect to each observer argv[2:] ("ip:port"); print what each saw
_MAPPINGS = r"""
import socket, sys
keep = []
for dst in sys.argv[2:]:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("0.0.0.0", int(sys.argv[1])))
    s.settimeout(5)
    ip, port = dst.split(":")
    s.connect((ip, int(port)))
    print(s.makefile().readline().strip())
    keep.append(s)
"""

# TCP simultaneous open: bind local port argv[1], say "ready", wait for "go" on stdin, then
# connect to argv[2]:argv[3] from it, retrying until argv[4] s have passed; on success send
# argv[5] and print "ok <the other side's line>", else "fail <the last error>"
_PUNCH = r"""
import socket, sys, time
lport, rip, rport, budget, me = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]

def bound():
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("0.0.0.0", lport))
    return s

first = bound()
print("ready", flush=True)
sys.stdin.readline()
deadline, last, s = time.monotonic() + budget, None, first
while (left := deadline - time.monotonic()) > 0:
    s = s or bound()
    s.settimeout(left)
    try:
        s.connect((rip, rport))
    except OSError as e:
        last = e
        s.close()
        s = None
        if not isinstance(e, socket.timeout):
            time.sleep(0.05)    # refused: the other side is not there yet
        continue
    s.settimeout(5)
    s.sendall(f"{me}\n".encode())
    print("ok", s.makefile().readline().strip(), flush=True)
    break
else:
    print("fail", repr(last), flush=True)
"""

# a client driven by stdin: "connect <ip> <port> <timeout>" prints the observer's line or
# "timeout"; "send <word> <timeout>" prints the echo or "timeout"
_CLIENT = r"""
import socket, sys
s = None
for line in sys.stdin:
    cmd, *args = line.split()
    try:
        if cmd == "connect":
            s = socket.create_connection((args[0], int(args[1])), timeout=float(args[2]))
            s.settimeout(10)
            f = s.makefile()
            print(f.readline().strip(), flush=True)
        else:
            s.settimeout(float(args[1]))
            s.sendall(f"{args[0]}\n".encode())
            print(f.readline().strip(), flush=True)
    except socket.timeout:
        print("timeout", flush=True)
"""


def _dial(src: LabHost, ip: str, port: int, timeout: float = 1.0) -> str:
    return _dials(src, [(ip, port)], timeout)[0]


def _dials(src: LabHost, targets: list[tuple[str, int]], timeout: float = 1.0) -> list[str]:
    """Dial all `targets` from `src` at once: "ok <first line>", "timeout", "refused"..."""
    return src.python(_DIAL, str(timeout), *(f"{ip}:{port}" for ip, port in targets), timeout=30).splitlines()


def test_a_home_reaches_the_internet_and_the_internet_does_not_reach_it(nat_lab: NatLab) -> None:
    relay, home = nat_lab.add_public_host("relay"), nat_lab.add_home("home")
    assert relay.ip == relay.public_ip and home.ip == "192.168.1.2" and home.public_ip != relay.ip
    # what the code under test calls public and private
    assert ip_address(relay.ip).is_global and ip_address(home.public_ip).is_global
    assert not ip_address(home.ip).is_global
    with Observer(relay) as seen:
        status, ip, _ = _dial(home, *seen.addr).split()
        assert (status, ip) == ("ok", home.public_ip)
        assert _dial(home, relay.ip, seen.port + 1) == "refused"   # a live host answers a closed port
    listener = home.popen_python(_LISTEN, "4001")
    try:
        assert read_line(listener) == "ready"
        assert _dial(home, home.ip, 4001) == "ok hello"
        # unsolicited inbound vanishes: at the private address (not routed on the internet) and
        # at the router's public one (the NAT drops new connections): a time-out, not a refusal
        assert _dials(relay, [(home.ip, 4001), (home.public_ip, 4001), (home.public_ip, 4002)]) == ["timeout"] * 3
    finally:
        stop(listener)


def _mappings(home: LabHost, observers: list[Observer], local_port: int) -> list[tuple[str, int]]:
    out = home.python(_MAPPINGS, str(local_port), *(f"{o.addr[0]}:{o.addr[1]}" for o in observers), timeout=30)
    return [(ip, int(port)) for ip, port in (line.split() for line in out.splitlines())]


def test_an_eim_nat_maps_a_local_port_to_the_same_public_port_for_every_destination(nat_lab: NatLab) -> None:
    one, two = nat_lab.add_public_host("one"), nat_lab.add_public_host("two")
    home = nat_lab.add_home("home", nat="eim")
    with Observer(one) as first, Observer(two) as second:
        for local_port in (40001, 40002):
            assert _mappings(home, [first, second], local_port) == [(home.public_ip, local_port)] * 2


def test_a_symmetric_nat_maps_each_connection_to_its_own_port(nat_lab: NatLab) -> None:
    one, two = nat_lab.add_public_host("one"), nat_lab.add_public_host("two")
    home = nat_lab.add_home("home", nat="symmetric")
    assert home.nat == "symmetric"
    with Observer(one) as first, Observer(two) as second:
        seen = {port: _mappings(home, [first, second], port) for port in (40001, 40002, 40003)}
    assert all(ip == home.public_ip for pairs in seen.values() for ip, _ in pairs), seen
    # random ports: equal by chance with probability ~1/64000 each, so demand one difference
    assert any(a != b for (_, a), (_, b) in seen.values()), seen
    assert any(public != port for port, pairs in seen.items() for _, public in pairs), seen


def _punch(a: LabHost, b: LabHost, port: int, budget: float) -> tuple[str, str, float]:
    """Both hosts connect from `port` to each other's public address at `port`, at once."""
    procs = [x.popen_python(_PUNCH, str(port), y.public_ip, str(port), str(budget), x.name)
             for x, y in ((a, b), (b, a))]
    try:
        assert [read_line(p) for p in procs] == ["ready", "ready"]
        started = time.monotonic()
        for p in procs:
            p.stdin.write(b"go\n")
        outcome = [read_line(p, timeout=budget + 5) for p in procs]
        return outcome[0], outcome[1], time.monotonic() - started
    finally:
        for p in procs:
            stop(p)


def test_simultaneous_open_punches_through_two_eim_nats(nat_lab: NatLab) -> None:
    a, b = nat_lab.add_home("a", nat="eim"), nat_lab.add_home("b", nat="eim")
    assert _dial(a, b.public_ip, 4001) == "timeout"     # one side alone does not get in
    got_a, got_b, _ = _punch(a, b, 4001, budget=3.0)
    assert (got_a, got_b) == ("ok b", "ok a")


def test_simultaneous_open_fails_against_a_symmetric_nat(nat_lab: NatLab) -> None:
    a, b = nat_lab.add_home("a", nat="eim"), nat_lab.add_home("b", nat="symmetric")
    got_a, got_b, took = _punch(a, b, 4001, budget=2.0)
    assert got_a.startswith("fail") and got_b.startswith("fail"), (got_a, got_b)
    assert took < 2.0 + 2, took


def test_a_disconnected_host_goes_silent_until_reconnected(nat_lab: NatLab) -> None:
    relay, home = nat_lab.add_public_host("relay"), nat_lab.add_home("home")
    with Observer(relay) as seen:
        client = home.popen_python(_CLIENT)
        try:
            def ask(line: str) -> str:
                client.stdin.write(f"{line}\n".encode())
                return read_line(client, timeout=20)

            connect = f"connect {seen.addr[0]} {seen.port}"
            assert ask(f"{connect} 10").startswith(home.public_ip)
            assert ask("send one 10") == "one"
            nat_lab.disconnect(relay)
            # silence (a dropped packet is never answered: half a second is plenty to tell)
            assert ask("send two 0.5") == "timeout"       # on the open connection
            assert ask(f"{connect} 0.5") == "timeout"
            nat_lab.reconnect(relay)
            assert ask(f"{connect} 10").startswith(home.public_ip)
            nat_lab.disconnect(home)                      # a home's link (its router's) dies
            assert ask("send three 0.5") == "timeout"
            assert _dial(home, *seen.addr, timeout=0.5) == "timeout"
        finally:
            stop(client)


def _ours(lab: NatLab | None = None) -> tuple[set[str], set[str], set[str]]:
    """What labs of this process (or `lab`) have on the machine: namespaces, links in the
    caller's namespace and its nftables (other processes' labs may come and go meanwhile)."""
    prefix = lab.prefix if lab else f"lnat{os.getpid()}."
    namespaces = {line.split()[0] for line in subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout.splitlines()}
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True).stdout
    return ({ns for ns in namespaces if ns.startswith(prefix)},
            {name for line in links.splitlines()
             if (name := line.split(":")[1].strip()).startswith(("lnat", f"lm{os.getpid()}"))},
            {t for t in tables.splitlines() if "lab_" in t or "lamina_" in t})


def test_close_removes_everything_even_after_an_exception() -> None:
    netlab.skip_unless_nat_lab()
    assert _ours() == (set(), set(), set())
    with pytest.raises(RuntimeError, match="half-way"):
        with NatLab() as lab:
            relay, home = lab.add_public_host("relay"), lab.add_home("home", nat="symmetric")
            lab.disconnect(home)
            seen = Observer(relay)     # left running: close() ends what runs in its namespaces
            assert _ours(lab)[0] == {relay.netns, home.netns, home.router, lab.inet}
            assert _ours(lab)[1:] == (set(), set())    # nothing in the caller's namespace
            raise RuntimeError("a test failed half-way")
    eventually_sync(lambda: seen.proc.poll() is not None, timeout=10)
    stop(seen.proc)
    assert _ours() == (set(), set(), set())
    lab.close()                        # idempotent
    assert _ours() == (set(), set(), set())


def test_labs_left_by_dead_processes_are_removed_and_live_ones_kept() -> None:
    netlab.skip_unless_nat_lab()
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = os.getppid()
    stale = [f"lnat{dead.pid}.0-inet", f"lnat{dead.pid}.3-home-gw", f"lm{dead.pid}h2"]
    kept = f"lnat{live}.0-inet"
    made = [*stale, kept]
    try:
        for netns in made:
            subprocess.run(["ip", "netns", "add", netns], check=True, timeout=30)
        subprocess.run(["ip", "link", "add", f"lm{dead.pid}br", "type", "bridge"], check=True, timeout=30)
        with NatLab() as lab:
            lab.add_public_host("relay")
            namespaces = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                            check=True).stdout.split())
            assert not set(stale) & namespaces and kept in namespaces, namespaces
            links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
            assert f" lm{dead.pid}br:" not in links, links
    finally:
        for netns in made:
            subprocess.run(["ip", "netns", "del", netns], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", f"lm{dead.pid}br"], capture_output=True, timeout=30)


_CRASH = r"""
import os, subprocess, sys
sys.path.insert(0, sys.argv[1])
import netlab
lab = netlab.NatLab().__enter__()
home = lab.add_home("home")
devnull = subprocess.DEVNULL
orphan = home.popen(["sleep", "60"], stdin=devnull, stdout=devnull, stderr=devnull)
made = [ns for ns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
        if ns.startswith(lab.prefix + "-")]
print(lab.prefix, orphan.pid, *sorted(made), flush=True)
os._exit(1)
"""


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")   # dead, maybe not reaped
    except FileNotFoundError:
        return True


def test_a_crashed_run_leaves_nothing_to_the_next_one() -> None:
    """A process that dies with its lab open leaves namespaces and a process inside them: the
    next lab removes both."""
    netlab.skip_unless_nat_lab()
    out = subprocess.run([sys.executable, "-c", _CRASH, os.path.dirname(netlab.__file__)],
                         capture_output=True, text=True, timeout=30).stdout
    prefix, orphan, *made = out.split()
    assert made == [f"{prefix}-home", f"{prefix}-home-gw", f"{prefix}-inet"], out
    # (another process's lab may clean them up first: what counts is that they are gone)
    with NatLab():
        namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
        assert not [ns for ns in namespaces if ns.startswith(f"{prefix}-")], namespaces
        eventually_sync(lambda: _gone(int(orphan)), timeout=10)
