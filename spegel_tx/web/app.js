// The debug page: fills its tables from api/node every few seconds, and measures a pull
// through api/measure. Plain DOM and textContent only: names come from other nodes.
"use strict";

const REFRESH_MS = 5000;
const UNITS = ["KiB", "MiB", "GiB", "TiB"];

function humanBytes(bytes) {
  if (bytes < 1024) return `${bytes} B`;
  let value = bytes;
  let unit = "B";
  for (const next of UNITS) {
    if (value < 1024) break;
    value /= 1024;
    unit = next;
  }
  return `${value.toFixed(1)} ${unit}`;
}

function speed(mbPerSecond) {
  if (mbPerSecond === null || mbPerSecond === undefined) return "";
  if (mbPerSecond >= 100) return mbPerSecond.toFixed(0);
  if (mbPerSecond >= 1) return mbPerSecond.toFixed(1);
  return mbPerSecond.toPrecision(2);
}

function fixed(value, digits) {
  return value === null || value === undefined ? "" : value.toFixed(digits);
}

// One cell. kind: "num" (right-aligned), "hash" (shortened, whole on hover and copy),
// "size" (bytes, shown in KiB/MiB/GiB, exact in its title and data-bytes), "text"
// (wraps), "addr" (an address: wraps in a narrower column), or nothing.
function cell(row, value, kind) {
  const td = row.insertCell();
  const text = value === null || value === undefined ? "" : String(value);
  if (kind === "hash") {
    const span = document.createElement("span");
    span.className = "hash";
    span.textContent = text;
    span.title = text;
    td.append(span);
  } else if (kind === "size") {
    td.className = "num";
    if (typeof value === "number" && value >= 0) {
      td.textContent = humanBytes(value);
      td.title = `${value} bytes`;
      td.dataset.bytes = String(value);
    }
  } else {
    td.textContent = text;
    if (kind) td.className = kind;
  }
  return td;
}

function fill(tableId, rows, columns) {
  const body = document.querySelector(`#${tableId} tbody`);
  body.replaceChildren();
  for (const item of rows) {
    const row = body.insertRow();
    for (const [value, kind] of columns(item)) cell(row, value, kind);
  }
}

function since(seconds) {
  return `${Math.round(seconds)} s ago`;
}

function when(at, agoSeconds) {
  return `${new Date(at * 1000).toLocaleTimeString()} (${since(agoSeconds)})`;
}

function showReadiness(node) {
  const ready = document.getElementById("ready");
  ready.textContent = node.ready ? "ready" : "not ready";
  ready.className = `badge ${node.ready ? "ready" : "not-ready"}`;
  const reasons = document.getElementById("not-ready");
  reasons.replaceChildren(
    ...node.not_ready_because.map((reason) => {
      const item = document.createElement("li");
      item.textContent = reason;
      return item;
    }),
  );
  reasons.hidden = node.ready;
}

function showNode(node) {
  const id = document.getElementById("node-id");
  id.textContent = node.node_id;
  id.title = node.node_id;
  showReadiness(node);

  const facts = document.querySelector("#facts tbody");
  facts.replaceChildren();
  for (const [name, value] of Object.entries(node.facts)) {
    const row = facts.insertRow();
    const label = document.createElement("th");
    label.textContent = name.replaceAll("_", " ");
    row.append(label);
    cell(row, value, "text");
  }
  document.getElementById("peer-count").textContent = `(${node.peers.length})`;
  fill("peers", node.peers, (p) => [[p.node_id, "hash"], [p.host, "addr"], [p.port, "num"]]);

  const registries = Object.entries(node.advertised_by_registry).map(
    ([registry, n]) =>
      `${registry || "(none)"}: ${n.tags} tags, ${n.images} images, ${n.contents} contents`,
  );
  document.getElementById("advertised").textContent =
    `(${node.advertised_keys} keys${registries.length ? "; " + registries.join("; ") : ""})`;
  fill("images", node.images, (i) => [[i.name, "text"], [i.digest, "hash"]]);

  const last = node.last_mirror_success;
  document.getElementById("last-success").textContent = last
    ? when(last.at, last.ago_s)
    : "never";
  fill("mirrored", node.recent_mirrored, requestRow);

  const wave = node.first_wave;
  document.getElementById("first-wave").textContent =
    `(${wave.mode}${wave.watching ? "" : ", not watching containerd's content directory"}; ` +
    `${wave.committed.length} blobs committed before their image)`;
  fill("downloads", wave.downloads, (d) => [
    [d.digest, "hash"],
    [d.received, "size"],
    [d.total, "size"],
  ]);
  fill("in-flight", node.recent_in_flight, requestRow);
}

