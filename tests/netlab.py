"""Network-namespace labs: hosts with their own network stacks, for reachability and NAT tests.

`NetLab`: hosts on one bridge in the caller's namespace (the test process reaches every host).

    with NetLab() as lab:
        a, b = lab.add_host(), lab.add_host()
        lab.cut(a, b)                         # a and b cannot reach each other
        proc = subprocess.Popen(a.wrap(["run-node", ...]))

Each host is a namespace with a veth on a bridge in the caller's namespace, which holds the
subnet's first address: the test process (the client) reaches every host, and the hosts reach
each other unless `cut`. A cut drops packets silently in both hosts' own nftables, the way a
NAT or firewall drops unsolicited traffic, so a dial between them hangs until its deadline.

`NatLab`: an "internet" and homes behind NAT routers, all in namespaces (the caller's namespace,
its links, routes and nftables are never touched; the test process reaches nothing: run code
in the hosts, `LabHost.run` / `LabHost.python` / `LabHost.popen`).

    with NatLab() as lab:                     # or the `nat_lab` fixture (tests/conftest.py)
        relay = lab.add_public_host("relay")  # relay.ip: a global address on the internet
        a = lab.add_home("a")                 # a.ip 192.168.1.2 behind a.public_ip, nat "eim"
        b = lab.add_home("b", nat="symmetric")
        with Observer(relay) as seen:         # "what address do you see me from" + echo
            a.python(...)                     # connect to seen.addr
        lab.disconnect(relay)                 # the relay's link dies: its packets vanish

Address plan (every lab has its own internet, so parallel labs reuse it): the internet is
11.0.0.0/24 (`INTERNET`, `is_global`), a bridge in the lab's `-inet` namespace holding 11.0.0.1
(`BACKBONE`): every public host's and router's default gateway, a black hole that silently
drops what is not for the internet (a dial to a private address times out, as on the real
internet). Public hosts and routers' WAN legs get 11.0.0.2, .3, ... in the order they are
added. Home N (1, 2, ...) is the LAN 192.168.N.0/24: the router's `lan` is .1, the host .2.

NAT (`table ip lab_nat` in the router): masquerade on `wan`; new connections coming in on `wan`
are dropped, forwarded or to the router itself (a home router: unsolicited inbound vanishes,
it is not refused). "eim": plain masquerade, which keeps the source port when it is free
(endpoint-independent, port-preserving mapping: TCP simultaneous open works between two such
homes). "symmetric": `masquerade random`, a random public port per connection.

Both labs need root, `ip` and `nft`; `available()` / `nat_available()` say why not otherwise.
Names carry this process's id (and a per-process counter), so parallel runs do not collide;
`close()` removes every namespace and link a lab made (their nftables go with them) and kills
the processes still inside its namespaces; it is idempotent. Entering a lab first removes what
labs of dead processes left behind (`cleanup_stale`).
"""

from __future__ import annotations

import functools
import itertools
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

INTERNET = "11.0.0"
BACKBONE = f"{INTERNET}.1"
NATS = ("eim", "symmetric")
_NAT_PREFIX = "lnat"          # NatLab namespaces: lnat<pid>.<k>-<name>
_NAT_NS = re.compile(rf"^{_NAT_PREFIX}(\d+)\.(\d+)-")
_NET_NS = re.compile(r"^lm(\d+)h\d+$")             # NetLab namespaces: lm<pid>h<n>
_NET_LINK = re.compile(r"^lm(\d+)(?:br|v\d+)$")    # NetLab links in the caller's namespace
_SEQ = itertools.count()
_LIVE: set[str] = set()       # prefixes of this process's open labs


class LabError(subprocess.CalledProcessError):
    def __str__(self) -> str:
        return f"{super().__str__()}: {(self.stderr or '').strip()}"


def _run(*argv: str, input: str | None = None, timeout: float = 30) -> str:
    done = subprocess.run(argv, input=input, text=True, capture_output=True, timeout=timeout)
    if done.returncode != 0:
        raise LabError(done.returncode, argv, done.stdout, done.stderr)
    return done.stdout


