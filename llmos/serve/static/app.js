// llmos web chat: plain JavaScript, no build step, no network access beyond this server.
// Replies stream over fetch + server-sent events; Markdown is rendered from HTML-escaped text
// (model output can never inject markup); conversations live in this browser's localStorage.
"use strict";

const STORE = { convs: "llmos.conversations", current: "llmos.current", settings: "llmos.settings" };
const $ = (id) => document.getElementById(id);

const state = {
  convs: read(STORE.convs, []),
  current: localStorage.getItem(STORE.current),
  settings: Object.assign({ model: "", temperature: 0.7, maxTokens: "", apiKey: "" }, read(STORE.settings, {})),
  controller: null,
};

function read(key, fallback) {
  try {
    const value = JSON.parse(localStorage.getItem(key));
    return value === null || value === undefined ? fallback : value;
  } catch (e) {
    return fallback;
  }
}

function save() {
  localStorage.setItem(STORE.convs, JSON.stringify(state.convs));
  if (state.current) localStorage.setItem(STORE.current, state.current);
  localStorage.setItem(STORE.settings, JSON.stringify(state.settings));
}

// --- Markdown, safely: escape everything first, then add a small fixed set of tags --------------

function escapeHtml(text) {
  return text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
    .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
}

// `text` is already escaped: it holds no < > " ' characters, so nothing below can open a tag or
// leave an attribute; links are only http(s).
function inline(text) {
  const codes = [];
  text = text.replace(/`([^`\n]+)`/g, (_, code) => { codes.push(code); return "\u0000" + (codes.length - 1) + "\u0000"; });
  text = text.replace(/\[([^\]\n]+)\]\((https?:\/\/[^\s()]+)\)/g,
    (_, label, url) => `<a href="${url}" target="_blank" rel="noopener noreferrer nofollow">${label}</a>`);
  text = text.replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>");
  text = text.replace(/(^|[^*\w])\*([^*\s][^*\n]*)\*(?![*\w])/g, "$1<em>$2</em>");
  text = text.replace(/(^|[^\w])_([^_\s][^_\n]*)_(?!\w)/g, "$1<em>$2</em>");
  return text.replace(/\u0000(\d+)\u0000/g, (_, i) => `<code>${codes[Number(i)]}</code>`);
}

function renderMarkdown(source) {
  const lines = source.replace(/\u0000/g, "").split("\n");
  let html = "";
  let para = [];
  const flush = () => {
    if (para.length) html += "<p>" + para.map((l) => inline(escapeHtml(l))).join("<br>") + "</p>";
    para = [];
  };
  const BULLET = /^\s*[-*+]\s+(.*)$/;
  const NUMBER = /^\s*\d+[.)]\s+(.*)$/;
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    const fence = line.match(/^\s*```\s*([\w+-]*)\s*$/);
    if (fence) {  // a code block; unterminated while a reply is still streaming
      flush();
      const code = [];
      i++;
      while (i < lines.length && !/^\s*```\s*$/.test(lines[i])) code.push(lines[i++]);
      i++;
      const cls = fence[1] ? ` class="lang-${escapeHtml(fence[1])}"` : "";
      html += `<pre><code${cls}>${escapeHtml(code.join("\n"))}</code></pre>`;
      continue;
    }
    const list = BULLET.test(line) ? ["ul", BULLET] : NUMBER.test(line) ? ["ol", NUMBER] : null;
    if (list) {
      flush();
      html += `<${list[0]}>`;
      let m;
      while (i < lines.length && (m = lines[i].match(list[1]))) {
        html += "<li>" + inline(escapeHtml(m[1])) + "</li>";
        i++;
      }
      html += `</${list[0]}>`;
      continue;
    }
    const heading = line.match(/^(#{1,6})\s+(.*)$/);
    if (heading) {
      flush();
      const level = Math.min(heading[1].length + 2, 6);
      html += `<h${level}>${inline(escapeHtml(heading[2]))}</h${level}>`;
    } else if (!line.trim()) {
      flush();
    } else {
      para.push(line);
    }
    i++;
  }
  flush();
  return html;
}

// --- conversations --------------------------------------------------------------------------------

function currentConv() {
  let conv = state.convs.find((c) => c.id === state.current);
  if (!conv) conv = newConv();
  return conv;
}

function newConv() {
  const conv = { id: Date.now().toString(36) + Math.random().toString(36).slice(2, 8), title: "New chat", messages: [] };
  state.convs.unshift(conv);
  state.current = conv.id;
  save();
  return conv;
}

function renderList() {
  const ul = $("conversations");
  ul.replaceChildren();
  for (const conv of state.convs) {
    const li = document.createElement("li");
    if (conv.id === state.current) li.className = "current";
    const open = document.createElement("button");
    open.type = "button";
    open.className = "open";
    open.textContent = conv.title;
    open.title = conv.title;
    open.addEventListener("click", () => { if (!state.controller) { state.current = conv.id; save(); render(); } });
    const del = document.createElement("button");
    del.type = "button";
    del.className = "delete";
    del.textContent = "\u00d7";
    del.title = "Delete this conversation";
    del.addEventListener("click", () => {
      if (state.controller) return;
      state.convs = state.convs.filter((c) => c !== conv);
      if (state.current === conv.id) state.current = state.convs.length ? state.convs[0].id : null;
      save();
      render();
    });
    li.append(open, del);
    ul.append(li);
  }
}

function messageElement(msg) {
  const div = document.createElement("div");
  div.className = `msg ${msg.role}` + (msg.error ? " error" : "");
  const role = document.createElement("div");
  role.className = "role";
  role.textContent = msg.role === "user" ? "You" : "Assistant";
  const content = document.createElement("div");
  content.className = "content";
  const note = document.createElement("div");
  note.className = "note";
  const sources = document.createElement("ol");
  sources.className = "sources";
  div.append(role, content, sources, note);
  fillMessage(div, msg);
  return div;
}

function fillMessage(div, msg) {
  const content = div.querySelector(".content");
  if (msg.role === "user") content.textContent = msg.content;
  else content.innerHTML = renderMarkdown(msg.content);  // escaped first: see renderMarkdown
  div.querySelector(".note").textContent = msg.note || "";
  // Sources of an answer from documents: file:line and the quoted sentence, as text (never markup).
  const list = div.querySelector(".sources");
  list.replaceChildren(...(msg.sources || []).map((s) => {
    const li = document.createElement("li");
    const where = document.createElement("span");
    where.className = "where";
    where.textContent = `[${s.number}] ${s.location}`;
    const quote = document.createElement("q");
    quote.textContent = s.quote;
    li.append(where, " ", quote);
    return li;
  }));
  div.classList.toggle("error", Boolean(msg.error));
}

function renderMessages() {
  const box = $("messages");
  box.replaceChildren(...currentConv().messages.map(messageElement));
  box.scrollTop = box.scrollHeight;
}

function render() {
  renderList();
  renderMessages();
}

// --- the server -----------------------------------------------------------------------------------

function headers() {
  const h = { "Content-Type": "application/json" };
  if (state.settings.apiKey) h.Authorization = "Bearer " + state.settings.apiKey;
  return h;
}

async function loadModels() {
  const status = $("status");
  try {
    const res = await fetch("/v1/models", { headers: headers() });
    if (res.status === 401) {
      status.textContent = "This server needs an API key.";
      return;
    }
    const body = await res.json();
    const select = $("model");
    select.replaceChildren();
    for (const m of body.data || []) {
      if (m.capabilities && !m.capabilities.includes("chat")) continue;
      const opt = document.createElement("option");
      opt.value = m.id;
      opt.textContent = m.id;
      select.append(opt);
    }
    if ([...select.options].some((o) => o.value === state.settings.model)) select.value = state.settings.model;
    state.settings.model = select.value;
    status.textContent = "";
    const health = await fetch("/health", { headers: headers() }).then((r) => r.json()).catch(() => ({}));
    state.documents = Boolean(health.documents);
    $("documents-label").hidden = !state.documents;
  } catch (e) {
    status.textContent = "Cannot reach the server: " + e.message;
  }
}

async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function send(text) {
  const conv = currentConv();
  if (!conv.messages.length) conv.title = text.slice(0, 60);
  conv.messages.push({ role: "user", content: text });
  const history = conv.messages.filter((m) => !m.error && m.content).map((m) => ({ role: m.role, content: m.content }));
  const reply = { role: "assistant", content: "" };
  conv.messages.push(reply);
  save();
  render();
  const bubble = $("messages").lastElementChild;
  const body = { model: state.settings.model || undefined, messages: history, stream: true,
                 temperature: Number(state.settings.temperature) };
  if (state.settings.maxTokens) body.max_tokens = Number(state.settings.maxTokens);
  if (state.documents && $("documents").checked) body.documents = true;
  state.controller = new AbortController();
  setBusy(true);
  let pending = false;
  let lastSave = Date.now();
  const paint = () => {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => {
      pending = false;
      fillMessage(bubble, reply);
      const box = $("messages");
      box.scrollTop = box.scrollHeight;
    });
  };
  try {
    const res = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body),
                                                      signal: state.controller.signal });
    if (!res.ok) {
      const err = await res.json().catch(() => null);
      throw new Error((err && err.error && err.error.message) || `HTTP ${res.status}`);
    }
    for await (const chunk of events(res)) {
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = (chunk.choices || [])[0];
      if (!choice) continue;
      if (choice.delta && choice.delta.content) {
        reply.content += choice.delta.content;
        paint();
        if (Date.now() - lastSave > 1000) { save(); lastSave = Date.now(); }
      }
      if (choice.finish_reason === "length") reply.note = "(reached the token limit)";
      if (chunk.sources) {
        reply.sources = chunk.sources;
        if (chunk.found === false) reply.note = "(not in the documents: the closest passages are listed)";
        paint();
      }
    }
  } catch (e) {
    if (e.name === "AbortError") reply.note = "(stopped)";
    else { reply.error = true; reply.note = "Error: " + e.message; }
  } finally {
    state.controller = null;
    setBusy(false);
    save();
    fillMessage(bubble, reply);
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").hidden = !busy;
  $("new-chat").disabled = busy;
}

// --- wiring ---------------------------------------------------------------------------------------

function init() {
  const s = state.settings;
  $("temperature").value = s.temperature;
  $("max-tokens").value = s.maxTokens;
  $("api-key").value = s.apiKey;
  $("temperature").addEventListener("change", (e) => { s.temperature = e.target.value; save(); });
  $("max-tokens").addEventListener("change", (e) => { s.maxTokens = e.target.value; save(); });
  $("api-key").addEventListener("change", (e) => { s.apiKey = e.target.value.trim(); save(); loadModels(); });
  $("model").addEventListener("change", (e) => { s.model = e.target.value; save(); });
  $("new-chat").addEventListener("click", () => { newConv(); render(); $("input").focus(); });
  $("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("input").value.trim();
    if (!text || state.controller) return;
    $("input").value = "";
    send(text);
  });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
  });
  if (!state.convs.some((c) => c.id === state.current)) state.current = state.convs.length ? state.convs[0].id : null;
  render();
  loadModels();
}

init();
