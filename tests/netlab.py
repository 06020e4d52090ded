"""A network-namespace lab: hosts with their own network stacks on one bridge.

    with NetLab() as lab:
        a, b = lab.add_host(), lab.add_host()
        lab.cut(a, b)                         # a and b cannot reach each other
        proc = subprocess.Popen(a.wrap(["run-node", ...]))

Each host is a namespace with a veth on a bridge in the caller's namespace, which holds the
subnet's first address: the test process (the client) reaches every host, and the hosts reach
each other unless `cut`. A cut drops packets silently in both hosts' own nftables, the way a
NAT or firewall drops unsolicited traffic, so a dial between them hangs until its deadline.
Needs root, `ip` and `nft`; `available()` says why not otherwise. Names carry this process's
id, so parallel runs do not collide, and `close()` removes everything it made.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass


def _run(*argv: str, input: str | None = None) -> None:
    subprocess.run(argv, check=True, input=input, text=True, capture_output=True, timeout=30)


def available() -> str | None:
    """None when the lab can run here; otherwise why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    probe = f"lmprobe{os.getpid() % 100000}"
    try:
        _run("ip", "netns", "add", probe)
        _run("ip", "netns", "del", probe)
    except (subprocess.CalledProcessError, OSError) as exc:
        return f"cannot create a network namespace: {exc}"
    return None


@dataclass(frozen=True)
class LabHost:
    netns: str
    ip: str

    def wrap(self, argv: list[str]) -> list[str]:
        """`argv` run inside this host's namespace (`ip netns exec` execs it: same pid)."""
        return ["ip", "netns", "exec", self.netns, *argv]


class NetLab:
    def __init__(self) -> None:
        tag = os.getpid() % 100000
        self._prefix = f"lm{tag}"
        self.subnet = f"10.213.{tag % 250}"
        self.gateway = f"{self.subnet}.1"
        self._bridge = f"{self._prefix}br"
        self.hosts: list[LabHost] = []
        self._made_bridge = False

    def __enter__(self) -> "NetLab":
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
            subprocess.run(["ip", "netns", "del", host.netns], capture_output=True, timeout=30)
        self.hosts = []
        if self._made_bridge:
            subprocess.run(["ip", "link", "del", self._bridge], capture_output=True, timeout=30)
            self._made_bridge = False
