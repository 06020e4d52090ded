#!/usr/bin/env python3
"""What NAT traversal costs: connection setup (direct, relayed, hole-punched) and decode tokens/s
over a hole-punched hop, a relayed hop and the client-relay fallback, in the NAT lab.

    sudo python scripts/bench_nat.py [--rounds 10] [--new-tokens 32] [--log-dir DIR]

The lab (`tests/netlab.py` `NatLab`; needs root, `ip` and `nft`): an internet with three
`lamina-bootstrap` relays (boot, relay2, relay3) and homes behind NAT routers that drop
unsolicited inbound traffic, each home with one process:

    home_a   EIM NAT        node A8,  blocks 0:8   (all three relays as initial peers)
    home_b   symmetric NAT  node B8,  blocks 0:8   (all three)
    home_pa  EIM NAT        node PA,  blocks 0:4   (all three)
    home_pb  symmetric NAT  node PB,  blocks 4:8   (all three)
    home_ua  EIM NAT        node UA,  blocks 0:4   (boot, relay2; its router drops relay3)
    home_ub  symmetric NAT  node UB,  blocks 4:8   (relay3; its router drops boot and relay2)
    home_c   EIM NAT        the client: this script run again as a worker (`--worker`)

Every node finds by dial-back that nobody can dial it, reserves relay slots and announces
circuit addresses. UA and UB hold slots on disjoint relays they alone can reach, so neither can
reach the other at all (a push from UA to UB fails), while the client reaches both.

1. Connection setup. Each measurement is a fresh client host (`p2p.open_host`, a new identity,
   `NatConfig(enabled=True, reserve=False)`, bootstrap peer boot; no DHT or gossip, so nothing
   but the timed dial connects it to anyone else), which first waits for its own first
   reachability check (reported apart), then times `Host.connect(addr)`: direct to relay3 (a
   public host); to B8 through a circuit address (relay dial, then the DCUtR attempt that B8's
   symmetric NAT ends at once: the result stays relayed); to A8 through a circuit address (relay
   dial, then DCUtR until a direct connection exists). Circuits go through a relay other than
   boot, so every case includes one fresh TCP + Noise + yamux connection to a public host.
   The split of a circuit dial is the swarm's connection event for the relayed connection.
2. Decode. One client per route, each restricted by `allowed_servers`, all in one worker process
   in home_c; each round runs one generation of `--new-tokens` per route (a new session each,
   the route order rotated round by round), after an unmeasured warm-up per route (generations
   until one runs as designed, at most `WARMUP_TRIES`, with a fresh client after each miss).
   Every generation's tokens are checked against `LocalModelForCausalLM`, and the connection
   each of the client's sessions ran on is checked against the design (see the JSON "note").

Prints one JSON object; progress goes to stderr. Every process and the lab are removed on exit,
Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

PROMPT_TOKENS = 16
NODE_START_TIMEOUT = 180.0
NODE_NAT_TIMEOUT = 120.0      # a node's dial-back verdict and its relay reservations
RELAY_PORT = 4001
WARMUP_TRIES = 3              # warm-up generations per route at most (each miss is reported)

# The decode routes: name -> (node names in route order, what the client's session to each
# node must run on, which links the client relays after)
ROUTES = {
    "hole_punched_hop": (("a8",), ("direct",), (False,)),
    "relayed_hop": (("b8",), ("relayed",), (False,)),
    "two_hops_pushed": (("pa", "pb"), ("direct", "relayed"), (False, False)),
    "two_hops_client_relay": (("ua", "ub"), ("direct", "relayed"), (True, False)),
}

NOTE = {
    "lab": "NatLab: 3 public lamina-bootstrap relays; each node alone in a home behind its own NAT "
           "router (EIM = port-keeping masquerade, symmetric = random source port per connection, "
           "both drop unsolicited inbound); the client in a home of its own (EIM). Tiny model "
           "(pipeline.tiny), CPU, 1 torch thread per process, everything on one machine.",
    "connect_ms": "Each value is one fresh client host (new identity, NatConfig(enabled=True, "
                  "reserve=False), bootstrapped to boot only, no DHT/gossip). reach_check: from "
                  "the start of open_host to the first dial-back verdict (boot dials back our "
                  "listen port, then our lane port; our NAT drops both and each dial times out "
                  "after 3 s: the verdict is 'relayed', NAT keeps ports). direct: Host.connect "
                  "to relay3. relayed: Host.connect to B8's circuit address through a relay other "
                  "than boot; "
                  "relay_dial = until the relayed connection joined the swarm, punch_attempt = "
                  "the DCUtR attempt after it (B8's NAT changes ports: it ends without a direct "
                  "connection). hole_punched: the same to A8 (EIM); punch = relayed connection to "
                  "direct connection; stats over the rounds that ended direct (see direct_rounds).",
    "hole_punched_hop": "client -> A8 (EIM home, all 8 blocks): one hop over the hole-punched "
                        "direct connection (the client dialled A8's circuit address, DCUtR made a "
                        "direct one, the session runs on it).",
    "relayed_hop": "client -> B8 (symmetric home, all 8 blocks): one hop over a circuit through a "
                   "relay. Same node setup as A8 but a symmetric NAT, so the client-node transport "
                   "is a relay circuit instead of a punched connection: the one difference from "
                   "hole_punched_hop.",
    "two_hops_pushed": "client -> PA (EIM, blocks 0:4) -> PB (symmetric, 4:8) -> client: PA pushes "
                       "to PB over PA's relayed connection to PB; client-PA direct (punched), "
                       "PB-client relayed. The baseline for two_hops_client_relay.",
    "two_hops_client_relay": "client -> UA (EIM, 0:4) -> client -> UB (symmetric, 4:8) -> client: "
                             "the client-relay fallback with a real push failure in the NAT lab. "
                             "UA and UB hold relay slots on disjoint relays and their routers drop "
                             "each other's relays (nft), so UA's push to UB fails (in the first "
                             "session, the warm-up, after the node's push grace); the client then "
                             "relays every step from UA to UB itself, remembering the pair, so the "
                             "measured "
                             "sessions relay from their first step. Client-UA direct (punched), "
                             "client-UB relayed: differs from two_hops_pushed only in who carries "
                             "UA's output to UB (and the rules that force it).",
    "decode": "Median over --rounds generations per route (one session each, interleaved round by "
              "round, the order rotated), after an unmeasured warm-up per route: generations until "
              "one runs as designed, at most 3, with a fresh client (new host, new punch) after "
              "each miss (warmup_missed: why; warmup_ttft_ms: the last one's time to first token: "
              "dials, hole punch, push grace). "
              "decode_tok_s: new tokens after the first per second. hops: the client's connection "
              "to each node of the route and, between two nodes, who carries the first one's "
              "output to the next ('push': the node itself; 'client': the client relays). "
              "as_designed: measured generations whose route, connections and carriers matched "
              "the design. decode_ms_per_token_added_paired_median: for two routes that differ in "
              "one thing, the median over rounds of (ms/token of the first - ms/token of the "
              "second) in the same round. exact: completed generations (warm-up included) whose "
              "tokens equal the local model's; failed: measured generations that raised (not "
              "retried, kept out of the stats; all_measured_completed: there were none).",
}


def _stats(values: list[float], digits: int = 1) -> dict | None:
    if not values:
        return None
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits), "n": len(values)}


# ================================================================================================
# Workers: run inside the client's namespace (`LabHost.popen`), JSON lines on stdout
# ================================================================================================
def _say(**fields) -> None:
    print(json.dumps(fields), flush=True)


def _peer_of(conn):
    return getattr(getattr(conn, "muxed_conn", None), "peer_id", None)


async def _connect_once(case: str, addr: str, boot: str) -> dict:
    """One fresh client host: its first reachability check, then one timed `Host.connect(addr)`."""
    import trio
    from libp2p.peer.id import ID

    import p2p
    from p2p._libp2p import Notifee

    config = p2p.HostConfig(identity=p2p.Identity.generate(), listen_addrs=["/ip4/0.0.0.0/tcp/0"],
                            bootstrap_peers=[boot], enable_dht=False, enable_gossip=False,
                            nat=p2p.NatConfig(enabled=True, reserve=False))
    target = ID.from_base58(addr.rsplit("/p2p/", 1)[1])
    t_open = time.perf_counter()
    async with p2p.open_host(config) as host:
        reach = host.nat.reach
        with trio.fail_after(30):
            await reach.checked.wait()
        t_checked = time.perf_counter()
        if host.is_connected(target):
            raise RuntimeError(f"{case}: already connected to {target} before the timed dial")
        seen: list[float] = []

        def on_event(conn, *, connected: bool) -> None:
            if connected and _peer_of(conn) == target:
                seen.append(time.perf_counter())

        host.libp2p.get_network().register_notifee(Notifee(on_event))
        t0 = time.perf_counter()
        with trio.fail_after(60):
            await host.connect(addr)
        t1 = time.perf_counter()
        kinds = ["relayed" if p2p.is_relayed(c) else "direct"
                 for c in host.libp2p.get_network().get_connections(target)]
        out = {"reach_check_ms": 1e3 * (t_checked - t_open), "total_ms": 1e3 * (t1 - t0), "kinds": kinds,
               "reach": {"status": str(reach.status), "port_preserving": reach.port_preserving}}
        if "/p2p-circuit" in addr:
            first = seen[0] if seen else t1
            out["relay_dial_ms"] = 1e3 * (first - t0)
            out["punch_ms"] = 1e3 * (t1 - first)
            out["punch_attempts"] = host.nat.punch.attempts if host.nat.punch else 0
        return out


async def _connect_worker(spec: dict) -> None:
    cases = [("direct", spec["direct"]), ("relayed", spec["relayed"]), ("hole_punched", spec["hole_punched"])]
    results: dict[str, list[dict]] = {name: [] for name, _ in cases}
    for r in range(spec["rounds"]):
        for name, addr in cases:
            results[name].append(await _connect_once(name, addr, spec["boot"]))
        _say(event="progress", phase="connect", round=r + 1,
             last={n: round(v[-1]["total_ms"], 1) for n, v in results.items()})
    _say(event="result", results=results)


def _carrier(host, link) -> str:
    """What the client's session to `link`'s node runs on: "direct", "relayed" or "lane"."""
    from libp2p.peer.id import ID

    import p2p

    transport = getattr(link.session, "_transport", None)
    if transport is None:
        return "unknown"
    if transport.kind == "lane":
        return "lane"
    muxed = getattr(transport.stream, "muxed_conn", None)
    for conn in host.libp2p.get_network().get_connections(ID.from_base58(link.peer_id)):
        if getattr(conn, "muxed_conn", None) is muxed:
            return "relayed" if p2p.is_relayed(conn) else "direct"
    return "relayed" if muxed is not None and p2p.is_relayed(muxed) else "unknown"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"[:500]


async def _generate_once(model, prompt, new: int, expected: list[int], want: dict) -> dict:
    """One generation in a new session: its timing, tokens, and the connections it ran on."""
    from _clock import TokenClock

    clock = TokenClock()
    async with model.inference_session(max_length=prompt.shape[1] + new) as session:
        out = await model.generate(prompt, max_new_tokens=new, eos_token_id=[], session=session, streamer=clock)
        links = session.chain.links
        rec = {"ttft_ms": 1e3 * clock.ttft(), "tok_s": clock.decode_tok_s(),
               "exact": out[0].tolist() == expected,
               "route": [link.peer_id for link in links],
               "carriers": [_carrier(model.host, link) for link in links],
               "relay": [bool(link.relay) for link in links],
               "failovers": session.chain.failovers, "reopened": session.chain.reopened}
    rec["as_designed"] = (rec["route"] == want["route"] and rec["carriers"] == want["carriers"]
                          and rec["relay"] == want["relay"])
    return rec


async def _hold_client(spec: dict, route: dict, stop, *, task_status) -> None:
    """Run a client restricted to `route`'s nodes until `stop` is set; it is handed out once it
    sees each of them announce circuits. (Each client lives in a task of its own: clients are
    opened and closed in any order, which one task's nurseries would not allow.)"""
    import trio

    from crdt import peer_id_to_str
    from pipeline import AsyncDistributedModelForCausalLM
    from pipeline._swarm import now_ms

    async with AsyncDistributedModelForCausalLM.from_pretrained(
            spec["model"], initial_peers=spec["initial_peers"], allowed_servers=route["route"],
            connect_timeout=120) as model:
        wanted = set(route["route"])

        def announced(_state) -> bool:
            now = now_ms()
            ok = {peer_id_to_str(r.peer_id) for r in model.view.servers(model.model_hash)
                  if r.is_live(now) and any("/p2p-circuit" in a for a in r.addrs)}
            return wanted <= ok

        with trio.fail_after(120):
            await model.view.wait_until(announced)
        task_status.started(model)
        await stop.wait()


async def _decode_worker(spec: dict) -> None:
    import torch
    import trio

    torch.set_num_threads(1)
    prompt = torch.tensor([spec["prompt"]])
    expected = spec["expected"]
    new = spec["new_tokens"]
    routes = spec["routes"]          # name -> {"route": [peer ids], "carriers": [...], "relay": [...]}
    names = list(routes)
    records: dict[str, list[dict]] = {name: [] for name in names}
    clients: dict = {}               # name -> (its stop event, the model)

    async def generate(name: str, warmup: bool) -> dict:
        try:
            rec = await _generate_once(clients[name][1], prompt, new, expected, routes[name])
        except Exception as exc:   # recorded and reported; the next generation goes on
            rec = {"error": _describe(exc)}
            _say(event="progress", phase="decode", route=name, error=rec["error"])
        rec["warmup"] = warmup
        records[name].append(rec)
        return rec

    async with trio.open_nursery() as nursery:
        async def open_client(name: str) -> None:
            stop = trio.Event()
            clients[name] = (stop, await nursery.start(_hold_client, spec, routes[name], stop))

        try:
            for name in names:
                await open_client(name)
            _say(event="progress", phase="decode", clients="ready")
            for name in names:     # warm-up: until a generation runs as designed, with a fresh
                for attempt in range(WARMUP_TRIES):   # client (new host, new punch) after a miss
                    rec = await generate(name, True)
                    if rec.get("as_designed"):
                        break
                    if attempt + 1 < WARMUP_TRIES:
                        clients.pop(name)[0].set()
                        await open_client(name)
            for r in range(spec["rounds"]):
                for name in names[r % len(names):] + names[:r % len(names)]:
                    await generate(name, False)
                _say(event="progress", phase="decode", round=r + 1,
                     tok_s={n: round(records[n][-1]["tok_s"], 1) if "tok_s" in records[n][-1] else None
                            for n in names})
        finally:
            for stop, _model in clients.values():
                stop.set()
    _say(event="result", results=records)


def _worker(kind: str, spec_path: str) -> int:
    import logging

    import trio

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = json.loads(Path(spec_path).read_text())
    try:
        trio.run(_connect_worker if kind == "connect" else _decode_worker, spec)
    except BaseException as exc:
        _say(event="error", type=type(exc).__name__, message=repr(exc)[:2000])
        raise
    return 0


# ================================================================================================
# The lab (root namespace)
# ================================================================================================
class _Lab:
    """The lab of the module docstring: its processes, addresses and ids."""

    def __init__(self, lab, model: Path, logs: Path, num_blocks: int) -> None:
        import netlab
        from pipeline.launch import spawn_node, wait_ready

        self.netlab, self.lab, self.model, self.logs = netlab, lab, model, logs
        self.procs: list[subprocess.Popen] = []
        try:
            self._start(num_blocks, spawn_node, wait_ready)
        except BaseException:
            self.stop()
            raise

    def _start(self, num_blocks: int, spawn_node, wait_ready) -> None:
        lab, model, logs = self.lab, self.model, self.logs
        self.public = {n: lab.add_public_host(n) for n in ("boot", "relay2", "relay3")}
        self.addr: dict[str, str] = {}
        for name, host in self.public.items():
            self.addr[name] = self._bootstrap(name, host, [self.addr["boot"]] if self.addr else [])
        self.ids = {name: addr.rsplit("/p2p/", 1)[1] for name, addr in self.addr.items()}
        half = num_blocks // 2
        relays = list(self.addr)
        # name -> (home nat, blocks, initial peers, relays its router drops)
        plan = {
            "a8": ("eim", f"0:{num_blocks}", relays, []),
            "b8": ("symmetric", f"0:{num_blocks}", relays, []),
            "pa": ("eim", f"0:{half}", relays, []),
            "pb": ("symmetric", f"{half}:{num_blocks}", relays, []),
            "ua": ("eim", f"0:{half}", ["boot", "relay2"], ["relay3"]),
            "ub": ("symmetric", f"{half}:{num_blocks}", ["relay3"], ["boot", "relay2"]),
        }
        self.homes = {name: lab.add_home(f"home_{name}", nat=nat) for name, (nat, *_rest) in plan.items()}
        self.homes["client"] = lab.add_home("home_c", nat="eim")
        self.plan = plan
        for name, (_nat, _blocks, _peers, dropped) in plan.items():
            if dropped:
                self._drop(self.homes[name].router, [self.public[d].ip for d in dropped])
        spawned = {}
        for name, (_nat, blocks, peers, _dropped) in plan.items():
            args = ["--blocks", blocks, "--listen", "/ip4/0.0.0.0/tcp/0", "--num-threads", "1",
                    "--initial-peers", *(self.addr[p] for p in peers), "--log-level", "INFO"]
            proc = spawn_node(model, args, logs / f"{name}.log", prefix=self.homes[name].wrap([]))
            self.procs.append(proc)
            spawned[name] = proc
        for name, proc in spawned.items():
            node = wait_ready(proc, logs / f"{name}.log", timeout=NODE_START_TIMEOUT)
            self.ids[name] = node.peer_id
            _log(f"node {name} serving {plan[name][1]}")
        self.reservations: dict[str, dict[str, str]] = {}
        for name, (_nat, _blocks, peers, _dropped) in plan.items():
            want = min(2, len(peers))
            self._wait_log(name, r"reachability: relayed")
            self._wait_log(name, r"relay reservation on \S+ at", count=want)
            self.reservations[name] = self._held(name)
        slots = {n: "+".join(self._relay_name(r) for r in held) for n, held in self.reservations.items()}
        _log(f"every node is relayed and holds its relay slots: {slots}")

    def _bootstrap(self, name: str, host, peers: list[str]) -> str:
        argv = [sys.executable, "-m", "node._bootstrap", "--listen", f"/ip4/{host.ip}/tcp/{RELAY_PORT}",
                *(["--initial-peers", *peers] if peers else [])]
        proc = host.popen(argv, stderr=open(self.logs / f"{name}.log", "ab"))
        self.procs.append(proc)
        line = self.netlab.read_line(proc, timeout=60)
        if not line.startswith("bootstrap at "):
            raise RuntimeError(f"{name}: unexpected first line {line!r}")
        return line.split()[2]

    @staticmethod
    def _drop(router: str, ips: list[str]) -> None:
        """Make `router` (a home's NAT router) drop every packet to and from `ips`."""
        addrs = ", ".join(ips)
        rules = (f"table ip bench_nat_drop {{\n"
                 f"  chain c_drop {{ type filter hook forward priority -10; policy accept;\n"
                 f"    ip daddr {{ {addrs} }} drop; ip saddr {{ {addrs} }} drop; }}\n}}\n")
        done = subprocess.run(["ip", "netns", "exec", router, "nft", "-f", "-"], input=rules, text=True,
                              capture_output=True, timeout=30)
        if done.returncode != 0:
            raise RuntimeError(f"nft in {router} failed: {done.stderr.strip()}")

    def _wait_log(self, name: str, pattern: str, count: int = 1) -> None:
        path = self.logs / f"{name}.log"
        deadline = time.monotonic() + NODE_NAT_TIMEOUT
        while True:
            text = path.read_text(errors="replace") if path.exists() else ""
            if len(re.findall(pattern, text)) >= count:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name}: {pattern!r} not seen {count} times in "
                                   f"{NODE_NAT_TIMEOUT:.0f} s; log {path}:\n{text[-3000:]}")
            time.sleep(0.2)

    def _held(self, name: str) -> dict[str, str]:
        """The relays `name` holds slots on now (relay id -> the relay's address), from its log."""
        held: dict[str, str] = {}
        for line in (self.logs / f"{name}.log").read_text(errors="replace").splitlines():
            if m := re.search(r"relay reservation on (\S+) at (\S+) in", line):
                held[m[1]] = m[2]
            elif m := re.search(r"relay reservation on (\S+) lost", line):
                held.pop(m[1], None)
        return held

    def _relay_name(self, relay_id: str) -> str:
        return next((n for n in self.public if self.ids[n] == relay_id), relay_id)

    def circuit(self, node: str, avoid: str = "boot") -> tuple[str, str]:
        """A circuit address of `node` through a relay it holds a slot on, not `avoid` if it can."""
        held = self._held(node)
        if not held:
            raise RuntimeError(f"{node} holds no relay slot")
        relay = next((r for r in held if r != self.ids[avoid]), next(iter(held)))
        return f"{held[relay]}/p2p/{relay}/p2p-circuit/p2p/{self.ids[node]}", self._relay_name(relay)

    def worker(self, kind: str, spec: dict) -> subprocess.Popen:
        path = self.logs / f"{kind}_spec.json"
        path.write_text(json.dumps(spec))
        argv = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, str(path)]
        proc = self.homes["client"].popen(argv, stderr=open(self.logs / f"client_{kind}.log", "ab"))
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            try:
                self.netlab.stop(proc)
            except Exception as exc:  # keep stopping the others
                _log(f"stopping {proc.args!r}: {exc!r}")


