// The local page: asks /ui/state every two seconds and redraws. Hand-written, no build step, nothing from the
// internet. Every value from the gateway goes into the page as text (textContent), never as HTML.
(function () {
  "use strict";
  var boot = JSON.parse(document.getElementById("boot").textContent);
  var T = boot.text;
  var app = document.getElementById("app");
  var state = null;
  var family = "all";
  var online = true;
  var drain = null;
  var lastDelivered = null;
  var sections = {};
  var POLL_MS = 2000;

  function el(tag, attrs) {
    var node = document.createElement(tag);
    if (attrs) {
      Object.keys(attrs).forEach(function (key) {
        var value = attrs[key];
        if (value === null || value === undefined || value === false) return;
        if (key === "text") node.textContent = String(value);
        else if (key.slice(0, 2) === "on") node.addEventListener(key.slice(2), value);
        else node.setAttribute(key, value === true ? "" : String(value));
      });
    }
    for (var i = 2; i < arguments.length; i++) {
      var child = arguments[i];
      if (child === null || child === undefined) continue;
      if (Array.isArray(child)) child.forEach(function (c) { if (c) node.appendChild(c); });
      else node.appendChild(typeof child === "string" ? document.createTextNode(child) : child);
    }
    return node;
  }

  function section(id, title) {
    if (!sections[id]) {
      var body = el("div", { class: "body" });
      var box = el("section", { id: id, class: "card" }, el("h2", { text: title }), body);
      app.appendChild(box);
      sections[id] = body;
    }
    return sections[id];
  }

  function replace(body, nodes) {
    while (body.firstChild) body.removeChild(body.firstChild);
    nodes.forEach(function (n) { if (n) body.appendChild(n); });
  }

  function ago(iso) {
    if (!iso) return "–";
    var s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
    if (s < 90) return Math.round(s) + " s";
    if (s < 5400) return Math.round(s / 60) + " min";
    if (s < 172800) return Math.round(s / 3600) + " h";
    return Math.round(s / 86400) + " d";
  }

  function duration(s) {
    if (s === null || s === undefined) return "–";
    if (s < 120) return Math.round(s) + " s";
    if (s < 7200) return Math.round(s / 60) + " min";
    if (s < 172800) return (s / 3600).toFixed(1) + " h";
    return (s / 86400).toFixed(1) + " d";
  }

  function table(headers, rows, rowAttrs) {
    return el("div", { class: "scroll" }, el("table", null,
      el("thead", null, el("tr", null, headers.map(function (h) { return el("th", { text: h }); }))),
      el("tbody", null, rows.map(function (cells, i) {
        return el("tr", rowAttrs ? rowAttrs(i) : null, cells.map(function (c) {
          return c instanceof Node ? el("td", null, c) : el("td", { text: c === null || c === undefined ? "–" : c });
        }));
      }))));
  }

  function post(url, body) {
    return fetch(url, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": boot.csrf },
      body: JSON.stringify(body || {})
    });
  }

  // --- sections ---------------------------------------------------------------------------------------------

  function renderIdentity() {
    var id = state.identity;
    var body = section("identity", T.gateway);
    replace(body, [el("dl", { class: "facts" },
      el("dt", { text: T.store }), el("dd", { id: "store", text: (id.store_name || "") + " (" + id.store_id + ")" }),
      el("dt", { text: T.gateway }), el("dd", { text: id.gateway_id }),
      el("dt", { text: T.version }), el("dd", { text: id.version }),
      el("dt", { text: T.uptime }), el("dd", { text: duration(id.uptime_s) }),
      el("dt", { text: T.clock }), el("dd", { class: id.clock_synced ? "ok" : "warn", text: id.clock_synced ? T.synced : T.not_synced }),
      el("dt", { text: T.health }), el("dd", { class: id.status === "ok" ? "ok" : "bad", text: id.status + (id.reason ? " (" + id.reason + ")" : "") }),
      el("dt", { text: T.you }), el("dd", null, boot.me.name + " (" + boot.me.role + ") ",
        el("button", { type: "button", class: "link", id: "logout", onclick: logout, text: T.log_out }))
    )]);
  }

  function renderAlerts() {
    var body = section("alerts", T.alerts);
    var drafts = {};
    var focused = document.activeElement && document.activeElement.dataset ? document.activeElement.dataset.alert : null;
    body.querySelectorAll("textarea[data-alert]").forEach(function (t) { drafts[t.dataset.alert] = t.value; });
    var alerts = state.alerts.slice().sort(function (a, b) { return (a.acknowledged ? 1 : 0) - (b.acknowledged ? 1 : 0); });
    var cards = alerts.map(function (a) {
      var evidence = a.details ? JSON.stringify(a.details) : "";
      var ack = a.acknowledged;
      var form = null;
      if (!ack && state.me.may_ack) {
        var note = el("textarea", { "data-alert": a.alert_id, maxlength: 1000, rows: 2, placeholder: T.note, "aria-label": T.note });
        if (drafts[a.alert_id]) note.value = drafts[a.alert_id];
        var message = el("span", { class: "result" });
        form = el("form", { class: "ack", onsubmit: function (ev) {
          ev.preventDefault();
          var path = a.alert_id.split("/").map(encodeURIComponent).join("/");
          post("/ui/alerts/" + path + "/ack", { note: note.value }).then(function (r) {
            message.textContent = r.ok ? T.saved : (r.status === 403 ? T.not_allowed : "HTTP " + r.status);
            if (r.ok) { note.value = ""; poll(); }
          });
        } }, note, el("button", { type: "submit", text: T.acknowledge }), message);
      }
      return el("article", { class: "alert " + (a.severity || "warning") + (ack ? " acked" : ""), "data-alert-id": a.alert_id },
        el("h3", { text: a.message || a.alert_id }),
        el("p", { class: "meta", text: a.alert_id + " · " + (a.severity || "") + (a.recovering ? " · " + T.recovering : "") }),
        evidence ? el("details", null, el("summary", { text: "evidence" }), el("pre", { text: evidence })) : null,
        ack ? el("p", { class: "ackd", text: T.acknowledged_by + ": " + (ack.by ? ack.by + " (" + ack.role + ")" : ack.role || "") + (ack.note ? " — " + ack.note : "") }) : null,
        form);
    });
    var history = table([T.when, T.what, T.status], state.history.map(function (h) {
      return [ago(h.recorded_at), (h.data && (h.data.message || h.data.alert_id)) || "", h.kind.replace("alert.", "")];
    }));
    replace(body, [cards.length ? el("div", { class: "alerts" }, cards) : el("p", { class: "quiet", text: T.no_alerts }),
      el("details", { class: "history" }, el("summary", { text: T.history }), history)]);
    if (focused) {
      var again = body.querySelector('textarea[data-alert="' + CSS.escape(focused) + '"]');
      if (again) again.focus();
    }
  }

  function renderColdChain() {
    var body = section("coldchain", T.cold_chain);
    if (!state.coldchain.length) { replace(body, [el("p", { class: "quiet", text: T.no_fridges })]); return; }
    var ns = "http://www.w3.org/2000/svg";
    replace(body, [el("div", { class: "fridges" }, state.coldchain.map(function (f) {
      var svg = document.createElementNS(ns, "svg");
      svg.setAttribute("viewBox", "0 0 120 32");
      svg.setAttribute("class", "spark");
      if (f.spark.limit_y !== null) {
        var line = document.createElementNS(ns, "line");
        [["x1", 0], ["x2", 120], ["y1", f.spark.limit_y], ["y2", f.spark.limit_y], ["class", "limit"]].forEach(function (p) { line.setAttribute(p[0], p[1]); });
        svg.appendChild(line);
      }
      var path = document.createElementNS(ns, "path");
      path.setAttribute("d", f.spark.path);
      svg.appendChild(path);
      var warm = f.limit_c !== null && f.last_c > f.limit_c;
      return el("div", { class: "fridge" + (warm ? " warm" : "") },
        el("strong", { text: f.device_id }),
        el("span", { class: "temp", text: (typeof f.last_c === "number" ? f.last_c.toFixed(1) : "–") + " °C" }),
        el("span", { class: "meta", text: (f.limit_c !== null ? T.limit + " " + f.limit_c + " °C" : "") }),
        svg,
        el("span", { class: "flags", text: [f.defrost ? T.defrost : null, f.door_open ? T.door_open : null].filter(Boolean).join(" · ") }));
    }))]);
  }

  function renderDevices() {
    var body = section("devices", T.devices);
    var families = {};
    state.devices.forEach(function (d) { families[d.profile || d.driver] = true; });
    var select = el("select", { id: "family", "aria-label": T.family, onchange: function (ev) { family = ev.target.value; renderDevices(); } },
      ["all"].concat(Object.keys(families).sort()).map(function (f) {
        return el("option", { value: f, selected: f === family, text: f === "all" ? T.all : f });
      }));
    var shown = state.devices.filter(function (d) { return family === "all" || (d.profile || d.driver) === family; });
    var rows = shown.map(function (d) {
      var link = el("button", { type: "button", class: "link device", "data-device": d.device_id, text: d.device_id, onclick: function () { readings(d.device_id); } });
      return [link, d.profile || d.driver, el("span", { class: "status " + d.status, text: d.status }), ago(d.last_seen), d.messages, d.errors, d.quarantined, d.rate_limited, d.last_error || d.reason || ""];
    });
    replace(body, [el("label", null, T.family + " ", select),
      table(["id", T.family, T.status, T.last_seen, T.messages, T.errors, T.quarantined, T.rate_limited, T.last_error], rows),
      el("div", { id: "readings" })]);
  }

  function readings(device) {
    fetch("/api/events?device_id=" + encodeURIComponent(device) + "&limit=10", { credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.json() : r.status; })
      .then(function (events) {
        var box = document.getElementById("readings");
        var shown = Array.isArray(events)
          ? table([T.when, "kind", "data"], events.map(function (e) { return [ago(e.recorded_at), e.kind, JSON.stringify(e.data)]; }))
          : el("p", { class: "quiet", text: events === 403 ? T.not_allowed : "HTTP " + events });
        replace(box, [el("h3", { text: T.readings + ": " + device }), shown,
          el("button", { type: "button", class: "link", text: T.close, onclick: function () { replace(box, []); } })]);
      });
  }

  function renderStock() {
    var body = section("stock", T.stock);
    var low = state.stock.low.map(function (s) { return [s.sku, s.on_hand, s.safety_stock]; });
    var drafts = state.stock.drafts.map(function (d) { return [d.sku, d.quantity || d.qty || "", d.draft_id || d.id || ""]; });
    replace(body, [el("h3", { text: T.low_stock }), low.length ? table(["SKU", "on hand", "safety"], low) : el("p", { class: "quiet", text: T.none }),
      el("h3", { text: T.drafts }), drafts.length ? table(["SKU", "qty", "draft"], drafts) : el("p", { class: "quiet", text: T.none })]);
  }

  function renderHq() {
    var hq = state.hq;
    var body = section("hq", T.hq);
    if (lastDelivered !== null && hq.delivered_seq !== null) {
      var rate = (hq.delivered_seq - lastDelivered.seq) / Math.max(0.5, (Date.now() - lastDelivered.at) / 1000);
      drain = drain === null ? rate : drain * 0.7 + rate * 0.3;
    }
    lastDelivered = { seq: hq.delivered_seq, at: Date.now() };
    var classes = Object.keys(hq.outbox || {}).map(function (name) {
      var c = hq.outbox[name];
      return [name, c.pending, c.oldest_age_s !== undefined ? duration(c.oldest_age_s) : "–", c.evicted];
    });
    replace(body, [el("p", null, el("span", { class: hq.connected ? "ok" : "bad", id: "hq-state", text: hq.connected ? T.connected : T.disconnected }),
        " · " + T.delivered_up_to + " " + hq.delivered_seq + " " + T.of + " " + hq.last_seq
        + (drain !== null ? " · " + T.drain + " " + drain.toFixed(1) + " " + T.per_s : "")),
      table(["class", T.backlog, T.oldest, T.evicted], classes)]);
  }

  function renderQuarantine() {
    var body = section("quarantine", T.quarantine);
    replace(body, [state.quarantine.length ? table([T.when, "driver", "device", T.reason, "payload"], state.quarantine.map(function (q) {
      return [q.received_at, q.driver, q.device_id, q.reason + (q.detail ? ": " + q.detail : ""), q.payload];
    })) : el("p", { class: "quiet", text: T.none })]);
  }

  function renderAudit() {
    var body = section("audit", T.audit);
    replace(body, [state.audit.length ? table([T.when, T.who, T.what, "note"], state.audit.map(function (a) {
      return [a.at, a.who + " (" + a.role + ", " + a.via + ")", a.what, a.note];
    })) : el("p", { class: "quiet", text: T.none })]);
  }

  function renderDownloads() {
    if (sections.downloads) return;  // drawn once: the technician's choices stay
    var body = section("downloads", T.downloads);
    var today = new Date(Date.now() - new Date().getTimezoneOffset() * 60000).toISOString().slice(0, 10);
    var day = el("input", { type: "date", id: "day", value: today, "aria-label": T.day });
    var fridge = el("select", { id: "fridge", "aria-label": T.fridge });
    var haccp = el("a", { id: "haccp-link", text: T.haccp_csv });
    var attendance = el("a", { id: "attendance-link", text: T.attendance_csv });
    function links() {
      haccp.href = "/api/haccp?device=" + encodeURIComponent(fridge.value) + "&date=" + day.value + "&format=csv";
      attendance.href = "/api/attendance.csv?date=" + day.value;
    }
    day.addEventListener("change", links);
    fridge.addEventListener("change", links);
    body.appendChild(el("div", { class: "row" }, el("label", null, T.day + " ", day), el("label", null, T.fridge + " ", fridge)));
    var manager = boot.me.role === "manager" || boot.me.role === "admin";  // staff names: managers up
    body.appendChild(el("p", null, haccp, manager ? " · " : null, manager ? attendance : null));
    sections.fridgeSelect = fridge;
    sections.links = links;
  }

  function refreshFridges() {
    var select = sections.fridgeSelect;
    var names = state.coldchain.map(function (f) { return f.device_id; });
    var current = Array.prototype.map.call(select.options, function (o) { return o.value; });
    if (names.join() !== current.join()) {
      var chosen = select.value;
      replace(select, names.map(function (n) { return el("option", { value: n, selected: n === chosen, text: n }); }));
    }
    sections.links();
  }

  function renderConfig() {
    if (boot.me.role !== "admin" || sections.config) return;
    var body = section("config", T.config);
    var out = el("pre", { id: "config-report" });
    body.appendChild(el("button", { type: "button", text: T.check_config, onclick: function () {
      fetch("/ui/config", { credentials: "same-origin" }).then(function (r) { return r.json(); })
        .then(function (j) { out.textContent = j.report || j.detail; out.className = j.ok ? "ok" : "bad"; });
    } }));
    body.appendChild(out);
  }

  function render() {
    var loading = document.getElementById("loading");
    if (loading) loading.remove();
    renderIdentity();
    renderAlerts();
    renderColdChain();
    renderDevices();
    renderHq();
    renderStock();
    renderQuarantine();
    renderAudit();
    renderDownloads();
    refreshFridges();
    renderConfig();
  }

  function setOnline(now) {
    if (now === online) return;
    online = now;
    var banner = document.getElementById("offline");
    if (!now && !banner) document.body.insertBefore(el("div", { id: "offline", role: "status", text: T.reconnecting }), app);
    if (now && banner) banner.remove();
  }

  function logout() {
    post("/ui/logout").then(function () { location.href = "/ui/login"; });
  }

  // One request at a time: a slow answer is waited for, never overtaken by a newer one (nor piled up).
  var asking = false;
  function poll() {
    if (asking) return;
    asking = true;
    // An answer that does not come (a connection dropped with the Wi-Fi) is given up after 10 s: asked again.
    var abort = new AbortController();
    var given = setTimeout(function () { abort.abort(); }, 10000);
    fetch("/ui/state", { credentials: "same-origin", cache: "no-store", signal: abort.signal }).then(function (r) {
      if (r.status === 401) { location.href = "/ui/login"; return null; }
      if (!r.ok) throw new Error("HTTP " + r.status);
      return r.json();
    }).then(function (json) {
      if (json) { state = json; setOnline(true); render(); document.body.dataset.ready = "1"; }
    }).catch(function () { setOnline(false); }).then(function () { clearTimeout(given); asking = false; });
  }
  poll();
  setInterval(poll, POLL_MS);
})();
