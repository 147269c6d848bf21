// The debug page: fills its tables from api/node every few seconds, and measures a pull
// through api/measure. Plain DOM and textContent only: names come from other nodes.
"use strict";

const REFRESH_MS = 5000;

function cell(row, value, className) {
  const td = row.insertCell();
  td.textContent = value === null || value === undefined ? "" : String(value);
  if (className) td.className = className;
  return td;
}

function fill(tableId, rows, columns) {
  const body = document.querySelector(`#${tableId} tbody`);
  body.replaceChildren();
  for (const item of rows) {
    const row = body.insertRow();
    for (const [value, className] of columns(item)) cell(row, value, className);
  }
}

function since(seconds) {
  return `${Math.round(seconds)} s ago`;
}

function when(at, agoSeconds) {
  return `${new Date(at * 1000).toLocaleTimeString()} (${since(agoSeconds)})`;
}

function showNode(node) {
  document.getElementById("node-id").textContent = node.node_id;
  const ready = document.getElementById("ready");
  ready.textContent = node.ready ? "ready" : "not ready: no DHT peer yet";
  ready.className = `badge ${node.ready ? "ready" : "not-ready"}`;

  fill("addresses", Object.entries(node.addresses), ([name, address]) => [[name], [address]]);
  document.getElementById("peer-count").textContent = `(${node.peers.length})`;
  fill("peers", node.peers, (p) => [[p.node_id], [p.host], [p.port, "num"]]);

  const registries = Object.entries(node.advertised_by_registry).map(
    ([registry, n]) =>
      `${registry || "(none)"}: ${n.tags} tags, ${n.images} images, ${n.contents} contents`,
  );
  document.getElementById("advertised").textContent =
    `(${node.advertised_keys} keys${registries.length ? "; " + registries.join("; ") : ""})`;
  fill("images", node.images, (i) => [[i.name], [i.digest]]);

  const last = node.last_mirror_success;
  document.getElementById("last-success").textContent = last
    ? when(last.at, last.ago_s)
    : "never";
  fill("mirrored", node.recent_mirrored, (r) => [
    [when(r.at, r.ago_s)],
    [r.method],
    [r.what],
    [r.peer],
    [r.status, "num"],
    [r.bytes, "num"],
    [r.seconds, "num"],
    [r.mb_per_s, "num"],
    [r.completed ? "yes" : "no"],
  ]);
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
    [i.digest],
    [i.media_type],
    [i.size < 0 ? "" : i.size, "num"],
    [i.peer],
    [i.lookup_ms, "num"],
    [i.fetch_s, "num"],
    [i.mb_per_s, "num"],
    [[i.error, ...i.tried].filter(Boolean).join("; ")],
  ]);
  document.querySelectorAll("#measure-items tbody tr").forEach((row, index) => {
    if (result.items[index].error) row.classList.add("failed");
  });
  const foot = document.getElementById("measure-total");
  foot.replaceChildren();
  cell(foot, `total: ${total.items} items, ${total.failed} failed`);
  cell(foot, "");
  cell(foot, total.bytes, "num");
  cell(foot, `elapsed ${total.elapsed_s} s`);
  cell(foot, "");
  cell(foot, total.fetch_s, "num");
  cell(foot, total.mb_per_s, "num");
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
