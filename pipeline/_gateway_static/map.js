// The swarm map: polls /api/swarm (the gateway's local replica) and redraws. No dependencies.
"use strict";

const POLL_MS = 1000;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const child of children) node.append(child instanceof Node ? child : String(child));
  return node;
}

function shortId(peer) { return peer.length > 12 ? "…" + peer.slice(-8) : peer; }

function nodeLabel(n) { return n.name ? `${n.name} (${shortId(n.peer_id)})` : shortId(n.peer_id); }

function ranges(missing) { return missing.map(([a, b]) => `${a}:${b}`).join(", "); }

function drawSummary(data) {
  const s = document.getElementById("summary");
  const m = data.model;
  s.replaceChildren(
    `${m.name} · ${m.blocks} blocks · ${data.nodes.length} node(s) · `,
    data.complete ? el("span", { class: "good" }, "full chain")
                  : el("span", { class: "bad" }, `missing blocks ${ranges(data.missing)}`),
    data.node ? ` · this node: blocks ${data.node.blocks[0]}:${data.node.blocks[1]}, ${data.node.state}` : "",
    ` · gateway: ${data.gateway.sessions_open} session(s) open, ${data.gateway.waiting} waiting`,
    ` · updated ${new Date(data.now_ms).toLocaleTimeString()}`);
}

function drawGrid(data) {
  const blocks = data.model.blocks;
  const head = document.getElementById("grid-head");
  const cells = [el("th", { class: "label" }, "node \\ block")];
  for (let b = 0; b < blocks; b++) cells.push(el("th", {}, b % 5 === 0 ? String(b) : ""));
  head.replaceChildren(...cells);
  const body = document.getElementById("grid-body");
  body.replaceChildren(...data.nodes.map((n) => {
    const row = [el("td", { class: "label" }, nodeLabel(n))];
    for (let b = 0; b < blocks; b++) {
      const inside = n.start <= b && b < n.end;
      row.push(el("td", { class: inside ? `b ${n.state}` : "b", title: inside ? `block ${b}: ${n.state}` : "" }));
    }
    return el("tr", { class: "grid-node", "data-peer": n.peer_id }, ...row);
  }));
  const foot = [el("td", { class: "label" }, "live nodes per block")];
  data.coverage.forEach((count, b) => {
    const cls = count === 0 ? "b gap" : count === 1 ? "b covered" : "b covered2";
    foot.push(el("td", { class: cls, title: `block ${b}: ${count} live node(s)` }));
  });
  document.getElementById("coverage").replaceChildren(...foot);
}

function drawNodes(data) {
  const body = document.getElementById("nodes-body");
  body.replaceChildren(...data.nodes.map((n) => el("tr", { class: "node", "data-peer": n.peer_id },
    el("td", { title: n.peer_id + "\n" + n.addrs.join("\n") }, el("code", {}, nodeLabel(n))),
    el("td", { class: "span" }, `${n.start}:${n.end}`),
    el("td", {}, el("span", { class: `state ${n.state}` }, n.state)),
    el("td", {}, n.throughput.toFixed(1)),
    el("td", {}, String(n.sessions)),
    el("td", {}, String(n.free_cache_tokens)),
    el("td", { class: n.reachability }, n.reachability),
    el("td", {}, n.version || "?"),
    el("td", { class: n.lease_left_s < (n.last_seen_s + n.lease_left_s) / 3 ? "stale" : "" },
       `${n.last_seen_s.toFixed(1)} s ago`))));
  const others = data.other_models.map((m) => `${m.name} (${m.nodes} node(s))`).join(", ");
  document.getElementById("others").textContent = others ? `Other models in the swarm: ${others}` : "";
}

async function poll() {
  try {
    const response = await fetch("/api/swarm", { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const data = await response.json();
    drawSummary(data);
    drawGrid(data);
    drawNodes(data);
    document.body.dataset.updated = String(data.now_ms);
  } catch (err) {
    document.getElementById("summary").replaceChildren(
      el("span", { class: "bad" }, `gateway unreachable: ${err.message}`));
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

poll();