def _try(*argv: str) -> None:
    subprocess.run(argv, capture_output=True, timeout=30)


def available() -> str | None:
    """None when the lab can run here; otherwise why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    probe = f"lmprobe{os.getpid()}"
    try:
        _run("ip", "netns", "add", probe)
        _run("ip", "netns", "del", probe)
    except (subprocess.CalledProcessError, OSError) as exc:
        return f"cannot create a network namespace: {exc}"
    return None


@functools.cache
def nat_available() -> str | None:
    """None when `NatLab` can run here (namespaces plus nftables NAT, conntrack and bridge
    filtering); otherwise why not."""
    if (why := available()) is not None:
        return why
    probe = f"{_NAT_PREFIX}{os.getpid()}.{next(_SEQ)}-probe"   # left behind: removed as stale
    try:
        _run("ip", "netns", "add", probe)
        try:
            _nft(probe, _router_rules("symmetric") + _BACKBONE_RULES)
        finally:
            _try("ip", "netns", "del", probe)
    except (subprocess.CalledProcessError, OSError) as exc:
        return f"nftables cannot do the lab's NAT here: {exc}"
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(pid: int, prefix: str) -> bool:
    """Whether a lab of process `pid` named `prefix` is left over: its process is dead (or it
    is this process's, the pid of a dead run reused, and no lab of ours has that name)."""
    if pid == os.getpid():
        return prefix not in _LIVE
    return not _alive(pid)


def _namespaces() -> list[str]:
    return [line.split()[0] for line in _run("ip", "netns", "list").splitlines() if line.strip()]


def _kill_inside(netns: str) -> None:
    """SIGKILL every process still inside `netns` (a lab's own, left by a test or a dead run)."""
    done = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True, timeout=30)
    for pid in done.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def _delete_namespace(netns: str) -> None:
    _kill_inside(netns)
    _try("ip", "netns", "del", netns)


def cleanup_stale() -> list[str]:
    """Remove the namespaces and links that labs of dead processes left behind (a crashed test
    run): NatLab's `lnat<pid>.<k>-*` namespaces (their links and nftables go with them) and
    NetLab's `lm<pid>h<n>` namespaces and `lm<pid>br` / `lm<pid>v<n>` links. Returns what it
    removed."""
    removed = []
    for netns in _namespaces():
        if (m := _NAT_NS.match(netns)) and _stale(int(m[1]), f"{_NAT_PREFIX}{m[1]}.{m[2]}"):
            _delete_namespace(netns)
            removed.append(netns)
        elif (m := _NET_NS.match(netns)) and _stale(int(m[1]), f"lm{m[1]}"):
            _delete_namespace(netns)
            removed.append(netns)
    for line in _run("ip", "-o", "link", "show").splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if (m := _NET_LINK.match(name)) and _stale(int(m[1]), f"lm{m[1]}"):
            _try("ip", "link", "del", name)
            removed.append(name)
    return removed


@dataclass(frozen=True)
class LabHost:
    """A host of a lab: its namespace and its address there (for a home host, the private one;
    `public_ip` is its router's WAN address; for a public host both are the same)."""
    netns: str
    ip: str
    public_ip: str | None = None
    nat: str | None = None          # "eim" or "symmetric" for a home host
    router: str | None = None       # a home host's router's namespace
    name: str = ""

    def wrap(self, argv: list[str]) -> list[str]:
        """`argv` run inside this host's namespace (`ip netns exec` execs it: same pid)."""
        return ["ip", "netns", "exec", self.netns, *argv]

    def run(self, argv: list[str], *, timeout: float = 10, input: str | None = None) -> str:
        """Run `argv` inside this host, wait for it (at most `timeout` s) and return its stdout;
        a failure raises LabError with its stderr."""
        return _run(*self.wrap(argv), input=input, timeout=timeout)

    def python(self, code: str, *args: str, timeout: float = 10) -> str:
        """Run a Python snippet (`sys.argv[1:]` = `args`) inside this host; its stdout."""
        return self.run([sys.executable, "-c", code, *args], timeout=timeout)

    def popen(self, argv: list[str], **kwargs) -> subprocess.Popen:
        """Start `argv` inside this host, stdin/stdout/stderr piped, unbuffered (read stdout
        with `read_line`; give a chatty program `stderr=` a file); `stop` it."""
        kwargs.setdefault("stdin", subprocess.PIPE)
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        return subprocess.Popen(self.wrap(argv), bufsize=0, **kwargs)

    def popen_python(self, code: str, *args: str, **kwargs) -> subprocess.Popen:
        return self.popen([sys.executable, "-c", code, *args], **kwargs)


