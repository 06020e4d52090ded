"""Nodes behind real NATs (tests/netlab.py `NatLab`): network namespaces, veth pairs, nftables
masquerade, unsolicited inbound dropped like a home router.

    internet 11.0.0.0/24:  boot, relay2, relay3 (lamina-bootstrap: bootstrap peers and relays)
    home1 (EIM NAT):       node A, blocks 0:4
    home2 (symmetric NAT): node B, blocks 4:8
    home3 (EIM NAT):       the client (tests/_lab_client.py)

Nobody can dial A, B or the client. A and B find that out by dial-back, reserve slots on two
relays each and announce circuit addresses. The client reaches A through a relay and punches a
hole to a direct connection (both NATs keep ports); B's NAT randomizes ports, so the client and
A reach it through a relay. Tokens are the local model's, exactly.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import netlab
from conftest import assert_decisive
from pipeline import LocalModelForCausalLM
from pipeline.launch import run_node_command, start_node

pytestmark = pytest.mark.slow   # network namespaces, seven processes

CLIENT = str(Path(__file__).with_name("_lab_client.py"))
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def local(tiny_model):
    return LocalModelForCausalLM.from_pretrained(tiny_model)


def _bootstrap(host: netlab.LabHost, log: Path, peers: list[str], key: Path | None):
    argv = [sys.executable, "-m", "node._bootstrap", "--listen", f"/ip4/{host.ip}/tcp/4001",
            "--log-level", "DEBUG", *(["--initial-peers", *peers] if peers else []),
            *(["--swarm-key", str(key)] if key else [])]
    proc = host.popen(argv, stderr=open(log, "ab"))
    line = netlab.read_line(proc, timeout=60)
    assert line.startswith("bootstrap at "), line
    return proc, line.split()[2]


def _wait_log(path: Path, pattern: str, count: int = 1, timeout: float = 90.0) -> list[str]:
    """Wait until `pattern` matched `count` lines of the log at `path`; the matches."""
    deadline = time.monotonic() + timeout
    while True:
        found = re.findall(pattern, path.read_text(errors="replace")) if path.exists() else []
        if len(found) >= count:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{path.name}: {pattern!r} seen {len(found)} of {count} times")
        time.sleep(0.1)


class Swarm:
    """The lab of the module docstring, its processes, and the ids of everyone."""

    def __init__(self, lab: netlab.NatLab, model: Path, logs: Path, key: Path | None = None) -> None:
        self.lab, self.model, self.logs, self.key = lab, model, logs, key
        self.procs = []
        self.public = {n: lab.add_public_host(n) for n in ("boot", "relay2", "relay3")}
        self.homes = {"a": lab.add_home("home1", nat="eim"), "b": lab.add_home("home2", nat="symmetric"),
                      "client": lab.add_home("home3", nat="eim")}
        self.addr: dict[str, str] = {}
        for name, host in self.public.items():
            proc, addr = _bootstrap(host, logs / f"{name}.log", [self.addr["boot"]] if self.addr else [], key)
            self.procs.append(proc)
            self.addr[name] = addr
        self.ids = {name: addr.rsplit("/", 1)[1] for name, addr in self.addr.items()}
        self.nodes = {}
        for name, blocks in (("a", "0:4"), ("b", "4:8")):
            log = logs / f"{name}.log"
            args = ["--blocks", blocks, "--listen", "/ip4/0.0.0.0/tcp/0", "--num-threads", "1",
                    "--initial-peers", *self.addr.values(), "--log-level", "DEBUG",
                    *(["--swarm-key", str(key)] if key else [])]
            node = start_node(model, args, log, prefix=self.homes[name].wrap([]))
            self.procs.append(node.proc)
            self.nodes[name] = node
            self.ids[name] = node.peer_id
        for name in ("a", "b"):   # not dialable, found by dial-back; slots on two relays
            _wait_log(logs / f"{name}.log", r"reachability: relayed")
            _wait_log(logs / f"{name}.log", r"relay reservation on \S+ at", count=2)

    def client(self, *extra: str, via: str = "boot") -> subprocess.Popen:
        argv = [sys.executable, CLIENT, str(self.model), self.addr[via], *extra,
                *(["--swarm-key", str(self.key)] if self.key else [])]
        return self.homes["client"].popen(argv, stderr=open(self.logs / "client.log", "ab"))

    def stop(self) -> None:
        for proc in self.procs:
            netlab.stop(proc)


def _events(proc, until: str, timeout: float = 120.0, log: Path | None = None) -> dict:
    while True:
        event = json.loads(netlab.read_line(proc, timeout=timeout))
        if event["event"] == "error":
            raise AssertionError(f"the client failed: {event}" + (_tail(log) if log else ""))
        if event["event"] == until:
            return event


def _tail(log: Path, lines: int = 40) -> str:
    """The client's last lamina log lines, for the failure message (CI shows no files)."""
    ours = [line[:400] for line in log.read_text(errors="replace").splitlines() if " lamina." in line]
    return "\nthe client's log ends:\n" + "\n".join(ours[-lines:])


@pytest.fixture
def swarm(nat_lab, tiny_model, tmp_path):
    s = None
    try:
        s = Swarm(nat_lab, tiny_model, tmp_path)
        yield s
    finally:
        if s is not None:
            s.stop()


