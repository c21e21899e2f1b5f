// pollcast live results page: plain JS, no build step, served by the binary itself.
// Text always goes in with textContent: poll questions and options are user input.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);

  // localStorage throws when storage is disabled; the page then works for the visit only.
  const memory = new Map();
  const store = {
    get(key) {
      try {
        return localStorage.getItem(key);
      } catch {
        return memory.has(key) ? memory.get(key) : null;
      }
    },
    set(key, value) {
      try {
        localStorage.setItem(key, value);
      } catch {
        memory.set(key, value);
      }
    },
  };
  const TOKEN_KEY = "pollcast.adminToken";
  const VOTER_KEY = "pollcast.voterId";
  const votedKey = (pollId) => `pollcast.voted.${pollId}`;

  const MIN_OPTIONS = 2;
  const MAX_OPTIONS = 32;
  const RECONNECT_FIRST_MS = 500;
  const RECONNECT_MAX_MS = 10000;
  const VOTE_ATTEMPTS = 6;

  const UNAUTHORIZED =
    "The admin token was refused. Enter the server's admin token above: it is admin.token " +
    "in the config, or, when that is not set, the one pollcast printed in its log at start " +
    "(admin_token=…).";

  // crypto.randomUUID exists only in secure contexts; a plain-HTTP server on a LAN address
  // is not one, while getRandomValues works everywhere.
  function uuid() {
    if (typeof crypto.randomUUID === "function") return crypto.randomUUID();
    const b = crypto.getRandomValues(new Uint8Array(16));
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
    return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
  }

  function voterId() {
    let id = store.get(VOTER_KEY);
    if (!id) {
      id = `v-${uuid()}`;
      store.set(VOTER_KEY, id);
    }
    return id;
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "text") node.textContent = value;
      else if (key === "className") node.className = value;
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children) if (child) node.append(child);
    return node;
  }

  // ---- HTTP ----

  // Resolves with the status and parsed JSON body; rejects only when no answer came back.
  async function api(method, path, body, { admin = false } = {}) {
    const headers = {};
    if (body !== undefined) headers["Content-Type"] = "application/json";
    if (admin) {
      const token = store.get(TOKEN_KEY);
      if (token) headers.Authorization = `Bearer ${token}`;
    }
    const response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
    });
    const text = await response.text();
    let data = null;
    if (text) {
      try {
        data = JSON.parse(text);
      } catch {
        data = null;
      }
    }
    return { status: response.status, ok: response.ok, data, headers: response.headers };
  }

  function errorText(result) {
    if (result.status === 401) return UNAUTHORIZED;
    if (result.data && typeof result.data.message === "string") return result.data.message;
    return `The server answered ${result.status}.`;
  }

  function setStatus(text, kind = "info") {
    const status = $("status");
    status.textContent = text || "";
    status.dataset.kind = kind;
  }

  // Voters have no token; they are not offered buttons that would only answer 401.
  function showAdminActions() {
    $("admin-actions").hidden = !store.get(TOKEN_KEY);
  }

  function openAdmin() {
    $("admin").open = true;
    $("admin-token").focus();
  }

  // ---- Admin token ----

  function initAdmin() {
    const input = $("admin-token");
    input.value = store.get(TOKEN_KEY) || "";
    input.addEventListener("input", () => {
      store.set(TOKEN_KEY, input.value.trim());
      showAdminActions();
    });
    const toggle = $("admin-token-toggle");
    toggle.addEventListener("click", () => {
      const show = input.type === "password";
      input.type = show ? "text" : "password";
      toggle.textContent = show ? "Hide" : "Show";
      toggle.setAttribute("aria-pressed", String(show));
    });
  }

  // ---- Views and routing ----

  const views = ["view-list", "view-new", "view-poll", "view-present", "view-missing"];

  function showView(id) {
    for (const view of views) $(view).hidden = view !== id;
  }

  // "full": everything, for the organiser; "audience": voting and results only (where the
  // join link and QR code lead); "present": the projector screen.
  function setMode(mode) {
    document.body.dataset.mode = mode;
  }

  function route() {
    leavePoll();
    setStatus("");
    const hash = location.hash || "#/";
    const full = /^#\/polls\/(\d+)\/?$/.exec(hash);
    const present = /^#\/polls\/(\d+)\/present\/?$/.exec(hash);
    const audience = /^#\/vote\/(\d+)\/?$/.exec(hash);
    const [mode, match] = present ? ["present", present] : audience ? ["audience", audience] : ["full", full];
    setMode(mode);
    if (match) openPoll(Number(match[1]), mode);
    else if (hash === "#/new") showNew();
    else showList();
  }

  function showMissing(text) {
    showView("view-missing");
    $("missing-text").textContent = text;
    document.title = "Not found · pollcast";
  }

  // ---- Poll list ----

  async function showList() {
    showView("view-list");
    document.title = "Polls · pollcast";
    const list = $("poll-list");
    const button = $("refresh-polls");
    button.disabled = true;
    try {
      const result = await api("GET", "/polls");
      if (!result.ok || !Array.isArray(result.data)) {
        setStatus(`Could not load the polls: ${errorText(result)}`, "error");
        return;
      }
      const polls = result.data.slice().sort((a, b) => b.id - a.id);
      list.replaceChildren(...polls.map(listItem));
      $("list-empty").hidden = polls.length > 0;
    } catch {
      setStatus("Could not reach the server to load the polls.", "error");
    } finally {
      button.disabled = false;
    }
  }

  function listItem(poll) {
    const side = el("span", { className: "side" });
    if (typeof poll.totalVotes === "number") {
      side.append(el("span", { text: plural(poll.totalVotes, "vote") }));
    }
    if (poll.closed) {
      side.append(el("span", { className: "badge badge-closed", text: "Closed" }));
    }
    const link = el(
      "a",
      { href: `#/polls/${poll.id}`, "data-testid": "poll-list-item", "data-poll-id": poll.id },
      el("span", { className: "q", text: poll.question }),
      side,
    );
    return el("li", {}, link);
  }

  // ---- Create poll ----

  function addOptionRow(value = "") {
    const rows = $("option-rows");
    if (rows.children.length >= MAX_OPTIONS) return null;
    const row = $("option-row-template").content.firstElementChild.cloneNode(true);
    row.querySelector("input").value = value;
    row.querySelector(".remove-option").addEventListener("click", () => {
      if (rows.children.length <= MIN_OPTIONS) return;
      const next = row.nextElementSibling || row.previousElementSibling;
      row.remove();
      renumberOptions();
      next?.querySelector("input")?.focus();
    });
    rows.append(row);
    renumberOptions();
    return row;
  }

  function renumberOptions() {
    const rows = Array.from($("option-rows").children);
    rows.forEach((row, i) => {
      const id = `option-${i + 1}`;
      row.querySelector("label").textContent = `Option ${i + 1}`;
      row.querySelector("label").htmlFor = id;
      const input = row.querySelector("input");
      input.id = id;
      input.placeholder = `Option ${i + 1}`;
      const remove = row.querySelector(".remove-option");
      remove.disabled = rows.length <= MIN_OPTIONS;
      remove.setAttribute("aria-label", `Remove option ${i + 1}`);
    });
    $("add-option").disabled = rows.length >= MAX_OPTIONS;
    $("max-choices").max = String(rows.length);
  }

  function showNew() {
    showView("view-new");
    document.title = "New poll · pollcast";
    // Creating needs the token: without one saved, the field is the first step.
    if (!store.get(TOKEN_KEY)) $("admin").open = true;
    if ($("option-rows").children.length === 0) {
      addOptionRow();
      addOptionRow();
    }
    $("question").focus();
  }

  function resetCreateForm() {
    $("create-form").reset();
    $("option-rows").replaceChildren();
    addOptionRow();
    addOptionRow();
    $("create-error").hidden = true;
  }

  function createError(text) {
    const box = $("create-error");
    box.textContent = text;
    box.hidden = false;
  }

  // Only fields that differ from the server's defaults are sent, so the page also works with
  // servers that predate them (they refuse unknown fields).
  function createBody() {
    const question = $("question").value.trim();
    if (!question) return { error: "Write a question." };
    const options = Array.from($("option-rows").querySelectorAll("input"), (i) => i.value.trim());
    if (options.length < MIN_OPTIONS || options.some((o) => !o)) {
      return { error: `Fill in every option (${MIN_OPTIONS} to ${MAX_OPTIONS}), or remove the empty ones.` };
    }
    if (new Set(options).size !== options.length) return { error: "Two options have the same text." };
    const body = { question, options };

    const maxChoices = Number($("max-choices").value || 1);
    if (!Number.isInteger(maxChoices) || maxChoices < 1 || maxChoices > options.length) {
      return { error: `Choices per voter must be a whole number from 1 to ${options.length}.` };
    }
    if (maxChoices > 1) body.maxChoices = maxChoices;

    const closesAt = $("closes-at").value;
    if (closesAt) {
      // datetime-local is the viewer's wall-clock time; the API takes an instant.
      const at = new Date(closesAt);
      if (Number.isNaN(at.getTime())) return { error: "The closing time is not a valid date." };
      if (at.getTime() <= Date.now()) return { error: "The closing time is in the past." };
      body.closesAt = at.toISOString().replace(/\.\d{3}Z$/, "Z");
    }
    if ($("hide-results").checked) body.hideResults = true;
    if ($("allow-change").checked) body.allowChange = true;

    const url = $("webhook-url").value.trim();
    const every = $("webhook-every").value.trim();
    if (url) {
      if (!/^https?:\/\//i.test(url)) return { error: "The webhook URL must start with https:// or http://." };
      body.webhook = { url };
      if (every) {
        const secs = Number(every);
        if (!Number.isInteger(secs) || secs < 1) return { error: "Results every N seconds must be a whole number of seconds." };
        body.webhook.resultsEverySecs = secs;
      }
    } else if (every) {
      return { error: "Results every N seconds needs a webhook URL." };
    }
    return { body };
  }

  // Shown once, on the poll view the creation opens, then forgotten.
  let pendingSecret = null;

  async function submitCreate(event) {
    event.preventDefault();
    $("create-error").hidden = true;
    const { body, error } = createBody();
    if (error) {
      createError(error);
      return;
    }
    const button = $("create-submit");
    button.disabled = true;
    try {
      const result = await api("POST", "/polls", body, { admin: true });
      if (result.status === 201 && result.data) {
        if (result.data.webhookSecret) {
          pendingSecret = { pollId: result.data.id, secret: result.data.webhookSecret };
        }
        resetCreateForm();
        // The token works: fold it away, so the poll gets the screen.
        $("admin").open = false;
        location.hash = `#/polls/${result.data.id}`;
        return;
      }
      createError(errorText(result));
      if (result.status === 401) openAdmin();
    } catch {
      createError("Could not reach the server. Nothing was created; try again.");
    } finally {
      button.disabled = false;
    }
  }

  // ---- Poll view ----

  // The poll being watched; replaced on every navigation so late callbacks of the previous
  // one can tell they are stale.
  let current = null;

  function leavePoll() {
    if (!current) return;
    current.stopped = true;
    clearTimeout(current.reconnectTimer);
    clearInterval(current.countdownTimer);
    clearTimeout(current.announceTimer);
    if (current.ws) current.ws.close(1000);
    current = null;
    $("webhook-secret-box").hidden = true;
  }

  async function openPoll(id, mode = "full") {
    const c = {
      id,
      mode,
      poll: null,
      lastSeq: -Infinity,
      optionKey: "",
      ws: null,
      attempt: 0,
      reconnectTimer: null,
      countdownTimer: null,
      announceTimer: null,
      lastAnnounce: 0,
      stopped: false,
      voting: false,
    };
    current = c;
    if (mode === "present") {
      showView("view-present");
      $("present-question").textContent = "Loading…";
      $("present-bars").replaceChildren();
      $("present-qr").replaceChildren();
      $("present-url").textContent = "";
      $("present-total").textContent = "";
      $("present-state").textContent = "";
      loadJoinCode(c);
    } else {
      showView("view-poll");
    }
    $("present-link").href = `#/polls/${id}/present`;
    $("own-choice").hidden = true;
    $("poll-question").textContent = "Loading…";
    $("choice-list").replaceChildren();
    $("bars").replaceChildren();
    $("vote-status").textContent = "";
    $("close-status").textContent = "";
    $("total-votes").textContent = "";
    $("results-live").textContent = "";
    $("download-csv").href = `/polls/${id}/export?format=csv`;
    $("download-json").href = `/polls/${id}/export?format=json`;
    showAdminActions();
    setLive("connecting");
    if (pendingSecret && pendingSecret.pollId === id) {
      $("webhook-secret").textContent = pendingSecret.secret;
      $("webhook-secret-box").hidden = false;
    }
    pendingSecret = null;

    try {
      const result = await api("GET", `/polls/${id}`);
      if (c.stopped) return;
      if (result.status === 404) {
        leavePoll();
        showMissing(`There is no poll ${id}.`);
        return;
      }
      if (result.ok && result.data) setPoll(c, result.data, result.data.seq);
      else setStatus(`Could not load the poll: ${errorText(result)}`, "error");
    } catch {
      if (c.stopped) return;
      setStatus("Could not reach the server; retrying.", "error");
    }
    connect(c);
  }

  function setLive(state) {
    const badge = $("live-state");
    badge.dataset.state = state;
    badge.textContent = {
      connecting: "connecting…",
      live: "live",
      reconnecting: "reconnecting…",
      final: "final",
    }[state];
  }

  function connect(c) {
    if (c.stopped) return;
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(`${scheme}//${location.host}/ws/polls/${c.id}`);
    c.ws = ws;
    ws.addEventListener("message", (event) => {
      if (c.stopped || c.ws !== ws) return;
      let message;
      try {
        message = JSON.parse(event.data);
      } catch {
        return;
      }
      onMessage(c, message);
    });
    // "error" is always followed by "close", so reconnecting is decided here alone.
    ws.addEventListener("close", () => {
      if (c.stopped || c.ws !== ws) return;
      c.ws = null;
      if (isFinal(c)) {
        setLive("final");
        return;
      }
      scheduleReconnect(c);
    });
  }

  // Exponential backoff with jitter, so that thousands of viewers cut off by one restart
  // do not all come back in the same instant.
  function scheduleReconnect(c) {
    setLive("reconnecting");
    const ceiling = Math.min(RECONNECT_MAX_MS, RECONNECT_FIRST_MS * 2 ** c.attempt);
    c.attempt += 1;
    const delay = ceiling / 2 + Math.random() * (ceiling / 2);
    c.reconnectTimer = setTimeout(async () => {
      // A poll that no longer exists is refused before the upgrade, which a browser only
      // reports as a closed socket; after a few failures, ask plainly.
      if (c.attempt >= 3) {
        try {
          const result = await api("GET", `/polls/${c.id}`);
          if (c.stopped) return;
          if (result.status === 404) {
            leavePoll();
            showMissing(`There is no poll ${c.id}.`);
            return;
          }
        } catch {
          // Still unreachable: keep trying the socket.
        }
      }
      connect(c);
    }, delay);
  }

  function onMessage(c, message) {
    switch (message.type) {
      case "snapshot":
        // A snapshot is the whole truth as of its seq, whatever was seen before a reconnect.
        c.lastSeq = -Infinity;
        setPoll(c, message.poll, message.seq);
        c.attempt = 0;
        setLive(isFinal(c) ? "final" : "live");
        break;
      case "counts":
        if (!(typeof message.seq === "number" && message.seq > c.lastSeq) || !c.poll) return;
        c.lastSeq = message.seq;
        applyCounts(c, message.counts);
        if (c.mode === "present") renderPresent(c);
        else renderResults(c);
        break;
      case "closed":
        if (!c.poll) return;
        // Closing is final and happens once: it is applied even when its seq equals the last
        // counts' (the close need not change any count), only older counts are ignored.
        if (typeof message.seq !== "number" || message.seq >= c.lastSeq) {
          if (typeof message.seq === "number") c.lastSeq = message.seq;
          applyCounts(c, message.counts);
        }
        c.poll.closed = true;
        c.poll.closedAt = message.closedAt || c.poll.closedAt || null;
        renderPoll(c);
        break;
      default:
        break;
    }
  }

  function applyCounts(c, counts) {
    if (!Array.isArray(counts)) return;
    for (const { optionId, newCount } of counts) {
      const option = c.poll.options.find((o) => o.id === optionId);
      if (option) option.votes = typeof newCount === "number" ? newCount : null;
    }
  }

  function setPoll(c, poll, seq) {
    if (!poll || !Array.isArray(poll.options)) return;
    if (typeof seq === "number") {
      if (seq < c.lastSeq) return;
      c.lastSeq = seq;
    }
    c.poll = {
      ...poll,
      options: poll.options.map((o) => ({ ...o })),
      maxChoices: Number.isInteger(poll.maxChoices) && poll.maxChoices > 0 ? poll.maxChoices : 1,
    };
    const key = c.poll.options.map((o) => `${o.id}:${o.text}`).join("\n") + `|${c.poll.maxChoices}`;
    if (key !== c.optionKey) {
      c.optionKey = key;
      if (c.mode === "present") {
        buildPresentBars(c);
      } else {
        buildChoices(c);
        buildBars(c);
      }
    }
    renderPoll(c);
  }

  const isFinal = (c) => Boolean(c.poll && c.poll.closed);

  function buildChoices(c) {
    const { options, maxChoices } = c.poll;
    const multiple = maxChoices > 1;
    $("choices-legend").textContent = multiple ? `Choose up to ${maxChoices}` : "Choose one";
    const previous = previousChoice(c.id);
    const rows = options.map((option) => {
      const id = `choice-${option.id}`;
      const input = el("input", {
        type: multiple ? "checkbox" : "radio",
        name: "choice",
        id,
        value: option.id,
        "data-testid": id,
      });
      input.checked = previous.includes(option.id);
      if (multiple) {
        input.addEventListener("change", () => {
          const chosen = $("choice-list").querySelectorAll("input:checked").length;
          if (chosen > maxChoices) {
            input.checked = false;
            voteStatus(`You can choose up to ${maxChoices}.`, "error");
          }
        });
      }
      return el("div", { className: "choice" }, input, el("label", { for: id, text: option.text }));
    });
    $("choice-list").replaceChildren(...rows);
  }

  function buildBars(c) {
    const rows = c.poll.options.map((option) => {
      const fill = el("div", { className: "bar-fill", "data-testid": `bar-fill-${option.id}` });
      const meter = el(
        "div",
        {
          className: "bar-track",
          role: "meter",
          "aria-valuemin": 0,
          "aria-valuemax": 1,
          "aria-valuenow": 0,
          id: `bar-${option.id}`,
          "data-testid": `bar-${option.id}`,
        },
        fill,
      );
      const nums = el(
        "span",
        { className: "nums" },
        el("strong", { "data-testid": `bar-count-${option.id}`, text: "0" }),
        " · ",
        el("span", { "data-testid": `bar-percent-${option.id}`, text: "0%" }),
      );
      const label = el("div", { className: "bar-label", "aria-hidden": "true" },
        el("span", { className: "text", text: option.text }), nums);
      return el("div", { className: "bar", "data-testid": `bar-row-${option.id}` }, label, meter);
    });
    $("bars").replaceChildren(...rows);
  }

  function renderPoll(c) {
    if (c.mode === "present") {
      renderPresent(c);
      return;
    }
    const poll = c.poll;
    $("poll-question").textContent = poll.question;
    $("view-poll").dataset.pollId = String(poll.id);
    document.title = `${poll.question} · pollcast`;
    const final = isFinal(c);
    $("poll-badge").hidden = !final;
    $("poll-badge").className = final ? "badge badge-closed" : "badge";
    $("poll-badge").textContent = poll.closedAt
      ? `Closed ${new Date(poll.closedAt).toLocaleString()}`
      : "Closed";
    $("close-poll").disabled = final;
    renderCountdown(c);
    renderVoting(c);
    renderResults(c);
    // Nothing will change any more: "final" says more than "live".
    if (final) setLive("final");
  }

  function renderCountdown(c) {
    clearInterval(c.countdownTimer);
    const box = $("countdown");
    const at = c.poll.closesAt ? Date.parse(c.poll.closesAt) : NaN;
    if (isFinal(c) || Number.isNaN(at)) {
      box.hidden = true;
      return;
    }
    box.hidden = false;
    box.title = new Date(at).toLocaleString();
    const tick = () => {
      const left = at - Date.now();
      box.textContent = left > 0 ? `Closes in ${duration(left)}` : "Closing…";
    };
    tick();
    c.countdownTimer = setInterval(tick, 1000);
  }

  function duration(ms) {
    const total = Math.ceil(ms / 1000);
    const d = Math.floor(total / 86400);
    const h = Math.floor((total % 86400) / 3600);
    const m = Math.floor((total % 3600) / 60);
    const s = total % 60;
    const pad = (n) => String(n).padStart(2, "0");
    if (d > 0) return `${d} d ${h} h ${pad(m)} min`;
    if (h > 0) return `${h} h ${pad(m)} min ${pad(s)} s`;
    return `${m} min ${pad(s)} s`;
  }

  function previousChoice(pollId) {
    try {
      const ids = JSON.parse(store.get(votedKey(pollId)) || "[]");
      return Array.isArray(ids) ? ids : [];
    } catch {
      return [];
    }
  }

  function renderVoting(c) {
    const final = isFinal(c);
    const chosen = previousChoice(c.id);
    const voted = chosen.length > 0;
    // The audience sees the results once it has voted (or the poll is over), with its choice.
    $("view-poll").querySelector(".results").dataset.voted = String(voted || final);
    const own = $("own-choice");
    const texts = c.poll.options.filter((o) => chosen.includes(o.id)).map((o) => o.text);
    own.hidden = texts.length === 0;
    own.textContent = texts.length ? `Your choice: ${texts.join(", ")}` : "";
    const locked = final || (voted && !c.poll.allowChange);
    for (const input of $("choice-list").querySelectorAll("input")) input.disabled = locked;
    const button = $("vote-submit");
    button.disabled = locked || c.voting;
    button.textContent = voted && c.poll.allowChange ? "Change vote" : voted ? "Voted" : "Vote";
    if (final) voteStatus("This poll is closed.", "info");
    else if (voted && !$("vote-status").textContent) {
      voteStatus(c.poll.allowChange ? "You voted; you may change your vote." : "You voted in this poll.", "ok");
    }
  }

  function voteStatus(text, kind = "info") {
    const box = $("vote-status");
    box.textContent = text;
    box.dataset.kind = kind;
  }

  function renderResults(c) {
    const poll = c.poll;
    const final = isFinal(c);
    const hidden = poll.options.some((o) => typeof o.votes !== "number");
    $("results-title").textContent = final ? "Final result" : "Live results";
    $("view-poll").querySelector(".results").dataset.final = String(final);
    $("results-hidden").hidden = !hidden;
    $("bars").hidden = hidden;
    if (hidden) {
      $("total-votes").textContent = "";
      return;
    }
    const total = poll.options.reduce((sum, o) => sum + o.votes, 0);
    $("total-votes").textContent =
      poll.maxChoices > 1 ? plural(total, "choice") + " in all" : plural(total, "vote");
    for (const option of poll.options) {
      const meter = $(`bar-${option.id}`);
      if (!meter) continue;
      const share = total > 0 ? option.votes / total : 0;
      const percent = Math.round(share * 100);
      meter.setAttribute("aria-valuenow", String(option.votes));
      meter.setAttribute("aria-valuemax", String(Math.max(total, 1)));
      meter.setAttribute("aria-valuetext", `${plural(option.votes, "vote")}, ${percent}%`);
      meter.setAttribute("aria-label", `${option.text}: ${plural(option.votes, "vote")}, ${percent}%`);
      // CSSOM writes are allowed by style-src 'self'; style attributes would not be.
      meter.firstElementChild.style.width = `${(share * 100).toFixed(2)}%`;
      document.querySelector(`[data-testid="bar-count-${option.id}"]`).textContent = String(option.votes);
      document.querySelector(`[data-testid="bar-percent-${option.id}"]`).textContent = `${percent}%`;
    }
    announce(c, total);
  }

  // Screen readers hear a summary, at most every few seconds: a busy poll changes its counts
  // several times a second, and announcing each change would drown everything else.
  const ANNOUNCE_EVERY_MS = 8000;

  function announce(c, total) {
    clearTimeout(c.announceTimer);
    const say = () => {
      c.lastAnnounce = Date.now();
      const parts = c.poll.options.map((o) => `${o.text}: ${plural(o.votes, "vote")}`);
      const title = isFinal(c) ? "Final result" : "Live results";
      $("results-live").textContent = `${title}, ${plural(total, "vote")}. ${parts.join("; ")}.`;
    };
    const wait = (c.lastAnnounce || 0) + ANNOUNCE_EVERY_MS - Date.now();
    if (isFinal(c) || wait <= 0) say();
    else c.announceTimer = setTimeout(say, wait);
  }

  const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;

  // ---- Presenter screen ----

  // The QR code comes from the server as SVG, with the link it encodes beside it, so the
  // text under the code is always what the code says.
  async function loadJoinCode(c) {
    try {
      const response = await fetch(`/polls/${c.id}/qr.svg`, { cache: "no-store" });
      if (c.stopped || !response.ok) return;
      const text = await response.text();
      const doc = new DOMParser().parseFromString(text, "image/svg+xml");
      const svg = doc.documentElement;
      if (c.stopped || !svg || svg.nodeName !== "svg") return;
      const url = svg.getAttribute("data-join-url") || "";
      const node = document.importNode(svg, true);
      node.setAttribute("role", "img");
      node.setAttribute("aria-label", `QR code of ${url}`);
      node.setAttribute("data-testid", "present-qr-code");
      $("present-qr").replaceChildren(node);
      $("present-url").textContent = url.replace(/^https?:\/\//, "");
    } catch {
      // Without the code the screen still shows the results; the link can be read out.
    }
  }

  function buildPresentBars(c) {
    const rows = c.poll.options.map((option) => {
      const fill = el("div", { className: "bar-fill" });
      const track = el("div", { className: "bar-track", "aria-hidden": "true" }, fill);
      const nums = el("span", { className: "nums", "data-testid": `present-nums-${option.id}` });
      const label = el("div", { className: "present-label" }, el("span", { className: "text", text: option.text }), nums);
      return el("div", { className: "present-bar", "data-testid": `present-bar-${option.id}`, "data-option-id": option.id }, label, track);
    });
    $("present-bars").replaceChildren(...rows);
  }

  // m:ss under an hour, h:mm:ss above: a room reads it at a glance.
  function clock(ms) {
    const total = Math.max(0, Math.ceil(ms / 1000));
    const h = Math.floor(total / 3600);
    const m = Math.floor((total % 3600) / 60);
    const s = String(total % 60).padStart(2, "0");
    return h > 0 ? `${h}:${String(m).padStart(2, "0")}:${s}` : `${m}:${s}`;
  }

  function renderPresent(c) {
    const poll = c.poll;
    const final = isFinal(c);
    const hidden = poll.options.some((o) => typeof o.votes !== "number");
    $("present-question").textContent = poll.question;
    document.title = `${poll.question} · pollcast`;
    $("view-present").dataset.final = String(final);
    $("view-present").dataset.pollId = String(poll.id);
    const state = $("present-state");
    clearInterval(c.countdownTimer);
    const at = poll.closesAt ? Date.parse(poll.closesAt) : NaN;
    const tick = () => {
      let text = "Live";
      let kind = "live";
      if (final) [text, kind] = ["Closed", "closed"];
      else if (!Number.isNaN(at)) text = at > Date.now() ? `Live · closing in ${clock(at - Date.now())}` : "Closing…";
      if (hidden && !final) [text, kind] = [`${text} · results at the close`, "hidden"];
      state.textContent = text;
      state.dataset.state = kind;
    };
    tick();
    if (!final && !Number.isNaN(at)) c.countdownTimer = setInterval(tick, 1000);
    $("present-hidden").hidden = !hidden;
    $("present-bars").hidden = hidden;
    if (hidden) {
      $("present-total").textContent = "";
      return;
    }
    const total = poll.options.reduce((sum, o) => sum + o.votes, 0);
    $("present-total").textContent =
      poll.maxChoices > 1 ? plural(total, "choice") + " in all" : plural(total, "vote");
    for (const option of poll.options) {
      const row = document.querySelector(`[data-testid="present-bar-${option.id}"]`);
      if (!row) continue;
      const share = total > 0 ? option.votes / total : 0;
      row.querySelector(".bar-fill").style.width = `${(share * 100).toFixed(2)}%`;
      row.querySelector(".nums").textContent = `${option.votes} · ${Math.round(share * 100)}%`;
      row.dataset.votes = String(option.votes);
    }
  }

  // Network errors, 503 and 429 are retried with the same voteId: the server counts a vote
  // id once, so a retry after a lost answer can never count twice.
  async function sendVote(c, body) {
    let delay = 500;
    for (let attempt = 1; ; attempt += 1) {
      let result = null;
      try {
        result = await api("POST", "/vote", body);
      } catch {
        result = null;
      }
      const retriable = result === null || result.status === 503 || result.status === 429;
      if (!retriable || attempt >= VOTE_ATTEMPTS || c.stopped) return result;
      let wait = delay * (0.75 + Math.random() * 0.5);
      const retryAfter = result && Number(result.headers.get("Retry-After"));
      if (retryAfter > 0) wait = retryAfter * 1000;
      voteStatus(result === null ? "Connection problem, retrying…" : "Server busy, retrying…");
      await sleep(wait);
      delay = Math.min(delay * 2, 8000);
    }
  }

  async function submitVote(event) {
    event.preventDefault();
    const c = current;
    if (!c || !c.poll || c.voting || isFinal(c)) return;
    const ids = Array.from($("choice-list").querySelectorAll("input:checked"), (i) => Number(i.value));
    if (ids.length === 0) {
      voteStatus("Choose an option first.", "error");
      return;
    }
    const body = { pollId: c.id, userId: voterId(), voteId: uuid() };
    if (c.poll.maxChoices > 1) body.optionIds = ids;
    else body.optionId = ids[0];

    c.voting = true;
    $("vote-submit").disabled = true;
    voteStatus("Sending your vote…");
    const result = await sendVote(c, body);
    c.voting = false;
    if (c.stopped) return;

    if (result === null) {
      voteStatus("Could not reach the server; your vote was not confirmed. Try again.", "error");
    } else if (result.status === 202) {
      store.set(votedKey(c.id), JSON.stringify(ids));
      voteStatus("Vote counted soon. Thanks!", "ok");
    } else if (result.status === 409) {
      store.set(votedKey(c.id), JSON.stringify(ids));
      voteStatus("You already voted in this poll.", "error");
    } else if (result.status === 410) {
      c.poll.closed = true;
      renderPoll(c);
      voteStatus("This poll is closed; your vote was not counted.", "error");
      return;
    } else {
      voteStatus(errorText(result), "error");
    }
    renderVoting(c);
  }

  async function closePoll() {
    const c = current;
    if (!c || !c.poll || isFinal(c)) return;
    if (!window.confirm("Close this poll? Nobody can vote after that.")) return;
    const button = $("close-poll");
    const status = $("close-status");
    button.disabled = true;
    status.textContent = "Closing…";
    try {
      const result = await api("POST", `/polls/${c.id}/close`, undefined, { admin: true });
      if (c.stopped) return;
      if (result.ok && result.data) {
        status.textContent = "Poll closed.";
        c.poll.closed = true;
        setPoll(c, { ...result.data, closed: true }, result.data.seq);
        // setPoll ignores a reply older than what the socket already delivered; the poll is
        // closed all the same.
        renderPoll(c);
        return;
      }
      status.textContent = errorText(result);
      if (result.status === 401) openAdmin();
    } catch {
      status.textContent = "Could not reach the server; the poll is still open.";
    }
    button.disabled = isFinal(c);
  }

  // ---- Start ----

  function start() {
    initAdmin();
    $("voter-id").textContent = voterId();
    $("add-option").addEventListener("click", () => addOptionRow()?.querySelector("input").focus());
    $("create-form").addEventListener("submit", submitCreate);
    $("refresh-polls").addEventListener("click", showList);
    $("vote-form").addEventListener("submit", submitVote);
    $("close-poll").addEventListener("click", closePoll);
    $("webhook-secret-dismiss").addEventListener("click", () => {
      $("webhook-secret").textContent = "";
      $("webhook-secret-box").hidden = true;
    });
    window.addEventListener("hashchange", route);
    route();
  }

  start();
})();