def read_line(proc: subprocess.Popen, timeout: float = 10.0) -> str:
    """The next line `proc` (started by `LabHost.popen`) writes to stdout, without the newline;
    TimeoutError after `timeout` s, EOFError (with its stderr) if it exits first."""
    deadline = time.monotonic() + timeout
    fd = proc.stdout.fileno()
    data = bytearray()
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise TimeoutError(f"no line from {proc.args!r} in {timeout:g} s (so far {bytes(data)!r})")
        chunk = os.read(fd, 1)
        if not chunk:
            proc.kill()
            err = proc.communicate(timeout=10)[1]
            raise EOFError(f"{proc.args!r} ended without a line: {(err or b'').decode(errors='replace')}")
        data += chunk
    return data[:-1].decode()


def stop(proc: subprocess.Popen) -> None:
    """Kill `proc` and reap it."""
    if proc.poll() is None:
        proc.kill()
    try:
        proc.communicate(timeout=10)
    except (ValueError, OSError):       # pipes already closed
        proc.wait(timeout=10)


_OBSERVER = r"""
import socket, sys, threading
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", int(sys.argv[1])))
srv.listen(64)
print(srv.getsockname()[1], flush=True)

def serve(conn, addr):
    with conn:
        conn.sendall(f"{addr[0]} {addr[1]}\n".encode())
        while data := conn.recv(65536):
            conn.sendall(data)

while True:
    conn, addr = srv.accept()
    threading.Thread(target=serve, args=(conn, addr), daemon=True).start()
"""


