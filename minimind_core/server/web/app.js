// The MiniMind chat page: streams replies from this server's /v1/chat/completions.
// Model text is only ever put into the page with textContent / text nodes (never innerHTML),
// so a reply containing HTML shows as text and cannot inject anything.
"use strict";

const $ = (id) => document.getElementById(id);
const conversation = []; // the conversation sent with each request: {role, content}
let controller = null; // AbortController of the reply being streamed
let modelName = null;
let maxTokensCap = Infinity; // the server's limit, from /health

// ---- settings -------------------------------------------------------------------------------

const SETTINGS = ["system", "temperature", "top-p", "max-tokens", "thinking", "api-key"];

function setValue(el, value) {
  if (el.type === "checkbox") el.checked = value === true || value === "true";
  else el.value = String(value);
}

// The server's defaults (GET /health → defaults: temperature, top_p, max_tokens, think) first,
// then whatever this browser's user changed, which is kept per setting.
function applyDefaults(defaults) {
  const fields = { "temperature": defaults.temperature, "top-p": defaults.top_p,
                   "max-tokens": defaults.max_tokens, "thinking": defaults.think };
  for (const [id, value] of Object.entries(fields)) {
    if (value !== undefined && value !== null) setValue($(id), value);
  }
}

function loadSettings() {
  for (const id of SETTINGS) {
    const saved = localStorage.getItem("minimind." + id);
    if (saved !== null) setValue($(id), saved);
  }
  showSliders();
}

function saveSetting(event) {
  const el = event.target; // only the setting the user changed, so the others follow the server
  localStorage.setItem("minimind." + el.id, el.type === "checkbox" ? el.checked : el.value);
  showSliders();
}

function showSliders() {
  $("temperature-value").textContent = Number($("temperature").value).toFixed(2);
  $("top-p-value").textContent = Number($("top-p").value).toFixed(2);
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

// ---- safe Markdown subset: ``` fences, paragraphs, `code`, **bold** ------------------------

function appendInline(parent, text) {
  // Split on `code` and **bold**; everything becomes text nodes inside created elements.
  const pattern = /(`[^`\n]+`|\*\*[^*\n]+\*\*)/g;
  let last = 0;
  for (const m of text.matchAll(pattern)) {
    if (m.index > last) parent.append(document.createTextNode(text.slice(last, m.index)));
    const token = m[0];
    const el = document.createElement(token.startsWith("`") ? "code" : "strong");
    el.textContent = token.startsWith("`") ? token.slice(1, -1) : token.slice(2, -2);
    parent.append(el);
    last = m.index + token.length;
  }
  if (last < text.length) parent.append(document.createTextNode(text.slice(last)));
}

function renderMarkdown(container, text) {
  const nodes = [];
  const parts = text.split("```");
  parts.forEach((part, i) => {
    if (i % 2 === 1) { // inside a fence (an unclosed one while streaming, too)
      const nl = part.indexOf("\n");
      const pre = document.createElement("pre");
      const code = document.createElement("code");
      code.textContent = nl >= 0 ? part.slice(nl + 1) : part;
      pre.append(code);
      nodes.push(pre);
      return;
    }
    for (const block of part.split(/\n{2,}/)) {
      if (!block.trim()) continue;
      const p = document.createElement("p");
      block.split("\n").forEach((line, j) => {
        if (j > 0) p.append(document.createElement("br"));
        appendInline(p, line);
      });
      nodes.push(p);
    }
  });
  container.replaceChildren(...nodes);
}

// ---- messages -------------------------------------------------------------------------------

function addBubble(role) {
  const bubble = document.createElement("div");
  bubble.className = "message " + role;
  const who = document.createElement("div");
  who.className = "role";
  who.textContent = role === "user" ? "You" : (modelName || "MiniMind");
  bubble.append(who);
  $("messages").append(bubble);
  return bubble;
}

function addUserMessage(text) {
  const bubble = addBubble("user");
  const body = document.createElement("div");
  body.className = "content";
  renderMarkdown(body, text);
  bubble.append(body);
  scrollDown();
}

function addAssistantMessage() {
  const bubble = addBubble("assistant");
  const thinking = document.createElement("details");
  thinking.className = "thinking";
  thinking.hidden = true;
  const summary = document.createElement("summary");
  summary.textContent = "Thinking";
  const reasoning = document.createElement("div");
  reasoning.className = "reasoning";
  thinking.append(summary, reasoning);
  const content = document.createElement("div");
  content.className = "content";
  const meta = document.createElement("div");
  meta.className = "meta muted";
  bubble.append(thinking, content, meta);
  bubble.dataset.chunks = "0";
  scrollDown();
  return { bubble, thinking, summary, reasoning, content, meta };
}

function scrollDown() {
  const box = $("messages");
  box.scrollTop = box.scrollHeight;
}

function setBusy(busy) {
  document.body.dataset.state = busy ? "streaming" : "idle";
  $("send").disabled = busy;
  $("stop").hidden = !busy;
}

