// The web view's script: no framework, no build step. Data comes from /api/*, live updates from
// server-sent events. Text from sessions is only ever set as textContent, never as HTML.
"use strict";

const FINAL = new Set(["stopped", "failed"]);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

async function getJSON(url) {
  const response = await fetch(url, { credentials: "same-origin" });
  if (response.status === 401) { window.location.href = "/"; throw new Error("signed out"); }
  if (!response.ok) throw new Error(`${url}: ${response.status}`);
  return response.json();
}

function cost(usage) {
  return usage && usage.cost_usd != null ? `$${Number(usage.cost_usd).toFixed(4)}` : "–";
}

function when(iso) {
  if (!iso) return "";
  const date = new Date(iso);
  return isNaN(date) ? iso : date.toLocaleTimeString();
}

function statusBadge(status) {
  return el("span", { class: `status ${status}`, text: status });
}

function setLive(on, text) {
  const live = document.getElementById("live");
  live.textContent = text;
  live.classList.toggle("on", on);
}

// ---- the tree --------------------------------------------------------------------------------

function ordered(sessions) {
  // Depth-first: each session followed by its children, with the branch drawing for its row.
  const byId = new Map(sessions.map((s) => [s.session_id, s]));
  const children = new Map();
  const roots = [];
  for (const s of sessions) {
    const parent = s.parent_session_id && byId.has(s.parent_session_id) ? s.parent_session_id : null;
    if (parent) {
      if (!children.has(parent)) children.set(parent, []);
      children.get(parent).push(s);
    } else roots.push(s);
  }
  const rows = [];
  const walk = (session, prefix, last, depth) => {
    const branch = depth === 0 ? "" : prefix + (last ? "└─ " : "├─ ");
    rows.push({ session, branch, depth });
    const kids = children.get(session.session_id) || [];
    const nextPrefix = depth === 0 ? "" : prefix + (last ? "   " : "│  ");
    kids.forEach((kid, i) => walk(kid, nextPrefix, i === kids.length - 1, depth + 1));
  };
  roots.forEach((root) => walk(root, "", true, 0));
  return rows;
}

async function renderTree() {
  const { sessions } = await getJSON("/api/sessions");
  const body = document.querySelector("#sessions tbody");
  const rows = ordered(sessions);
  body.replaceChildren(...rows.map(({ session: s, branch, depth }) => {
    const link = el("a", { href: `/sessions/${encodeURIComponent(s.session_id)}`, text: s.session_id });
    const tree = el("td", { class: "tree" }, el("span", { class: "branch", text: branch }), link);
    const backend = s.backend + (s.model ? ` (${s.model})` : "");
    const row = el("tr", { "data-session": s.session_id, "data-parent": s.parent_session_id || "", "data-depth": String(depth) },
      tree,
      el("td", {}, statusBadge(s.status)),
      el("td", { text: backend }),
      el("td", { text: s.environment_name || s.environment_id }),
      el("td", { class: "num", text: String(s.turns) }),
      el("td", { class: "num", text: String(s.usage.input_tokens) }),
      el("td", { class: "num", text: String(s.usage.output_tokens) }),
      el("td", { class: "num", text: cost(s.usage) }),
      el("td", { text: when(s.updated_at) }));
    return row;
  }));
  document.getElementById("empty").hidden = sessions.length > 0;
}

function startTree() {
  let pending = null;
  const refresh = () => {
    if (pending) return;
    pending = setTimeout(() => { pending = null; renderTree().catch(console.error); }, 150);
  };
  renderTree().catch(console.error);
  const changes = new EventSource("/api/changes");
  changes.onopen = () => { setLive(true, "live"); refresh(); };
  changes.onerror = () => setLive(false, "reconnecting…");
  changes.addEventListener("change", refresh);
}

// ---- one session ---------------------------------------------------------------------------------

function summary(event) {
  const d = event.data || {};
  const text = (content) => Array.isArray(content)
    ? content.map((block) => (block && block.text) || "").join("")
    : String(content ?? "");
  switch (event.type) {
    case "user.message": case "agent.message": return text(d.content);
    case "agent.thinking": return String(d.thinking || "");
    case "agent.tool_use": case "agent.mcp_tool_use": return `${d.name} ${JSON.stringify(d.input || {})}`;
    case "agent.tool_result": case "agent.mcp_tool_result": return text(d.content).slice(0, 400);
    case "session.error": return `${(d.error || {}).type}: ${(d.error || {}).message}`;
    case "session.status_idle": return `stop reason: ${(d.stop_reason || {}).type}`;
    case "session.status_terminated": return String(d.reason || "");
    case "span.model_request_end": {
      const u = d.model_usage || {};
      return `in ${u.input_tokens || 0}, out ${u.output_tokens || 0}` + (u.cost_usd != null ? `, $${u.cost_usd}` : "");
    }
    default: {
      const json = JSON.stringify(d);
      return json === "{}" ? "" : json.slice(0, 300);
    }
  }
}

