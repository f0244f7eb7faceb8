// d3k2 card preview. Everything shown is built with DOM nodes and text nodes: FHIR-derived text (summaries,
// details, condition names) is never parsed as HTML. Card details are markdown, rendered by a small
// whitelist (paragraphs, lists, bold, emphasis, code, http(s) links) applied to text, not to markup.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const LABS = ["vitd", "egfr", "calcium"];
  const SWITCHES = ["warfarin", "pregnant", "k2"];
  const INDICATORS = new Set(["info", "warning", "critical"]);
  const SAFE_URL = /^https?:\/\/[^\s<>"'`]+$/i;
  const DEBOUNCE_MS = 300;
  const state = { seq: 0, timer: null };

  // ------------------------------------------------------------------ DOM helpers

  function append(node, child) {
    if (child === null || child === undefined || child === false) return;
    if (Array.isArray(child)) {
      child.forEach((c) => append(node, c));
      return;
    }
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }

  // Attribute names are always literals of this file; values go through setAttribute (never parsed).
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") node.className = value;
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    append(node, children);
    return node;
  }

  function safeUrl(url) {
    return typeof url === "string" && SAFE_URL.test(url) ? url : null;
  }

  function link(label, url) {
    const href = safeUrl(url);
    if (!href) return el("span", { class: "unsafe-link" }, label || url || "");
    return el("a", { href, rel: "noopener noreferrer", target: "_blank" }, label || href);
  }

  // ------------------------------------------------------------------ markdown (whitelist)

  const INLINE = /(`+)([^`]+?)\1|\*\*([^*]+?)\*\*|\*([^*\s][^*]*?)\*|\[([^\]]+)\]\(([^)\s]+)\)/g;

  function inline(text) {
    const out = [];
    let last = 0;
    for (const m of text.matchAll(INLINE)) {
      if (m.index > last) out.push(text.slice(last, m.index));
      if (m[2] !== undefined) out.push(el("code", {}, m[2]));
      else if (m[3] !== undefined) out.push(el("strong", {}, inline(m[3])));
      else if (m[4] !== undefined) out.push(el("em", {}, inline(m[4])));
      else out.push(safeUrl(m[6]) ? link(m[5], m[6]) : m[0]);
      last = m.index + m[0].length;
    }
    if (last < text.length) out.push(text.slice(last));
    return out;
  }

  function markdown(source) {
    const fragment = document.createDocumentFragment();
    const lines = String(source || "").replace(/\r\n?/g, "\n").split("\n");
    let paragraph = [];
    let list = null;
    const flushParagraph = () => {
      if (paragraph.length) fragment.append(el("p", {}, inline(paragraph.join(" "))));
      paragraph = [];
    };
    const flushList = () => {
      if (list) {
        const items = list.items.map((item) => el("li", {}, inline(item)));
        fragment.append(el(list.ordered ? "ol" : "ul", {}, items));
      }
      list = null;
    };
    for (const line of lines) {
      if (!line.trim()) {
        flushParagraph();
        flushList();
        continue;
      }
      const bullet = /^ {0,3}[-*+]\s+(.*)$/.exec(line);
      const numbered = bullet ? null : /^ {0,3}\d{1,9}[.)]\s+(.*)$/.exec(line);
      if (bullet || numbered) {
        flushParagraph();
        const ordered = Boolean(numbered);
        if (list && list.ordered !== ordered) flushList();
        if (!list) list = { ordered, items: [] };
        list.items.push((bullet || numbered)[1]);
      } else if (list && /^\s+\S/.test(line)) {
        list.items[list.items.length - 1] += ` ${line.trim()}`;
      } else {
        flushList();
        paragraph.push(line.trim());
      }
    }
    flushParagraph();
    flushList();
    return fragment;
  }

  // ------------------------------------------------------------------ cards

  function describeAction(action) {
    const head = `${action.type || "?"}${action.description ? `: ${action.description}` : ""}`;
    if (action.resource) return `${head}\n${JSON.stringify(action.resource, null, 2)}`;
    if (action.resourceId) return `${head}\n${action.resourceId}`;
    return head;
  }

  function renderSuggestion(suggestion) {
    const resource = el("pre", { class: "resource", hidden: true });
    resource.textContent = (suggestion.actions || []).map(describeAction).join("\n\n");
    const button = el(
      "button",
      { type: "button", class: suggestion.isRecommended ? "suggestion recommended" : "suggestion", "aria-expanded": "false" },
      suggestion.label || "(no label)",
    );
    button.addEventListener("click", () => {
      resource.hidden = !resource.hidden;
      button.setAttribute("aria-expanded", String(!resource.hidden));
    });
    return el("div", { class: "suggestion-item" }, button, resource);
  }

  function renderCard(card) {
    const indicator = INDICATORS.has(card.indicator) ? card.indicator : "info";
    const source = card.source || {};
    const topic = (source.topic && source.topic.code) || "";
    const node = el("article", { class: `card card-${indicator}`, "data-indicator": indicator, "data-topic": topic });
    node.append(
      el(
        "div",
        { class: "card-head" },
        el("span", { class: `badge badge-${indicator}` }, indicator),
        el("span", { class: "card-summary" }, card.summary || ""),
      ),
    );
    if (card.detail) node.append(el("div", { class: "card-detail" }, markdown(card.detail)));
    if (source.label || source.url) {
      node.append(el("div", { class: "card-source" }, "Source: ", link(source.label, source.url)));
    }
    const suggestions = card.suggestions || [];
    if (suggestions.length) {
      node.append(el("div", { class: "card-suggestions" }, suggestions.map(renderSuggestion)));
    }
    const links = card.links || [];
    if (links.length) {
      node.append(el("ul", { class: "card-links" }, links.map((l) => el("li", {}, link(l.label, l.url)))));
    }
    const reasons = card.overrideReasons || [];
    if (reasons.length) {
      node.append(
        el("div", { class: "card-reasons" }, "Override reasons: ", reasons.map((r) => r.display || r.code).join(" · ")),
      );
    }
    return node;
  }

  // ------------------------------------------------------------------ explanation

  function table(headers, rows, rowClass) {
    return el(
      "table",
      {},
      el("thead", {}, el("tr", {}, headers.map((h) => el("th", {}, h)))),
      el(
        "tbody",
        {},
        rows.map((row, i) => el("tr", { class: rowClass ? rowClass(i) : null }, row.map((cell) => el("td", {}, cell)))),
      ),
    );
  }

  function section(title, ...content) {
    return el("section", { class: "why" }, el("h3", {}, title), content);
  }

  function renderExplanation(report) {
    const facts = report.facts;
    const parts = [
      el(
        "p",
        { class: "context" },
        `${report.service}: patient ${report.patient}, today ${report.today}, profile ${report.profile}`,
      ),
    ];
    if (report.overrides.length) {
      parts.push(
        section(
          "What-ifs applied",
          el(
            "ul",
            {},
            report.overrides.map((o) =>
              el(
                "li",
                {},
                el("code", {}, o.override),
                o.added ? ` added ${o.added}` : "",
                o.removed.length ? ` removed ${o.removed.join(", ")}` : "",
              ),
            ),
          ),
        ),
      );
    }
    const labs = LABS.map((name) => {
      const m = facts[name];
      if (!m) return [name, "no result", "", "", "", ""];
      const notes = [...m.notes, ...(m.stale ? ["stale"] : [])].join("; ");
      return [name, m.value, m.date, m.status, m.source, notes];
    });
    parts.push(section("Facts: labs", table(["lab", "value", "date", "status", "source", "notes"], labs)));
    parts.push(
      section(
        "Facts: medications",
        facts.medications.length
          ? table(
              ["category", "name", "status", "source"],
              facts.medications.map((m) => [m.category, m.name, m.status, m.source]),
            )
          : el("p", {}, "none"),
      ),
    );
    const evidence = [
      ...Object.entries(facts.conditions).flatMap(([name, items]) => items.map((e) => [name, e])),
      ...facts.pregnancy.map((e) => ["pregnancy", e]),
    ];
    parts.push(
      section(
        "Facts: conditions",
        evidence.length
          ? table(
              ["fact", "evidence", "source", "date"],
              evidence.map(([name, e]) => [name, e.text, e.source, e.date || ""]),
            )
          : el("p", {}, "none"),
      ),
    );
    const notes = [
      ...facts.issues.map((t) => `data issue: ${t}`),
      ...facts.missing.map((t) => `missing: ${t}`),
      ...facts.incomplete.map((t) => `incomplete: ${t}`),
      ...Object.entries(facts.fetched).map(([key, outcome]) => `fetched ${key}: ${outcome}`),
    ];
    if (notes.length) parts.push(section("Data", el("ul", { class: "data-notes" }, notes.map((t) => el("li", {}, t)))));
    const rules = report.rules;
    parts.push(
      section(
        `Rules for ${report.hook}`,
        table(
          ["verdict", "rule", "draft", "why"],
          rules.map((r) => [r.verdict, el("span", { title: r.title }, r.rule), r.draft || "", r.reasons.join("\n")]),
          (i) => `verdict-${rules[i].verdict.replace(/\s+/g, "-")}`,
        ),
      ),
    );
    return parts;
  }

  // ------------------------------------------------------------------ running

  function setStatus(text) {
    $("status").textContent = text;
  }

  function showError(text) {
    const box = $("error");
    box.textContent = text;
    box.hidden = false;
    setStatus("");
    document.body.dataset.state = "error";
  }

  function overrides() {
    const form = $("whatif");
    const out = [];
    for (const lab of LABS) {
      const input = form.elements[lab];
      const value = input ? input.value.trim() : "";
      if (value) out.push(`${lab}=${value}${form.elements[`${lab}-unit`].value}`);
    }
    for (const name of SWITCHES) {
      const value = form.elements[name] ? form.elements[name].value : "";
      if (value) out.push(`${name}=${value}`);
    }
    return out;
  }

  function requestBody() {
    const text = $("payload").value.trim();
    if (!text) throw new Error("Choose a fixture, or paste a CDS Hooks request or a FHIR Bundle.");
    let data;
    try {
      data = JSON.parse(text);
    } catch (error) {
      throw new Error(`The input is not valid JSON: ${error.message}`);
    }
    if (!data || typeof data !== "object" || Array.isArray(data)) throw new Error("The input must be a JSON object.");
    const body = { profile: $("profile").value, today: $("today").value || null, overrides: overrides() };
    if (data.resourceType === "Bundle") {
      body.bundle = data;
      body.hook = $("hook").value;
      body.patient = $("patient").value.trim() || null;
    } else {
      body.request = data;
      if (typeof data.hook === "string") $("hook").value = data.hook;
    }
    return body;
  }

  async function run() {
    clearTimeout(state.timer);
    let body;
    try {
      body = requestBody();
    } catch (error) {
      showError(error.message);
      return;
    }
    const seq = ++state.seq;
    document.body.dataset.state = "running";
    setStatus("Running…");
    let response;
    let data = null;
    try {
      response = await fetch(document.body.dataset.explainUrl, {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "application/json" },
        body: JSON.stringify(body),
        cache: "no-store",
        credentials: "same-origin",
      });
      data = await response.json().catch(() => null);
    } catch (error) {
      if (seq === state.seq) showError(`The service could not be reached: ${error.message}`);
      return;
    }
    if (seq !== state.seq) return; // a newer run has started; its answer is the one to show
    if (!response.ok) {
      const detail = data && data.detail ? data.detail : response.statusText;
      showError(`${response.status} ${data && data.error ? data.error : "error"}: ${detail}`);
      return;
    }
    $("error").hidden = true;
    const cards = data.response.cards || [];
    $("cards").replaceChildren(...cards.map(renderCard));
    $("explanation").replaceChildren(...renderExplanation(data));
    const n = cards.length;
    setStatus(`${n} card${n === 1 ? "" : "s"} · ${data.service} · today ${data.today} · profile ${data.profile}`);
    $("cards").dataset.run = String(seq);
    document.body.dataset.state = "done";
  }

  function schedule() {
    clearTimeout(state.timer);
    if ($("payload").value.trim()) state.timer = setTimeout(run, DEBOUNCE_MS);
  }

  async function loadFixture(id) {
    $("fixture-description").textContent = "";
    if (!id) return;
    const [hook, name] = id.split("/");
    const url = `${document.body.dataset.fixturesUrl}/${encodeURIComponent(hook)}/${encodeURIComponent(name)}`;
    let data;
    try {
      const response = await fetch(url, { cache: "no-store", credentials: "same-origin" });
      data = await response.json();
      if (!response.ok) throw new Error(data.detail || response.statusText);
    } catch (error) {
      showError(`Fixture ${id} could not be loaded: ${error.message}`);
      return;
    }
    $("payload").value = JSON.stringify(data.request, null, 2);
    $("hook").value = data.hook;
    if (data.profile) $("profile").value = data.profile;
    if (data.today) $("today").value = data.today;
    $("fixture-description").textContent = data.description || "";
    await run();
  }

  function openFile(file) {
    if (!file) return;
    const reader = new FileReader();
    reader.addEventListener("load", () => {
      $("fixture").value = "";
      $("fixture-description").textContent = `${file.name} (read in the browser; sent only to evaluate it)`;
      $("payload").value = String(reader.result);
      run();
    });
    reader.addEventListener("error", () => showError(`${file.name} could not be read`));
    reader.readAsText(file);
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("input-form").addEventListener("submit", (event) => {
      event.preventDefault();
      run();
    });
    $("fixture").addEventListener("change", (event) => loadFixture(event.target.value));
    $("upload").addEventListener("change", (event) => openFile(event.target.files[0]));
    for (const id of ["hook", "profile", "today"]) {
      $(id).addEventListener("change", schedule);
    }
    const whatif = $("whatif");
    whatif.addEventListener("submit", (event) => event.preventDefault());
    whatif.addEventListener("input", schedule);
    whatif.addEventListener("change", schedule);
    whatif.addEventListener("reset", () => setTimeout(schedule, 0));
    document.body.dataset.state = "ready";
  });
})();