def _prompt(local) -> tuple[str, torch.Tensor]:
    prompt = torch.tensor([local.tokenizer.encode("Once upon a time, in a small village")])
    expected = assert_decisive(local, local.generate(prompt, max_new_tokens=NEW_TOKENS, eos_token_id=[]),
                               NEW_TOKENS)
    return ",".join(str(t) for t in prompt[0].tolist()), expected[0, prompt.shape[1]:].tolist()


def test_generation_through_two_nats_hole_punched_and_relayed(swarm, local) -> None:
    prompt, expected = _prompt(local)
    proc = swarm.client("--prompt", prompt, "--new", str(NEW_TOKENS))
    done = _events(proc, "done", log=swarm.logs / "client.log")
    assert done["tokens"] == expected
    assert done["route"] == [swarm.ids["a"], swarm.ids["b"]]
    # the client and A (both behind port-keeping NATs): hole punched, a direct connection
    assert "direct" in done["conns"][swarm.ids["a"]], done["conns"]
    # B's NAT randomizes ports: only the relay reaches it
    assert done["conns"][swarm.ids["b"]] == ["relayed"], done["conns"]
    assert done["failovers"] == 0
    # A pushed to B over its own relayed connection: the client relayed no step
    assert not done["client_relayed"], done
    # the client measured both hops for its next routes, B's through the relay
    assert set(done["rtts"]) == {swarm.ids["a"], swarm.ids["b"]}, done["rtts"]


def _through_a_dying_relay(swarm: Swarm, prompt: str, expected: list[int], how: str, via: str) -> str:
    """One generation (the client bootstrapping from `via`) whose relay to B dies after 4
    tokens, killed (its connections close) or frozen (SIGSTOP: its connections go silent, nobody
    is told): the client fails over through B's other relay, with the same tokens. Returns the
    dead relay's name."""
    proc = swarm.client("--prompt", prompt, "--new", str(NEW_TOKENS), "--pause-after", "4", via=via)
    paused = _events(proc, "paused")
    (dead_id,) = set(paused["via"][swarm.ids["b"]])
    dead = next(name for name, peer in swarm.ids.items() if peer == dead_id)
    relay = swarm.procs[list(swarm.public).index(dead)]
    if how == "killed":
        netlab.stop(relay)
    else:
        relay.send_signal(signal.SIGSTOP)   # killed at teardown
    proc.stdin.write(b"go\n")
    done = _events(proc, "done", log=swarm.logs / "client.log")
    assert done["tokens"] == expected, how
    assert done["failovers"] >= 1 or done["reopened"] >= 1, done
    return dead


def test_relays_die_mid_generation(swarm, local) -> None:
    """The relay that carries B's traffic is killed after 4 tokens: the client fails over
    through B's other relay, and B reserves on the third. Then a second client's relay to B is
    frozen after 4 tokens: it fails over through B's last relay. The tokens are the local
    model's both times."""
    prompt, expected = _prompt(local)
    held = set(re.findall(r"relay reservation on (\S+) at", (swarm.logs / "b.log").read_text()))
    spare = next(n for n in swarm.public if swarm.ids[n] not in held)
    dead = _through_a_dying_relay(swarm, prompt, expected, "killed", via="boot")
    # B holds two reservations again, the new one on the relay it did not use before
    _wait_log(swarm.logs / "b.log", rf"relay reservation on {swarm.ids[spare]} at")
    _through_a_dying_relay(swarm, prompt, expected, "frozen", via=spare if dead == "boot" else "boot")


def test_a_private_swarm_through_nats(nat_lab, tiny_model, tmp_path, local) -> None:
    """Every peer with the swarm key: relays, hole punching and relayed hops all work over the
    protected connections. Without the key, or with another one, neither a client nor a node
    gets in: each is told, in one sentence, to check the swarm key."""
    from p2p import SwarmKey

    key, wrong = tmp_path / "swarm.key", tmp_path / "wrong.key"
    key.write_text(SwarmKey.generate().to_text())
    wrong.write_text(SwarmKey.generate().to_text())
    s = None
    try:
        s = Swarm(nat_lab, tiny_model, tmp_path, key=key)
        prompt, expected = _prompt(local)
        done = _events(s.client("--prompt", prompt, "--new", str(NEW_TOKENS)), "done")
        assert done["tokens"] == expected
        assert "direct" in done["conns"][s.ids["a"]] and done["conns"][s.ids["b"]] == ["relayed"], done["conns"]
        for extra in ([], ["--swarm-key", str(wrong)]):
            s.key = None
            proc = s.client("--prompt", prompt, "--new", "1", *extra)
            event = json.loads(netlab.read_line(proc, timeout=120))
            assert event["event"] == "error" and event["type"] == "SwarmUnavailableError", event
            assert "--swarm-key" in event["message"], event
            s.key = key
        # a node with the wrong key: run-node says so and exits
        outsider = s.homes["client"].popen(
            [*run_node_command(), "--model", str(tiny_model), "--blocks", "0:8", "--listen", "/ip4/0.0.0.0/tcp/0",
             "--initial-peers", s.addr["boot"], "--swarm-key", str(wrong)], stderr=subprocess.PIPE)
        _, err = outsider.communicate(timeout=120)
        assert outsider.returncode == 1 and b"--swarm-key" in err.splitlines()[-1], err[-2000:]
    finally:
        if s is not None:
            s.stop()