def _log(text: str) -> None:
    print(f"[bench_nat {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def _result(netlab, proc: subprocess.Popen, timeout: float, log: Path) -> dict:
    """Read a worker's JSON lines until its result (progress to stderr)."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"the worker gave no result in {timeout:.0f} s; log {log}")
        event = json.loads(netlab.read_line(proc, timeout=left))
        if event["event"] == "result":
            return event["results"]
        if event["event"] == "error":
            raise RuntimeError(f"the worker failed: {event['type']}: {event['message']}\n"
                               f"{log.read_text(errors='replace')[-4000:]}")
        _log(json.dumps({k: v for k, v in event.items() if k != "event"}))


def _connect_report(results: dict[str, list[dict]]) -> dict:
    direct = results["direct"]
    relayed = results["relayed"]
    punched = results["hole_punched"]
    punched_ok = [r for r in punched if "direct" in r["kinds"]]
    checks = [r for rs in results.values() for r in rs]
    verdicts: dict[str, int] = {}
    for r in checks:
        key = f"{r['reach']['status']}, port_preserving={r['reach']['port_preserving']}"
        verdicts[key] = verdicts.get(key, 0) + 1
    return {
        "reach_check_ms": _stats([r["reach_check_ms"] for r in checks]),
        "reach_verdicts": verdicts,
        "direct": _stats([r["total_ms"] for r in direct]),
        "direct_ok": sum(r["kinds"] == ["direct"] for r in direct),
        "relayed": {"total": _stats([r["total_ms"] for r in relayed]),
                    "relay_dial": _stats([r["relay_dial_ms"] for r in relayed]),
                    "punch_attempt": _stats([r["punch_ms"] for r in relayed]),
                    "stayed_relayed_rounds": sum(r["kinds"] == ["relayed"] for r in relayed)},
        "hole_punched": {"total": _stats([r["total_ms"] for r in punched_ok]),
                         "relay_dial": _stats([r["relay_dial_ms"] for r in punched_ok]),
                         "punch": _stats([r["punch_ms"] for r in punched_ok]),
                         "direct_rounds": len(punched_ok),
                         "failed_rounds_total_ms": [round(r["total_ms"], 1) for r in punched
                                                    if "direct" not in r["kinds"]]},
    }


def _hops(rec: dict) -> str:
    """E.g. "direct -push-> relayed": the client's connection to each node of the route, and who
    carries a node's output to the next (the node: push; the client)."""
    key = rec["carriers"][0]
    for carrier, relayed in zip(rec["carriers"][1:], rec["relay"]):
        key += f" -{'client' if relayed else 'push'}-> {carrier}"
    return key


def _decode_report(results: dict[str, list[dict]]) -> dict:
    out = {}
    for name, recs in results.items():
        done = [r for r in recs if "error" not in r]
        warm = [r for r in recs if r["warmup"]]
        meas = [r for r in done if not r["warmup"]]
        meas_all = [r for r in recs if not r["warmup"]]
        observed: dict[str, int] = {}
        for r in meas:
            observed[_hops(r)] = observed.get(_hops(r), 0) + 1
        rates = [r["tok_s"] for r in meas]
        out[name] = {
            "decode_tok_s": _stats(rates),
            "ms_per_token_median": round(1e3 / statistics.median(rates), 2) if rates else None,
            "ttft_ms_median": round(statistics.median(r["ttft_ms"] for r in meas), 1) if meas else None,
            "warmup_ttft_ms": round(warm[-1]["ttft_ms"], 1) if warm and "ttft_ms" in warm[-1] else None,
            "warmup_tries": len(warm),
            "warmup_missed": [r["error"] if "error" in r else f"not as designed: {_hops(r)}" for r in warm
                              if not r.get("as_designed")],
            "hops": observed,
            "as_designed": f"{sum(r['as_designed'] for r in meas)}/{len(meas)}",
            "exact": f"{sum(r['exact'] for r in done)}/{len(done)}",
            "failovers": sum(r["failovers"] for r in done), "reopened": sum(r["reopened"] for r in done),
            "failed": [r["error"] for r in meas_all if "error" in r],
        }
    return out


PAIRS = (("relayed_hop", "hole_punched_hop"), ("two_hops_client_relay", "two_hops_pushed"))


def _paired(results: dict[str, list[dict]]) -> dict:
    """Per pair of routes that differ in one thing: the median over rounds of the decode ms per
    token the first adds to the second in the same round."""
    out = {}
    for slow, fast in PAIRS:
        rounds = zip([r for r in results[slow] if not r["warmup"]], [r for r in results[fast] if not r["warmup"]])
        added = [1e3 / a["tok_s"] - 1e3 / b["tok_s"] for a, b in rounds if "tok_s" in a and "tok_s" in b]
        out[f"{slow} - {fast}"] = round(statistics.median(added), 2) if added else None
    return out


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        return _worker(sys.argv[2], sys.argv[3])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10, help="fresh connections per case, and measured "
                    "generations per route (default: 10)")
    ap.add_argument("--new-tokens", type=int, default=32, help="new tokens per generation (default: 32)")
    ap.add_argument("--log-dir", type=Path, help="keep the processes' logs here (default: a temporary "
                    "directory, removed at the end)")
    args = ap.parse_args()
    if args.rounds < 1 or args.new_tokens < 2:
        ap.error("--rounds must be >= 1 and --new-tokens >= 2 (decode speed is timed after the first token)")

    import netlab

    why = netlab.nat_available()
    if why is not None:
        raise SystemExit(f"cannot build the NAT lab: {why}")
    # SIGTERM: unwind like Ctrl-C, so every process and the lab go away
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))

    import torch

    from pipeline import LocalModelForCausalLM, load_config
    from pipeline.tiny import write_tiny_model

    torch.set_num_threads(1)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench_nat-") as tmp:
        logs = args.log_dir or Path(tmp) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        model = write_tiny_model(Path(tmp) / "tiny", "tiny")
        num_blocks = load_config(model).num_hidden_layers
        local = LocalModelForCausalLM.from_pretrained(model)
        prompt = torch.randint(0, local.config.vocab_size, (1, PROMPT_TOKENS),
                               generator=torch.Generator().manual_seed(0))
        expected = local.generate(prompt, max_new_tokens=args.new_tokens, eos_token_id=[])
        del local
        with netlab.NatLab() as nat_lab:
            lab = None
            try:
                _log("building the lab")
                lab = _Lab(nat_lab, model, logs, num_blocks)
                built = time.monotonic()
                direct_addr = lab.addr["relay3"]
                relayed_addr, relayed_via = lab.circuit("b8")
                punched_addr, punched_via = lab.circuit("a8")
                proc = lab.worker("connect", {"rounds": args.rounds, "boot": lab.addr["boot"],
                                              "direct": direct_addr, "relayed": relayed_addr,
                                              "hole_punched": punched_addr})
                connect = _connect_report(_result(netlab, proc, 120 + 60 * args.rounds, logs / "client_connect.log"))
                netlab.stop(proc)
                routes = {name: {"route": [lab.ids[n] for n in nodes], "carriers": list(carriers),
                                 "relay": list(relay)} for name, (nodes, carriers, relay) in ROUTES.items()}
                proc = lab.worker("decode", {
                    "model": str(model), "initial_peers": list(lab.addr.values()), "rounds": args.rounds,
                    "new_tokens": args.new_tokens, "prompt": prompt[0].tolist(), "expected": expected[0].tolist(),
                    "routes": routes})
                decoded = _result(netlab, proc, 300 + 30 * args.rounds * len(ROUTES), logs / "client_decode.log")
                decode, paired = _decode_report(decoded), _paired(decoded)
                netlab.stop(proc)
            finally:
                if lab is not None:
                    lab.stop()
    connect["relayed"]["via"] = relayed_via
    connect["hole_punched"]["via"] = punched_via
    report = {
        "rounds": args.rounds, "new_tokens": args.new_tokens, "prompt_tokens": PROMPT_TOKENS,
        "model": f"tiny ({num_blocks} blocks)",
        "connect_ms": connect,
        "decode": decode,
        "decode_ms_per_token_added_paired_median": paired,
        "all_exact": all(v["exact"].split("/")[0] == v["exact"].split("/")[1] for v in decode.values()),
        "all_measured_completed": not any(v["failed"] for v in decode.values()),
        "all_as_designed": all(v["as_designed"].split("/")[0] == v["as_designed"].split("/")[1]
                               for v in decode.values()),
        "lab_build_s": round(built - started, 1),
        "wall_s": round(time.monotonic() - started, 1),
        "note": NOTE,
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:   # the processes and the lab are gone by now
        print("bench_nat: interrupted", file=sys.stderr)
        sys.exit(130)
