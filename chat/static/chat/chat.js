// The R2D2 web chat: one session at a time over this server's WebSocket protocol
// (published at /asyncapi.yaml). The page keeps a single, resumable session: its frames
// carry the session id and a seq, and after a dropped connection the page resumes it.
"use strict";

(() => {
  const config = JSON.parse(document.getElementById("r2d2-config").textContent);
  const $ = (id) => document.getElementById(id);
  const els = {
    connection: $("connection"), setup: $("setup"), model: $("model"), system: $("system"), start: $("start"),
    sessionBar: $("session-bar"), sessionId: $("session-id"), sessionModel: $("session-model"), end: $("end"),
    notices: $("notices"), log: $("log"), composer: $("composer"), input: $("input"), send: $("send"), stop: $("stop"),
    spend: $("spend"),  // signed in only: today's spend against the principal's limits
    running: $("running"), runningList: $("running-list"), runningRefresh: $("running-refresh"),
  };
  const END_REASONS = {
    operator: "An operator ended this session.",
    orphaned: "The server that held this session went away.",
    disconnect: "The connection closed.",
    client: "Session ended.",
    abandoned: "This session was not resumed in time.",
    resumed_elsewhere: "This session was resumed in another window.",
  };

  const state = {
    ws: null, connected: false, everConnected: false, retryDelay: 1000, retryTimer: null, lostSession: false,
    starting: false, sessionId: null, pendingSystem: null, signedOut: false,
    // Sessions are resumable: after a drop the page resumes with the token and the last seq it has.
    resumeToken: null, lastSeq: 0, resuming: false,
    // `/?continue=<id>`: the first session started here carries on that conversation (the server remembers it).
    continueFrom: config.continueFrom || null,
    reply: null, replyText: "", renderQueued: false, generating: false, stopRequested: false,
    // Messages sent whose processing_start has not arrived: perhaps never received if the socket dropped,
    // so each is sent again, with the same client_message_id, after a resume (the server answers it once).
    unstarted: [],
    // Following a session another tab or device holds (chatbot_session_watch): its frames stream here too,
    // and this page may post into it and stop it.
    watching: false,
    // The session's messages as a tree (the "history" frame): the log shows its current branch, each message
    // with ↻ (a reply: regenerate), ✎ (a message: edit in place) and ‹ 2/3 › (move between its versions).
    tree: null, branchEl: null,
  };
  const SAVED = "r2d2-session";  // sessionStorage: a reload resumes the session and rebuilds it from its history

  // Connection -----------------------------------------------------------------

  function connect() {
    clearTimeout(state.retryTimer);
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const ws = new WebSocket(`${scheme}://${location.host}/`);
    state.ws = ws;
    setConnection("wait", "Connecting…");
    ws.addEventListener("open", () => {
      state.connected = true;
      state.retryDelay = 1000;
      setConnection("ok", "Connected");
      if (state.sessionId && state.watching) {
        send({ action: "chatbot_session_watch", session_id: state.sessionId });  // a fresh snapshot
      } else if (state.sessionId && state.resumeToken) {
        state.resuming = true;
        send({ action: "chatbot_session_resume", session_id: state.sessionId, resume_token: state.resumeToken, last_seq: state.lastSeq });
      } else if (state.everConnected) {
        notice("info", state.lostSession ? "Reconnected. Start a new session to carry on." : "Reconnected.", "connection");
      } else {
        clearNotice("connection");
      }
      state.lostSession = false;
      state.everConnected = true;
      send({ action: "chatbot_models" });  // fills the model picker (the "models" frame)
      askUsage();
      askRunning();
      render();
    });
    ws.addEventListener("message", (event) => {
      let frame;
      try { frame = JSON.parse(event.data); } catch { return showError("The server sent a frame the page could not read."); }
      handle(frame);
    });
    ws.addEventListener("close", (event) => {
      if (state.ws !== ws) return;
      if (event.code === 4401) {
        // Refused as unauthorized (signed out, key revoked): reconnecting would be refused again.
        state.connected = false;
        state.signedOut = true;
        finishReply();
        endSessionLocally();
        setConnection("bad", "Not signed in");
        notice("warn", "The server no longer accepts this page's sign-in. Reload the page to sign in again.", "connection");
        render();
        return;
      }
      state.connected = false;
      state.starting = false;
      state.resuming = false;
      // A resumable session outlives the socket: the reply in progress carries on after the resume.
      if (!state.resumeToken && !state.watching) {
        if (state.sessionId) state.lostSession = true;  // the server ends a socket's sessions when it closes
        finishReply();
        endSessionLocally();
      }
      const seconds = Math.round(state.retryDelay / 1000);
      setConnection("bad", "Disconnected");
      notice("warn", (state.lostSession ? "The connection dropped, which ended your session. " : "The connection dropped. ")
        + `Reconnecting in ${seconds} s…`, "connection");
      state.retryTimer = setTimeout(connect, state.retryDelay);
      state.retryDelay = Math.min(state.retryDelay * 2, 10000);
      render();
    });
  }

  function send(frame) {
    if (!state.connected) return showError("Not connected to the server; wait for it to reconnect.");
    state.ws.send(JSON.stringify(frame));
  }

  // Frames from the server -----------------------------------------------------

  function handle(frame) {
    const data = frame.data;
    if (frame.seq !== undefined) {
      // A resumed session replays from the last seq this page had: skip anything older, or another session's.
      if (frame.session_id !== state.sessionId || frame.seq <= state.lastSeq) return;
      state.lastSeq = frame.seq;
      save();
    }
    switch (frame.type) {
      case "session_resumed":
        state.resuming = false;
        notice("info", "Reconnected.", "connection");
        // A resend the server already has is refused (duplicate_message) and its frames come by replay or live.
        for (const post of state.unstarted) send(post);
        askHistory();  // after a reload, the conversation is rebuilt from it
        break;
      case "session_start":
        state.starting = false;
        state.sessionId = data.session_id;
        state.resumeToken = data.resume_token || null;
        state.lastSeq = 0;
        state.pendingSystem = els.system.value.trim() || null;
        els.sessionId.textContent = data.session_id;
        els.sessionModel.textContent = els.model.value.trim() || config.defaultModel;
        els.log.replaceChildren();
        clearNotice("connection");
        if (state.continuing) showEarlier(state.continuing);
        state.continuing = null;
        note(state.pendingSystem ? `Session started. System message: “${state.pendingSystem}”` : "Session started. Say hello.");
        newBranch();
        save();
        els.input.focus();
        break;
      case "processing_start":
        // Answered in order: the oldest message sent is being answered; none: another tab or device sent it.
        if (!state.unstarted.shift()) bubble("user", "(sent from another tab or device)").classList.add("earlier");
        state.generating = true;
        state.stopRequested = false;
        startReply();
        state.reply.classList.add("pending");
        break;
      case "message_delta":
        if (!state.reply) startReply();
        state.replyText += data;
        state.reply.classList.remove("pending");
        queueReplyRender();
        break;
      case "message":
        if (!state.reply) startReply();
        state.replyText = data;
        state.reply.classList.remove("pending");
        renderReply();
        break;
      case "processing_end":
        finishReply();
        askUsage();
        askHistory();
        break;
      case "history":
        if (data.session_id === state.sessionId) {
          state.tree = data;
          renderBranch();
        }
        break;
      case "branch_switched":
        askHistory();
        break;
      case "error":
        state.starting = false;
        if (state.resuming) {
          // The session could not be resumed (ended, expired, or its frames are gone): its transcript is kept.
          state.resuming = false;
          state.lostSession = true;
          finishReply();
          endSessionLocally();
          notice("info", "Reconnected. Start a new session to carry on.", "connection");
          break;
        }
        // The answer to a resend after a resume (every message gets a fresh id, so only a resend repeats
        // one): the original is on the server and its frames arrive as usual, maybe already have. Nothing to show.
        if (data.code === "duplicate_message") break;
        if (frame.seq === undefined && state.unstarted.length) {
          if (data.code === "server_draining") {
            // Refused only because the server is restarting: sent again once the page has resumed.
            notice("info", "The server is restarting; your message will be sent again when the page reconnects.", "connection");
            break;
          }
          if (data.code !== "nothing_to_cancel") state.unstarted.pop();  // refused: not sent again
        }
        // A refused message (rate limit, full queue...) gets this one frame and no processing_end.
        if (state.generating && !state.reply) state.generating = false;
        showError(data.message, data.code);
        break;
      case "models":
        fillModels(data);
        break;
      case "sessions":
        showRunning(data);
        break;
      case "session_watching":
        followed(data);  // a second one (the watch started over: frames were lost) replaces what was shown
        break;
      case "session_unwatched":
        // The watch could not go on (its error came just before): this tab no longer follows the session.
        finishReply();
        endSessionLocally();
        askRunning();
        note("No longer following this conversation.");
        break;
      case "usage":
        showSpend(data);
        break;
      case "session_end":
        finishReply();
        endSessionLocally();
        askRunning();
        note(data && data.reason ? (END_REASONS[data.reason] || `Session ended (${data.reason}).`) : "Session ended.");
        if (data && data.reason) notice("warn", END_REASONS[data.reason] || "The server ended this session.", "session");
        break;
      default:
        break;
    }
    render();
  }

  function startReply() {
    state.reply = bubble("assistant", "");
    state.replyText = "";
    // Screen readers read the reply once it is whole, not every few words of it.
    els.log.setAttribute("aria-busy", "true");
  }

  // Deltas arrive one per model chunk, often many per frame: render at most once per frame.
  function queueReplyRender() {
    if (state.renderQueued) return;
    state.renderQueued = true;
    requestAnimationFrame(() => {
      state.renderQueued = false;
      renderReply();
    });
  }

  function renderReply() {
    if (!state.reply) return;
    const follow = nearBottom();
    R2D2Markdown.render(state.reply.querySelector(".text"), state.replyText);
    if (follow) scrollDown();
  }

  function finishReply() {
    const reply = state.reply;
    if (reply) {
      renderReply();  // whatever arrived since the last frame
      reply.classList.remove("pending");
      if (state.stopRequested) {
        reply.classList.add("stopped");
        const text = reply.querySelector(".text");
        if (!state.replyText.trim()) text.textContent = "(stopped before any reply)";
        reply.querySelector(".meta").textContent = "R2D2 · stopped";
      } else if (!state.replyText.trim()) {
        reply.remove();
      }
    }
    els.log.removeAttribute("aria-busy");
    state.reply = null;
    state.replyText = "";
    state.generating = false;
    state.stopRequested = false;
  }

  // The server's models, each labelled with who answers it. A <select> (the server has an
  // allow-list) keeps the person's choice if it is still offered; a free-text field only
  // gets suggestions.
  function fillModels(models) {
    const options = models.map((m) => {
      const option = new Option(m.id, m.id);
      option.label = els.model.tagName === "SELECT" ? m.id : `${m.id} (${m.provider})`;
      option.title = m.provider;
      return option;
    });
    if (els.model.tagName === "SELECT") {
      const chosen = els.model.value;
      els.model.replaceChildren(...options);
      if (models.some((m) => m.id === chosen)) els.model.value = chosen;
    } else {
      const list = els.model.list;
      if (list) list.replaceChildren(...options);
    }
  }

  // Today's spend against the signed-in principal's limits (the "usage" frame), after each turn.
  function askUsage() {
    if (els.spend && state.connected) send({ action: "chatbot_usage" });
  }

  function showSpend(usage) {
    if (!els.spend) return;
    const dollars = (n) => `$${n.toFixed(n < 1 ? 4 : 2)}`;
    const amount = (figure, show, unit) => (figure.limit === null ? `${show(figure.used)}${unit}`
      : `${show(figure.used)} of ${show(figure.limit)}${unit}`);
    const usd = usage.usd_today, tokens = usage.tokens_today;
    els.spend.textContent = `Today: ${amount(usd, dollars, "")} · ${amount(tokens, (n) => n.toLocaleString("en"), " tokens")}`;
    const month = usage.usd_this_month;
    const near = [usd, month].some((f) => f.limit !== null && f.used >= 0.8 * f.limit);
    els.spend.classList.toggle("near", near);
    els.spend.title = near ? "Past 80% of a spending limit" : "What you spent today, against your limits";
    els.spend.hidden = false;
  }

  // What of this person's is running (chatbot_sessions): sessions another tab or device holds, each to follow.
  function askRunning() {
    if (els.running && state.connected && !state.sessionId) send({ action: "chatbot_sessions" });
  }

  function showRunning(sessions) {
    if (!els.running) return;
    const items = sessions.map((s) => {
      const item = document.createElement("li");
      const follow = document.createElement("button");
      follow.type = "button";
      follow.className = "ghost follow";
      follow.textContent = "Follow";
      follow.dataset.sessionId = s.session_id;
      follow.addEventListener("click", () => {
        state.starting = true;
        send({ action: "chatbot_session_watch", session_id: s.session_id });
        render();
      });
      const label = document.createElement("span");
      label.textContent = `${s.model} · started ${new Date(s.started_at).toLocaleTimeString()}`
        + (s.answering ? " · answering now" : "") + (s.watchers ? ` · ${s.watchers} following` : "");
      item.append(label, " ", follow);
      return item;
    });
    els.runningList.replaceChildren(...items);
    els.running.hidden = items.length === 0;
  }

  // The answer to chatbot_session_watch: the conversation so far, then its frames arrive as the holder's do.
  function followed(data) {
    state.starting = false;
    finishReply();
    state.sessionId = data.session_id;
    state.watching = true;
    state.resumeToken = null;
    state.lastSeq = 0;
    els.sessionId.textContent = data.session_id;
    els.sessionModel.textContent = "following";
    els.log.replaceChildren();
    for (const m of data.messages) {
      const item = bubble(m.role, m.role === "assistant" ? "" : m.content);
      if (m.role === "assistant") R2D2Markdown.render(item.querySelector(".text"), m.content);
    }
    note("Following this conversation from another tab or device: its replies stream here, and you may type.");
    if (data.partial !== null) {
      state.generating = true;
      startReply();
      state.replyText = data.partial;
      renderReply();
    }
  }

  function endSessionLocally() {
    state.watching = false;
    sessionStorage.removeItem(SAVED);
    state.tree = null;
    state.sessionId = null;
    state.pendingSystem = null;
    state.resumeToken = null;
    state.lastSeq = 0;
    state.unstarted = [];
  }

  function save() {
    if (state.sessionId && state.resumeToken) {
      const saved = { sessionId: state.sessionId, resumeToken: state.resumeToken, lastSeq: state.lastSeq,
        model: els.sessionModel.textContent };
      sessionStorage.setItem(SAVED, JSON.stringify(saved));
    }
  }

  function restore() {
    let saved = null;
    try { saved = JSON.parse(sessionStorage.getItem(SAVED) || "null"); } catch { saved = null; }
    if (!saved || !saved.sessionId || !saved.resumeToken) return;
    state.sessionId = saved.sessionId;
    state.resumeToken = saved.resumeToken;
    state.lastSeq = saved.lastSeq || 0;
    els.sessionId.textContent = saved.sessionId;
    els.sessionModel.textContent = saved.model || config.defaultModel;
    newBranch();
  }

  // Branches (regenerate, edit, versions) -------------------------------------------

  function newBranch() {
    state.branchEl = document.createElement("div");
    state.branchEl.id = "branch";
    els.log.append(state.branchEl);
  }

  function askHistory() {
    if (state.sessionId && state.connected) send({ action: "chatbot_history", session_id: state.sessionId });
  }

  // A turn asked for by a control: sent like a post (kept until it starts, resent after a resume). What it
  // replaces (`from` on: the reply regenerated, or what followed the message edited) leaves the branch shown.
  function turn(frame, from) {
    if (!state.sessionId || state.generating) return;
    while (from) {
      const next = from.nextElementSibling;
      from.remove();
      from = next;
    }
    Object.assign(frame, { session_id: state.sessionId, stream: true, client_message_id: newMessageId() });
    send(frame);
    state.unstarted.push(frame);
    state.generating = true;
    render();
  }

  function renderBranch() {
    const tree = state.tree;
    if (!tree || !state.branchEl) return;
    const byId = new Map(tree.messages.map((m) => [m.id, m]));
    const path = [];
    for (let m = byId.get(tree.leaf_id); m; m = byId.get(m.parent_id)) path.unshift(m);
    // The bubbles of the turn just shown live become the end of the branch as they are (a reply is not rendered
    // twice); anything else is replaced by the branch as the server has it.
    let lives = [...els.log.querySelectorAll(".msg.live")];
    const tail = path.slice(path.length - lives.length);
    if (!lives.length || tail.length !== lives.length || tail.some((m, i) => !lives[i].classList.contains(`msg-${m.role}`))) {
      for (const live of lives) live.remove();
      lives = [];
    }
    state.branchEl.replaceChildren();
    path.forEach((m, at) => {
      const live = at >= path.length - lives.length ? lives[at - (path.length - lives.length)] : null;
      let item = live;
      if (live) {
        live.classList.remove("live");
        state.branchEl.append(live);
      } else {
        item = bubble(m.role, m.role === "assistant" ? "" : m.content, state.branchEl);
        if (m.role === "assistant") R2D2Markdown.render(item.querySelector(".text"), m.content);
      }
      item.dataset.id = m.id;
      if (!live && m.role === "assistant" && !m.content) item.querySelector(".text").textContent = `(no reply: ${m.status})`;
      if (m.role === "assistant" && (m.status === "cancelled" || m.status === "interrupted")) {
        item.classList.add("stopped");
        item.querySelector(".meta").textContent = `R2D2 · ${m.status === "cancelled" ? "stopped" : "interrupted"}`;
      }
      const controls = document.createElement("div");
      controls.className = "controls";
      const versions = tree.messages.filter((o) => o.parent_id === m.parent_id && o.role === m.role && o.status !== "accepted");
      if (versions.length > 1) {
        const at = versions.findIndex((o) => o.id === m.id);
        const move = (to, label, name) => control(label, name, to === undefined, () => {
          send({ action: "chatbot_switch_branch", session_id: state.sessionId, message_id: to.id });
        });
        const count = document.createElement("span");
        count.className = "version";
        count.textContent = `${at + 1}/${versions.length}`;
        controls.append(move(versions[at - 1], "‹", "Previous version"), count, move(versions[at + 1], "›", "Next version"));
      }
      if (m.role === "assistant") {
        controls.append(control("↻", "Regenerate this reply", false, () => turn({ action: "chatbot_regenerate", message_id: m.id }, item)));
      } else {
        controls.append(control("✎", "Edit this message", false, () => edit(item, m)));
      }
      item.after(controls);  // beside the message, not in it: a reply's own content has no buttons
    });
    scrollDown();
  }

  function control(label, title, disabled, onClick) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "control";
    button.textContent = label;
    button.title = title;
    button.setAttribute("aria-label", title);
    button.disabled = disabled;
    button.addEventListener("click", () => { if (!state.generating) onClick(); });
    return button;
  }

  // ✎: the message becomes a text box where it stands; Enter (or Send) sends the new version, Esc keeps the old.
  function edit(item, m) {
    if (state.generating || item.querySelector("textarea")) return;
    const text = item.querySelector(".text");
    const box = document.createElement("textarea");
    box.className = "edit";
    box.value = m.content;
    text.replaceWith(box);
    box.focus();
    box.addEventListener("keydown", (event) => {
      if (event.key === "Escape") {
        event.stopPropagation();
        box.replaceWith(text);
      } else if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        if (!box.value.trim()) return;
        text.textContent = box.value;
        box.replaceWith(text);
        turn({ action: "chatbot_edit_message", message_id: m.id, user_message: text.textContent }, item.nextElementSibling);  // its controls on
      }
    });
  }

  // Actions --------------------------------------------------------------------

  els.start.addEventListener("click", () => {
    const model = els.model.value.trim();
    state.starting = true;
    clearNotice("session");
    const frame = model ? { action: "chatbot_session_start", gpt_model: model, resumable: true }
      : { action: "chatbot_session_start", resumable: true };
    if (state.continueFrom) {
      frame.continue_session_id = state.continueFrom.sessionId;
      state.continuing = state.continueFrom;
      state.continueFrom = null;  // later sessions on this page start afresh
      const hint = document.getElementById("continuing");
      if (hint) hint.remove();
    }
    send(frame);
    render();
  });

  els.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = els.input.value;
    if (!text.trim() || !state.sessionId || state.generating) return;
    const frame = {
      action: "chatbot_post_message", session_id: state.sessionId, user_message: text, stream: true,
      client_message_id: newMessageId(),
    };
    if (state.pendingSystem) frame.system_message = state.pendingSystem;
    send(frame);
    state.unstarted.push(frame);
    state.pendingSystem = null;
    bubble("user", text);
    els.input.value = "";
    state.generating = true;  // until processing_end; the server queues nothing from this page
    render();
  });

  els.input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      els.composer.requestSubmit();
    }
  });

  // Esc stops the reply being generated, wherever the focus is (as Ctrl-C does in the terminal client).
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && !els.stop.hidden && !els.stop.disabled) {
      event.preventDefault();
      els.stop.click();
    }
  });

  els.stop.addEventListener("click", () => {
    if (!state.sessionId) return;
    state.stopRequested = true;
    send({ action: "chatbot_cancel", session_id: state.sessionId });
    render();
  });

  if (els.runningRefresh) els.runningRefresh.addEventListener("click", askRunning);

  els.end.addEventListener("click", () => {
    if (state.sessionId) send({ action: "chatbot_session_end", session_id: state.sessionId });
  });

  // A fresh id for each message (its resends repeat it). randomUUID needs a secure context (https or
  // localhost); getRandomValues works on plain http too.
  function newMessageId() {
    if (crypto.randomUUID) return crypto.randomUUID();
    return Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join("");
  }

  // Rendering ------------------------------------------------------------------

  function render() {
    const inSession = Boolean(state.sessionId);
    els.setup.hidden = inSession;
    if (els.running && inSession) els.running.hidden = true;
    els.sessionBar.hidden = !inSession;
    els.start.disabled = !state.connected || state.starting || state.signedOut;
    els.start.textContent = state.starting ? "Starting…" : "Start session";
    els.input.disabled = !inSession;
    els.input.placeholder = inSession ? "Message R2D2 (Enter to send, Shift+Enter for a new line)" : "Start a session to chat";
    els.send.disabled = !inSession || state.generating || !state.connected;
    els.stop.hidden = !(inSession && state.generating);
    els.stop.disabled = state.stopRequested;
    els.end.disabled = !state.connected;
  }

  function setConnection(kind, text) {
    els.connection.className = `pill pill-${kind}`;
    els.connection.textContent = text;
  }

  function bubble(role, text, into) {
    const item = document.createElement("article");
    item.className = `msg msg-${role}`;
    const meta = document.createElement("div");
    meta.className = "meta";
    meta.textContent = role === "user" ? "You" : "R2D2";
    const body = document.createElement("div");
    // Replies are Markdown (rendered by R2D2Markdown); what the person typed stays plain text.
    body.className = role === "assistant" ? "text md" : "text";
    body.textContent = text;
    item.append(meta, body);
    if (into) {
      into.append(item);
    } else {
      item.classList.add("live");  // shown as it happens; the branch from the server replaces it
      els.log.append(item);
    }
    scrollDown();
    return item;
  }

  // The continued conversation's turns, shown as they were (the server gives the model the same).
  function showEarlier(earlier) {
    for (const m of earlier.messages) {
      const item = bubble(m.role, m.role === "assistant" ? "" : m.content, els.log);
      item.classList.add("earlier");
      if (m.role === "assistant") R2D2Markdown.render(item.querySelector(".text"), m.content);
    }
    note("Continuing this conversation: R2D2 remembers the messages above.");
  }

  function note(text) {
    const item = document.createElement("p");
    item.className = "note";
    item.textContent = text;
    els.log.append(item);
    scrollDown();
  }

  function showError(message, code) {
    const item = document.createElement("div");
    item.className = "msg msg-error";
    item.setAttribute("role", "alert");
    const meta = document.createElement("div");
    meta.className = "meta";
    meta.textContent = code ? `Error · ${code}` : "Error";
    const body = document.createElement("div");
    body.className = "text";
    body.textContent = message;
    item.append(meta, body);
    els.log.append(item);
    scrollDown();
  }

  function notice(kind, text, key) {
    let item = key && els.notices.querySelector(`[data-key="${key}"]`);
    if (!item) {
      item = document.createElement("div");
      if (key) item.dataset.key = key;
      els.notices.append(item);
    }
    item.className = `notice notice-${kind}`;
    item.textContent = text;
  }

  function clearNotice(key) {
    const item = els.notices.querySelector(`[data-key="${key}"]`);
    if (item) item.remove();
  }

  function scrollDown() {
    window.scrollTo(0, document.body.scrollHeight);
  }

  // Follow a streaming reply only if the person is already at the end: someone who
  // scrolled up to reread keeps their place.
  function nearBottom() {
    return window.innerHeight + window.scrollY >= document.body.scrollHeight - 120;
  }

  if (state.continueFrom && els.model.tagName === "INPUT") els.model.value = state.continueFrom.model;
  restore();
  R2D2Markdown.enableCopyButtons(els.log);
  render();
  connect();
})();