async function csrfToken() {
  const { csrf } = await getJSON("/api/me");
  return csrf;
}

function startSession() {
  const sessionId = decodeURIComponent(window.location.pathname.split("/").pop());
  const base = `/api/sessions/${encodeURIComponent(sessionId)}`;
  document.title = `mcp-sandboxes: ${sessionId}`;
  document.getElementById("title").textContent = `Session ${sessionId}`;
  const list = document.getElementById("events");
  const stop = document.getElementById("stop");
  const interrupt = document.getElementById("interrupt");
  const message = document.getElementById("action-message");
  let seen = 0;
  let csrf = null;

  const renderFacts = (s) => {
    const facts = [
      ["Status", statusBadge(s.status)], ["Backend", s.backend + (s.model ? ` (${s.model})` : "")],
      ["Environment", s.environment_name || s.environment_id], ["Parent", s.parent_session_id || "–"],
      ["Turns", `${s.turns}` + (s.queued_turns ? ` (+${s.queued_turns} queued)` : "")],
      ["Usage", `in ${s.usage.input_tokens}, out ${s.usage.output_tokens}`], ["Cost", cost(s.usage)],
      ["Sandbox", s.sandbox_id || "–"], ["Stop reason", s.stop_reason || "–"],
    ];
    if (s.workspace_branch) {
      facts.push(["Workspace", `branch ${s.workspace_branch}` + (s.workspace_base ? ` from ${s.workspace_base.slice(0, 12)}` : "")]);
    }
    if (s.last_error) facts.push(["Last error", s.last_error]);
    document.getElementById("facts").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", {}, v)]));
    const over = FINAL.has(s.status);
    stop.disabled = over;
    interrupt.disabled = over || s.status !== "running";
    document.body.dataset.status = s.status;
  };
  let refreshing = null;
  const refresh = () => {
    if (refreshing) return;
    refreshing = setTimeout(async () => {
      refreshing = null;
      try {
        renderFacts(await getJSON(base));
        const response = await fetch(`${base}/transcript`, { credentials: "same-origin" });
        if (response.ok) document.getElementById("transcript").textContent = await response.text();
      } catch (error) { console.error(error); }
    }, 150);
  };

  const act = async (action) => {
    message.textContent = `${action}…`;
    try {
      csrf = csrf || await csrfToken();
      const response = await fetch(`${base}/${action}`, {
        method: "POST", credentials: "same-origin", headers: { "X-CSRF-Token": csrf },
      });
      const body = await response.json();
      message.textContent = response.ok ? `${action}: done (status ${body.status})` : `${action}: ${body.error}`;
      if (response.ok) renderFacts(body);
    } catch (error) { message.textContent = `${action}: ${error}`; }
    refresh();
  };
  stop.addEventListener("click", () => act("stop"));
  interrupt.addEventListener("click", () => act("interrupt"));

  // The browser resends the last id it saw (Last-Event-ID) when it reconnects: no event twice.
  const stream = new EventSource(`${base}/events?after=0`);
  stream.onopen = () => setLive(true, "live");
  stream.onerror = () => setLive(false, stream.readyState === EventSource.CLOSED ? "ended" : "reconnecting…");
  stream.addEventListener("event", (message) => {
    const event = JSON.parse(message.data);
    if (event.seq <= seen) return;
    seen = event.seq;
    const item = el("li", { class: event.type.replace(/[._]/g, "-"), "data-seq": String(event.seq), "data-type": event.type },
      el("span", { class: "seq", text: String(event.seq) }), " ",
      el("span", { class: "type", text: event.type }), " ",
      el("span", { class: "text", text: summary(event) }));
    const atBottom = list.scrollTop + list.clientHeight >= list.scrollHeight - 4;
    list.append(item);
    if (atBottom) list.scrollTop = list.scrollHeight;
    document.getElementById("event-count").textContent = `(${list.children.length})`;
    refresh();
  });
  stream.addEventListener("end", () => { stream.close(); setLive(false, "ended"); refresh(); });
  refresh();
}

document.addEventListener("DOMContentLoaded", () => {
  if (document.body.dataset.page === "tree") startTree();
  else if (document.body.dataset.page === "session") startSession();
});