// ---- streaming ------------------------------------------------------------------------------

async function errorText(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.message) || JSON.stringify(body);
  } catch (_) {
    return response.status + " " + response.statusText;
  }
}

// Yields the parsed JSON of each `data:` event of an SSE body until `data: [DONE]`.
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

function requestBody() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...conversation);
  const body = {
    messages,
    stream: true,
    stream_options: { include_usage: true },
    temperature: Number($("temperature").value),
    top_p: Number($("top-p").value),
    max_tokens: Math.min(maxTokensCap,
                         Math.max(1, Math.floor(Number($("max-tokens").value) || 512))),
    // MiniMind-3 reads open_thinking, MiniMind2 enable_thinking.
    chat_template_kwargs: $("thinking").checked
      ? { open_thinking: true, enable_thinking: true }
      : { enable_thinking: false },
  };
  if (modelName) body.model = modelName;
  return body;
}

async function send(text) {
  if (!text.trim() || controller) return;
  conversation.push({ role: "user", content: text });
  addUserMessage(text);
  const view = addAssistantMessage();
  let content = "";
  let reasoning = "";
  let chunks = 0;
  let finish = null;
  const started = performance.now();
  controller = new AbortController();
  setBusy(true);
  try {
    const response = await fetch("v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody()),
      signal: controller.signal,
    });
    if (response.status === 401) {
      $("api-key-row").hidden = false;
      throw new Error("This server needs an API key: type it into the \u201cAPI key\u201d " +
                      "field in the settings on the left, then send again. (" +
                      (await errorText(response)) + ")");
    }
    if (!response.ok) throw new Error(await errorText(response));
    for await (const event of sseEvents(response)) {
      if (event.error) throw new Error(event.error.message);
      if (event.usage) {
        const seconds = (performance.now() - started) / 1000;
        view.meta.textContent = `${event.usage.completion_tokens} tokens · ` +
          `${(event.usage.completion_tokens / seconds).toFixed(1)} tok/s`;
      }
      const choice = event.choices && event.choices[0];
      if (!choice) continue;
      const delta = choice.delta || {};
      if (delta.reasoning_content) {
        reasoning += delta.reasoning_content;
        view.thinking.hidden = false;
        view.reasoning.textContent = reasoning;
      }
      if (delta.content) {
        content += delta.content;
        renderMarkdown(view.content, content);
      }
      for (const call of delta.tool_calls || []) {
        const pre = document.createElement("pre");
        pre.className = "tool-call";
        pre.textContent = `${call.function.name}(${call.function.arguments})`;
        view.content.after(pre);
      }
      if (delta.reasoning_content || delta.content || delta.tool_calls) {
        chunks += 1;
        view.bubble.dataset.chunks = String(chunks);
        scrollDown();
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
    if (finish === "length") view.meta.prepend("(cut at max tokens) ");
  } catch (err) {
    if (err.name === "AbortError") {
      view.meta.prepend("(stopped) ");
    } else {
      view.bubble.classList.add("error");
      const p = document.createElement("p");
      p.textContent = "Error: " + err.message;
      view.content.append(p);
    }
  } finally {
    if (reasoning) view.summary.textContent = "Thought for a moment";
    view.bubble.dataset.finish = finish || "none";
    if (content) conversation.push({ role: "assistant", content });
    else if (conversation.length && conversation[conversation.length - 1].role === "user") conversation.pop();
    controller = null;
    setBusy(false);
  }
}

// ---- wiring ---------------------------------------------------------------------------------

function clearChat() {
  if (controller) controller.abort();
  conversation.length = 0;
  $("messages").replaceChildren();
}

async function init() {
  for (const id of SETTINGS) $(id).addEventListener("change", saveSetting);
  $("temperature").addEventListener("input", showSliders);
  $("top-p").addEventListener("input", showSliders);
  $("clear").addEventListener("click", clearChat);
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("input").value;
    $("input").value = "";
    send(text);
  });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });
  let health = null;
  try {
    health = await (await fetch("health")).json();
  } catch (_) {
    $("status").textContent = "server unreachable";
  }
  if (health && health.defaults) applyDefaults(health.defaults);
  loadSettings();
  if (health) {
    modelName = health.model;
    // Stay within what the server allows (a request over its cap would be refused).
    const cap = health.max_tokens || (health.context_window && health.context_window - 1);
    if (cap) {
      maxTokensCap = cap;
      $("max-tokens").max = String(cap);
      if (Number($("max-tokens").value) > cap) $("max-tokens").value = String(cap);
    }
    $("model-name").textContent = health.model;
    $("api-key-row").hidden = !health.auth;
    $("status").textContent = health.status === "ok" ? "" : health.status;
  }
  setBusy(false);
  // ?autosend=<text> sends a first message on load (used by the browser test, handy for links).
  const auto = new URLSearchParams(location.search).get("autosend");
  if (auto) send(auto);
}

init();