/** A request in a table of recent ones: the mirrored, and those sent while downloading. */
function requestRow(r) {
  return [
    [when(r.at, r.ago_s)],
    [r.method],
    [r.what, r.what.startsWith("sha256:") ? "hash" : "text"],
    [r.peer, "addr"],
    [r.status, "num"],
    [r.bytes, "size"],
    [fixed(r.seconds, 3), "num"],
    [speed(r.mb_per_s), "num"],
    [r.completed ? "yes" : "no"],
  ];
}

async function refresh() {
  const problem = document.getElementById("load-error");
  try {
    const answer = await fetch("api/node", { cache: "no-store" });
    if (!answer.ok) throw new Error(`api/node answered ${answer.status}`);
    showNode(await answer.json());
    problem.hidden = true;
    document.getElementById("updated").textContent =
      `updated ${new Date().toLocaleTimeString()}`;
  } catch (error) {
    problem.textContent = `Could not load this node's state: ${error.message}`;
    problem.hidden = false;
  }
}

function mediaType(type) {
  return type.replace(/^application\/vnd\./, "");
}

function showMeasure(result) {
  const status = document.getElementById("measure-status");
  const total = result.total;
  status.textContent = result.error ? result.error : "";
  status.className = result.error ? "error" : "";
  const table = document.getElementById("measure-items");
  if (!total) {
    table.hidden = true;
    return;
  }
  fill("measure-items", result.items, (i) => [
    [i.digest, "hash"],
    [mediaType(i.media_type), "text"],
    [i.size, "size"],
    [i.peer, "addr"],
    [fixed(i.lookup_ms, 1), "num"],
    [fixed(i.fetch_s, 3), "num"],
    [speed(i.mb_per_s), "num"],
    [[i.error, ...i.tried].filter(Boolean).join("; "), "text"],
  ]);
  document.querySelectorAll("#measure-items tbody tr").forEach((row, index) => {
    if (result.items[index].error) row.classList.add("failed");
  });
  const foot = document.getElementById("measure-total");
  foot.replaceChildren();
  cell(foot, `${total.items} items, ${total.failed} failed`, "text");
  cell(foot, "");
  cell(foot, total.bytes, "size");
  cell(foot, `elapsed ${fixed(total.elapsed_s, 3)} s`);
  cell(foot, "");
  cell(foot, fixed(total.fetch_s, 3), "num");
  cell(foot, speed(total.mb_per_s), "num");
  cell(foot, "");
  table.hidden = false;
}

async function measure(event) {
  event.preventDefault();
  const form = event.target;
  const button = form.querySelector("button");
  const status = document.getElementById("measure-status");
  button.disabled = true;
  status.className = "";
  status.textContent = "measuring…";
  try {
    const answer = await fetch("api/measure", {
      method: "POST",
      body: new URLSearchParams(new FormData(form)),
    });
    showMeasure(await answer.json());
  } catch (error) {
    status.className = "error";
    status.textContent = `The measure failed: ${error.message}`;
  } finally {
    button.disabled = false;
  }
}

document.getElementById("refresh").addEventListener("click", refresh);
document.getElementById("measure").addEventListener("submit", measure);
refresh();
setInterval(refresh, REFRESH_MS);