class Observer:
    """A TCP server inside `host` that tells each client the address it sees it from (one line,
    "<ip> <port>\\n"), then echoes what the client sends until it closes. Ready when made."""

    def __init__(self, host: LabHost, port: int = 0, timeout: float = 10.0) -> None:
        self.host = host
        self.proc = host.popen_python(_OBSERVER, str(port))
        try:
            self.port = int(read_line(self.proc, timeout))
        except BaseException:
            stop(self.proc)
            raise

    @property
    def addr(self) -> tuple[str, int]:
        return (self.host.public_ip or self.host.ip, self.port)

    def close(self) -> None:
        stop(self.proc)

    def __enter__(self) -> "Observer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class NetLab:
    def __init__(self) -> None:
        tag = os.getpid()
        self._prefix = f"lm{tag}"
        self.subnet = f"10.213.{tag % 250}"
        self.gateway = f"{self.subnet}.1"
        self._bridge = f"{self._prefix}br"
        self.hosts: list[LabHost] = []
        self._made_bridge = False

    def __enter__(self) -> "NetLab":
        cleanup_stale()
        _LIVE.add(self._prefix)
        try:
            _run("ip", "link", "add", self._bridge, "type", "bridge")
            self._made_bridge = True
            _run("ip", "addr", "add", f"{self.gateway}/24", "dev", self._bridge)
            _run("ip", "link", "set", self._bridge, "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def add_host(self) -> LabHost:
        n = len(self.hosts) + 2
        host = LabHost(f"{self._prefix}h{n}", f"{self.subnet}.{n}")
        outside = f"{self._prefix}v{n}"
        _run("ip", "netns", "add", host.netns)
        self.hosts.append(host)
        _run("ip", "link", "add", outside, "type", "veth", "peer", "name", "eth0", "netns", host.netns)
        _run("ip", "link", "set", outside, "master", self._bridge, "up")
        _run("ip", "-n", host.netns, "addr", "add", f"{host.ip}/24", "dev", "eth0")
        _run("ip", "-n", host.netns, "link", "set", "eth0", "up")
        _run("ip", "-n", host.netns, "link", "set", "lo", "up")
        _run("ip", "-n", host.netns, "route", "add", "default", "via", self.gateway)
        return host

    def cut(self, a: LabHost, b: LabHost) -> None:
        """Drop everything between `a` and `b`, both ways, silently."""
        for here, there in ((a, b), (b, a)):
            _run("ip", "netns", "exec", here.netns, "nft", "-f", "-", input=(
                f"table inet lamina_cut_{there.ip.replace('.', '_')} {{\n"
                f"  chain out {{ type filter hook output priority 0; ip daddr {there.ip} drop; }}\n"
                f"  chain in {{ type filter hook input priority 0; ip saddr {there.ip} drop; }}\n"
                f"}}\n"))

    def drop_inbound(self, host: LabHost, port: int) -> None:
        """Drop TCP packets to `port` on `host` silently, from everyone (a port a NAT does not
        forward)."""
        _run("ip", "netns", "exec", host.netns, "nft", "-f", "-", input=(
            f"table inet lamina_port_{port} {{\n"
            f"  chain in {{ type filter hook input priority 0; tcp dport {port} drop; }}\n"
            f"}}\n"))

    def close(self) -> None:
        for host in self.hosts:   # deleting a namespace deletes its veth end and the pair
            _delete_namespace(host.netns)
        self.hosts = []
        if self._made_bridge:
            _try("ip", "link", "del", self._bridge)
            self._made_bridge = False
        _LIVE.discard(self._prefix)


# the internet's namespace: a black hole for what is not on the internet (routed to BACKBONE),
# and a set of bridge ports whose packets vanish (`NatLab.disconnect`)
_BACKBONE_RULES = f"""
table ip lab_backbone {{
  chain c_pre {{ type filter hook prerouting priority 0; policy accept; ip daddr != {INTERNET}.0/24 drop; }}
}}
table bridge lab_links {{
  set cut {{ type ifname; }}
  chain c_fwd {{ type filter hook forward priority 0; policy accept; iifname @cut drop; oifname @cut drop; }}
}}
"""


def _router_rules(nat: str) -> str:
    masquerade = {"eim": "masquerade", "symmetric": "masquerade random"}[nat]
    return f"""
table ip lab_nat {{
  chain c_post {{ type nat hook postrouting priority srcnat; policy accept; oifname "wan" {masquerade}; }}
  chain c_fwd {{ type filter hook forward priority filter; policy accept; iifname "wan" ct state new drop; }}
  chain c_in {{ type filter hook input priority filter; policy accept; iifname "wan" ct state new drop; }}
}}
"""


def _nft(netns: str, rules: str) -> None:
    _run("ip", "netns", "exec", netns, "nft", "-f", "-", input=rules)


class NatLab:
    """An internet with public hosts and homes behind NAT routers (see the module's doc)."""

    def __init__(self) -> None:
        self.prefix = f"{_NAT_PREFIX}{os.getpid()}.{next(_SEQ)}"
        self.inet = f"{self.prefix}-inet"
        self.hosts: dict[str, LabHost] = {}
        self._namespaces: list[str] = []     # made, in order
        self._ports: dict[str, str] = {}     # namespace on the internet -> its bridge port
        self._next_ip = 2
        self._homes = 0

    def __enter__(self) -> "NatLab":
        cleanup_stale()
        _LIVE.add(self.prefix)
        try:
            self._add_namespace(self.inet)
            _run("ip", "-n", self.inet, "link", "add", "br0", "type", "bridge")
            _run("ip", "-n", self.inet, "addr", "add", f"{BACKBONE}/24", "dev", "br0")
            _run("ip", "-n", self.inet, "link", "set", "br0", "up")
            _nft(self.inet, _BACKBONE_RULES)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Remove every namespace the lab made (with their links and nftables), killing what
        still runs inside them. Idempotent."""
        for netns in reversed(self._namespaces):
            _delete_namespace(netns)
        self._namespaces = []
        self._ports = {}
        _LIVE.discard(self.prefix)

    def add_public_host(self, name: str) -> LabHost:
        """A host on the internet: `ip` (= `public_ip`) is a global address."""
        netns = self._new_name(name)
        ip = self._public_ip()
        self._add_namespace(netns)
        self._attach(netns, "eth0", ip)
        return self._keep(LabHost(netns, ip, public_ip=ip, name=name))

    def add_home(self, name: str, nat: str = "eim") -> LabHost:
        """A host behind its own NAT router (`nat`: "eim" or "symmetric"); `ip` is its private
        address, `public_ip` its router's, `router` the router's namespace."""
        if nat not in NATS:
            raise ValueError(f"nat must be one of {NATS}, not {nat!r}")
        netns = self._new_name(name)
        router = f"{netns}-gw"
        if self._homes >= 254:
            raise ValueError("at most 254 homes")
        self._homes += 1
        lan = f"192.168.{self._homes}"
        wan_ip = self._public_ip()
        self._add_namespace(router)
        self._attach(router, "wan", wan_ip)
        self._add_namespace(netns)
        _run("ip", "-n", router, "link", "add", "lan", "type", "veth", "peer", "name", "eth0", "netns", netns)
        _run("ip", "-n", router, "addr", "add", f"{lan}.1/24", "dev", "lan")
        _run("ip", "-n", router, "link", "set", "lan", "up")
        _run("ip", "-n", netns, "addr", "add", f"{lan}.2/24", "dev", "eth0")
        _run("ip", "-n", netns, "link", "set", "eth0", "up")
        _run("ip", "-n", netns, "route", "add", "default", "via", f"{lan}.1")
        _run("ip", "netns", "exec", router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        _nft(router, _router_rules(nat))
        return self._keep(LabHost(netns, f"{lan}.2", public_ip=wan_ip, nat=nat, router=router, name=name))

    def disconnect(self, host: LabHost) -> None:
        """Cut `host` (a public host, or a home with its router) off the internet abruptly:
        from now on every packet to or from it vanishes silently, both ways (its processes and
        connections live on, unanswered, as when a machine or its link dies)."""
        self._links("add", host)

    def reconnect(self, host: LabHost) -> None:
        """Undo `disconnect`: packets flow again (connections that have not timed out resume)."""
        self._links("delete", host)

    def _links(self, verb: str, host: LabHost) -> None:
        port = self._ports[host.router or host.netns]
        _run("ip", "netns", "exec", self.inet, "nft", verb, "element", "bridge", "lab_links", "cut",
             f'{{ "{port}" }}')

    def _new_name(self, name: str) -> str:
        if not re.fullmatch(r"[a-z][a-z0-9_]{0,19}", name):
            raise ValueError(f"a lab host's name is [a-z][a-z0-9_]{{0,19}}, not {name!r}")
        netns = f"{self.prefix}-{name}"
        if name in self.hosts or netns in self._namespaces:
            raise ValueError(f"there is already a lab host {name!r}")
        return netns

    def _public_ip(self) -> str:
        if self._next_ip > 254:
            raise ValueError("the lab's internet is full")
        self._next_ip += 1
        return f"{INTERNET}.{self._next_ip - 1}"

    def _keep(self, host: LabHost) -> LabHost:
        self.hosts[host.name] = host
        return host

    def _add_namespace(self, netns: str) -> None:
        _run("ip", "netns", "add", netns)
        self._namespaces.append(netns)
        _run("ip", "-n", netns, "link", "set", "lo", "up")

    def _attach(self, netns: str, dev: str, ip: str) -> None:
        """Plug `netns` into the internet: a veth `dev` with `ip`, default route via BACKBONE."""
        port = f"p{len(self._ports)}"
        _run("ip", "-n", self.inet, "link", "add", port, "type", "veth", "peer", "name", dev, "netns", netns)
        self._ports[netns] = port
        _run("ip", "-n", self.inet, "link", "set", port, "master", "br0", "up")
        _run("ip", "-n", netns, "addr", "add", f"{ip}/24", "dev", dev)
        _run("ip", "-n", netns, "link", "set", dev, "up")
        _run("ip", "-n", netns, "route", "add", "default", "via", BACKBONE)


_LINKEMU = os.path.join(os.path.dirname(os.path.abspath(__file__)), "linkemu.py")


def shape(host: LabHost, delay_ms: float, *, jitter_ms: float = 0.0, loss: float = 0.0,
          rate_mbit: float | None = None, limit_bytes: int = 1 << 20, seed: int | None = None,
          emulator: str = "auto") -> subprocess.Popen | None:
    """Everything `host` sends from now on goes through an emulated link: held `delay_ms`
    (+- `jitter_ms`), lost with probability `loss`, serialized at `rate_mbit`. Shape every host
    of a lab with delay d and any two of them see a one-way latency of d (an RTT of 2d).
    `emulator`: "netem" (the kernel's qdisc on the host's eth0), "user" (tests/linkemu.py, in
    the host's namespace: returned; the lab's close kills it, and killing it cuts the host's
    outbound traffic), or "auto": netem where the kernel has it, else user. Once per host."""
    if emulator not in ("auto", "netem", "user"):
        raise ValueError(f"emulator must be auto, netem or user, not {emulator!r}")
    if emulator != "user":
        argv = ["tc", "-n", host.netns, "qdisc", "add", "dev", "eth0", "root", "netem", "delay", f"{delay_ms}ms"]
        argv += [f"{jitter_ms}ms"] if jitter_ms else []
        argv += ["loss", f"{loss * 100}%"] if loss else []
        argv += ["rate", f"{rate_mbit}mbit"] if rate_mbit else []
        argv += ["limit", str(max(1, limit_bytes // 1500))]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        if done.returncode == 0:
            return None
        if emulator == "netem":
            raise LabError(done.returncode, argv, done.stdout, done.stderr)
    dev = "lemu0"
    _run("ip", "-n", host.netns, "tuntap", "add", "dev", dev, "mode", "tun")
    _run("ip", "netns", "exec", host.netns, "sysctl", "-qw", "net.ipv4.ip_forward=1",
         "net.ipv4.conf.all.rp_filter=0", f"net.ipv4.conf.{dev}.rp_filter=0", f"net.ipv4.conf.{dev}.accept_local=1")
    argv = [sys.executable, _LINKEMU, "--dev", dev, "--delay-ms", str(delay_ms), "--jitter-ms", str(jitter_ms),
            "--loss", str(loss), "--limit-bytes", str(limit_bytes)]
    argv += ["--rate-mbit", str(rate_mbit)] if rate_mbit else []
    argv += ["--seed", str(seed)] if seed is not None else []
    proc = host.popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if read_line(proc, timeout=30) != "ready":
            raise RuntimeError(f"the link emulator of {host.name or host.netns} did not start")
        _run("ip", "-n", host.netns, "link", "set", dev, "up")
        _run("ip", "-n", host.netns, "route", "add", "default", "dev", dev, "table", "100", "src", host.ip)
        _run("ip", "-n", host.netns, "rule", "add", "iif", "lo", "lookup", "100", "pref", "100")
    except BaseException:
        stop(proc)
        raise
    return proc


def skip_unless_nat_lab() -> None:
    """Skip the calling test, saying why, where `NatLab` cannot run; with LAMINA_REQUIRE_NETLAB=1
    in the environment (for CI, where it must run) fail it instead."""
    import pytest

    if (why := nat_available()) is not None:
        if os.environ.get("LAMINA_REQUIRE_NETLAB") == "1":
            pytest.fail(f"LAMINA_REQUIRE_NETLAB=1 but the NAT lab cannot run here: {why}")
        pytest.skip(f"no NAT lab here: {why}")


def open_nat_lab(request) -> NatLab:
    """For a pytest fixture: a started NatLab closed by `request`'s finalizer (or the test is
    skipped: `skip_unless_nat_lab`)."""
    skip_unless_nat_lab()
    lab = NatLab()
    request.addfinalizer(lab.close)
    return lab.__enter__()
