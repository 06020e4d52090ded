"""Multiaddr helpers of the host: parsing TCP addresses, our default-route IP, and a check that
a listen port is really free."""

from __future__ import annotations

import errno
import socket

import multiaddr

__all__ = ["parse_tcp_addr", "primary_ip", "ip_of", "check_ports_free"]


def parse_tcp_addr(text: str, *, what: str, peer: str = "no") -> multiaddr.Multiaddr:
    """Parse a TCP multiaddr; `peer` says whether a /p2p/<id> suffix is "no", "may" or "must"."""
    try:
        ma = multiaddr.Multiaddr(text)
    except Exception as exc:
        raise ValueError(f"{what}: invalid multiaddr {text!r}: {exc}") from exc
    names = [p.name for p in ma.protocols()]
    if len(names) < 2 or names[0] not in ("ip4", "ip6", "dns", "dns4", "dns6") or names[1] != "tcp" or names[2:] not in ([], ["p2p"]):
        raise ValueError(f"{what}: {text!r} is not a TCP multiaddr (/ip4/<ip>/tcp/<port>[/p2p/<id>])")
    has_peer = names[2:] == ["p2p"]
    if peer == "must" and not has_peer:
        raise ValueError(f"{what}: {text!r} needs a /p2p/<peer id> suffix")
    if peer == "no" and has_peer:
        raise ValueError(f"{what}: {text!r} must not have a /p2p/ suffix")
    return ma


def primary_ip() -> str | None:
    """The local IPv4 address of the default route, if any (no packet is sent)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: routing lookup only
            ip = s.getsockname()[0]
    except OSError:
        return None
    return None if ip.startswith("127.") or ip == "0.0.0.0" else ip


def ip_of(ma: multiaddr.Multiaddr) -> str | None:
    for proto in ("ip4", "ip6"):
        try:
            return ma.value_for_protocol(proto)
        except Exception:
            continue
    return None


def check_ports_free(listen_addrs: list[str]) -> None:
    """py-libp2p's listener sets SO_REUSEPORT (hole punching dials from the listen port), so a
    second process on the same port would listen too, silently sharing inbound connections
    with the first. Refuse that: a plain bind (SO_REUSEADDR only, so TIME_WAIT leftovers of a
    restart do not count) fails on a port someone listens on. An address that is not this
    machine's fails too, port 0 included (py-libp2p would listen nowhere without a word)."""
    for addr in listen_addrs:
        ma = multiaddr.Multiaddr(addr)
        port = int(ma.value_for_protocol("tcp"))
        ip = ip_of(ma)
        if ip is None:
            continue
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((ip, port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise OSError(exc.errno, f"cannot listen on {addr}: port {port} is in use "
                                             f"(another lamina process?)") from None
                hint = " (not an address of this machine)" if exc.errno == errno.EADDRNOTAVAIL else ""
                raise OSError(exc.errno, f"cannot listen on {addr}: {(exc.strerror or str(exc)).lower()}{hint}") from None
