/* circuitlab report page: figures, the circuit explorer and sortable tables. Everything it draws is inlined in
   the page (JSON script blocks); it fetches nothing. The page API `window.circuitlab` is what the controls use:
   select(nodeName) pins a node and fills #evidence; setThreshold(fractionOfEdges) moves to the measured point of
   the faithfulness curve at or nearest below that fraction and states its faithfulness in #threshold-faithfulness;
   attention(head, promptIndex) is the pattern the evidence panel draws for that prompt (showAttention draws it);
   colorBy("role" | "carried" | "var:<name>") recolours the heads (a run with --variables; the rule is stated). */
(function () {
  "use strict";
  var PLOT_CONFIG = {responsive: true, displaylogo: false};

  function readJSON(id) {
    var el = document.getElementById(id);
    return el ? JSON.parse(el.textContent) : null;
  }

  function num(v, digits) {
    if (v === null || v === undefined) { return "n/a"; }
    if (typeof v !== "number") { return String(v); }
    var a = Math.abs(v);
    if (a !== 0 && (a < 1e-3 || a >= 1e5)) { return v.toExponential(3); }
    return v.toFixed(digits === undefined ? 4 : digits);
  }

  function esc(s) {
    return String(s).replace(/[&<>"']/g, function (c) {
      return {"&": "&amp;", "<": "&lt;", ">": "&gt;", "\"": "&quot;", "'": "&#39;"}[c];
    });
  }

  // ------------------------------------------------------------------ figures
  function drawFigure(div) {
    if (div.getAttribute("data-drawn")) { return; }
    var fig = readJSON(div.getAttribute("data-figure"));
    Plotly.newPlot(div, fig.data, fig.layout, PLOT_CONFIG);
    div.setAttribute("data-drawn", "1");
  }

  // Each figure is drawn when it comes near the window (the page opens fast); all at once without an observer.
  function drawFigures() {
    var divs = Array.prototype.slice.call(document.querySelectorAll("div.plot[data-figure]"));
    if (!("IntersectionObserver" in window)) { divs.forEach(drawFigure); return; }
    var seen = new IntersectionObserver(function (entries) {
      entries.forEach(function (e) { if (e.isIntersecting) { drawFigure(e.target); seen.unobserve(e.target); } });
    }, {rootMargin: "400px 0px"});
    divs.forEach(function (div) { seen.observe(div); });
  }

  // ------------------------------------------------------------------ tables
  function sortTable(table, col, th) {
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var asc = !th.classList.contains("asc");
    var heads = table.tHead.rows[0].cells;
    for (var i = 0; i < heads.length; i++) { heads[i].classList.remove("asc", "desc"); }
    th.classList.add(asc ? "asc" : "desc");
    rows.sort(function (a, b) {
      var x = a.cells[col], y = b.cells[col];
      var kx = x.getAttribute("data-sort"), ky = y.getAttribute("data-sort");
      var r;
      if (kx !== null && ky !== null) { r = parseFloat(kx) - parseFloat(ky); }
      else if (kx !== null) { r = -1; }
      else if (ky !== null) { r = 1; }
      else { r = x.textContent.localeCompare(y.textContent, undefined, {numeric: true}); }
      return asc ? r : -r;
    });
    rows.forEach(function (row) { body.appendChild(row); });
  }

  function setUpTables() {
    var tables = document.querySelectorAll("table.sortable");
    Array.prototype.forEach.call(tables, function (table) {
      var heads = table.tHead.rows[0].cells;
      Array.prototype.forEach.call(heads, function (th, col) {
        th.addEventListener("click", function () { sortTable(table, col, th); });
      });
      var tools = table.parentNode.previousElementSibling;
      var filter = tools && tools.querySelector("input.filter");
      if (filter) {
        filter.addEventListener("input", function () {
          var q = filter.value.toLowerCase();
          Array.prototype.forEach.call(table.tBodies[0].rows, function (row) {
            row.style.display = row.textContent.toLowerCase().indexOf(q) >= 0 ? "" : "none";
          });
        });
      }
    });
  }

  // ------------------------------------------------------------------ the circuit explorer
  var data = readJSON("explorer-data");
  var byName = {};
  var state = {index: 0, drawn: 0, selected: null, colorBy: data && data.variables.length ? "carried" : "role"};

  // Colour by "role", "carried" (each head in the colour of the variable it carries) or "var:<name>" (the heads
  // carrying that one variable in its colour, other circuit heads grey); MLPs keep their kind colour.
  function nodeColor(n) {
    if (n.kind === "input" || n.kind === "logits") { return "#444444"; }
    if (!n.in_circuit) { return "#d9d9d9"; }
    if (state.colorBy !== "role" && n.kind === "head") {
      if (!measured(n)) { return NOT_MEASURED; }
      var shown = state.colorBy === "carried" || state.colorBy === "var:" + n.carries;
      return data.variable_colors[shown ? n.carries : ""];
    }
    if (n.role && data.role_colors[n.role]) { return data.role_colors[n.role]; }
    return n.kind === "mlp" ? "#fdae6b" : "#6baed6";
  }

  var NOT_MEASURED = "#ffffff";  // a circuit head --variables-heads left out
  function measured(n) { return Object.keys(n.numbers).some(function (k) { return k.indexOf("iia_") === 0; }); }
  function carriesText(n) { return measured(n) ? (n.carries || "none") : "not measured"; }
  function colorBy(mode) {
    var known = ["role"].concat(data.variables.length ? ["carried"] : [],
                                data.variables.map(function (v) { return "var:" + v; }));
    if (known.indexOf(mode) < 0) { throw new Error("circuitlab.colorBy: use one of " + known.join(", ")); }
    state.colorBy = mode;
    var chooser = document.getElementById("color-by");
    if (chooser) { chooser.value = mode; }
    drawCircuit();
    return mode;
  }

  // The colour-by chooser and the stated rule, for a run whose heads were measured for task variables.
  function setUpColorBy() {
    if (!data.variables.length) { return; }
    var swatch = function (color, label) { return "<span class=\"swatch\" style=\"background:" + color + "\"></span>" + esc(label); };
    var box = document.createElement("div");
    box.id = "color-by-box";
    box.innerHTML = "<label for=\"color-by\">Colour heads by </label><select id=\"color-by\">" +
      "<option value=\"role\">role</option><option value=\"carried\">variable carried</option>" +
      data.variables.map(function (v) { return "<option value=\"var:" + esc(v) + "\">variable " + esc(v) + "</option>"; }).join("") +
      "</select> <span class=\"legend\">" + data.variables.concat([""]).map(function (v) {
        return swatch(data.variable_colors[v], v || "none"); }).join(" ") + " " + swatch(NOT_MEASURED, "not measured") + "</span>" +
      "<p id=\"carries-rule\" class=\"stated\">Heads measured for " + data.variables.map(esc).join(", ") + ": " +
      esc(data.carries_rule) + ". No-intervention baselines (held-out IIA): " + data.variables.map(function (v) {
        return esc(v) + " " + num(data.baselines[v], 2);
      }).join(", ") + ".</p>";
    document.querySelector("#explorer .controls").appendChild(box);
    var chooser = document.getElementById("color-by");
    chooser.addEventListener("change", function () { colorBy(chooser.value); });
    chooser.value = state.colorBy;
  }

  function nodeHover(n) {
    var parts = ["<b>" + esc(n.name) + "</b>" + (n.in_circuit ? " (in circuit)" : "")];
    if (n.role) { parts.push("role " + esc(n.role)); }
    if (n.kind === "head" && n.in_circuit && data.variables.length) { parts.push("carries " + esc(carriesText(n))); }
    Object.keys(n.numbers).slice(0, 6).forEach(function (k) { parts.push(esc(k) + " " + esc(num(n.numbers[k]))); });
    return parts.join("<br>");
  }

  function nodeTraces() {
    var effects = data.nodes.map(function (n) {
      var v = n.numbers.exact_effect !== undefined ? n.numbers.exact_effect : n.numbers.score;
      return typeof v === "number" ? Math.abs(v) : 0;
    });
    var top = Math.max.apply(null, effects.concat([1e-12]));
    var trace = {type: "scatter", mode: "markers+text", x: [], y: [], text: [], customdata: [], hovertext: [],
                 hoverinfo: "text", textposition: "top center", textfont: {size: 9}, meta: "nodes",
                 marker: {color: [], size: [], symbol: [], line: {color: "#333", width: []}}, showlegend: false};
    data.nodes.forEach(function (n, i) {
      trace.x.push(n.x); trace.y.push(n.y); trace.customdata.push(n.name); trace.hovertext.push(nodeHover(n));
      trace.text.push(n.in_circuit || n.kind === "input" || n.kind === "logits" ? n.name : "");
      trace.marker.color.push(nodeColor(n));
      trace.marker.size.push(n.kind === "input" || n.kind === "logits" ? 14 :
                             (n.in_circuit ? 9 + 19 * effects[i] / top : 6));
      trace.marker.symbol.push(n.kind === "mlp" ? "square" : (n.kind === "head" ? "circle" : "diamond"));
      trace.marker.line.width.push(n.in_circuit ? 1 : 0);
    });
    return trace;
  }

  function edgeTraces(count) {
    var edges = data.edges.slice(0, count);
    var top = Math.max.apply(null, edges.map(function (e) { return Math.abs(e.score); }).concat([1e-12]));
    var groups = {}, mids = {type: "scatter", mode: "markers", x: [], y: [], hovertext: [], hoverinfo: "text",
                             meta: "edge-hover", marker: {size: 5, color: [], opacity: 0.5}, showlegend: false};
    edges.forEach(function (e) {
      var a = byName[e.sender], b = byName[e.receiver];
      var width = 0.6 + 4.4 * Math.abs(e.score) / top;
      var bin = width < 1.8 ? 1 : (width < 3.2 ? 2.5 : 4.5);
      var key = e.channel + "|" + bin;
      if (!groups[key]) {
        groups[key] = {type: "scatter", mode: "lines", x: [], y: [], hoverinfo: "skip", meta: "edges",
                       name: "channel " + e.channel, legendgroup: e.channel, showlegend: false,
                       line: {color: data.colors[e.channel] || "#555", width: bin}, opacity: 0.55};
      }
      groups[key].x.push(a.x, b.x, null); groups[key].y.push(a.y, b.y, null);
      mids.x.push((a.x + b.x) / 2); mids.y.push((a.y + b.y) / 2);
      mids.marker.color.push(data.colors[e.channel] || "#555");
      mids.hovertext.push(esc(e.edge) + "<br>channel " + esc(e.channel) + "<br>score " + num(e.score));
    });
    var seen = {}, traces = [];
    Object.keys(groups).sort().forEach(function (k) {
      var ch = k.split("|")[0];
      if (!seen[ch]) { groups[k].showlegend = true; seen[ch] = true; }
      traces.push(groups[k]);
    });
    traces.push(mids);
    return traces;
  }

  function layout() {
    var ticks = [-1], labels = ["input"];
    for (var l = 0; l < data.n_layers; l++) { ticks.push(l); labels.push(String(l)); }
    ticks.push(data.n_layers); labels.push("logits");
    var yt = [], yl = [];
    for (var h = 0; h < data.n_heads; h++) { yt.push(h); yl.push("h" + h); }
    yt.push(data.n_heads); yl.push("MLP");
    return {height: Math.max(420, 34 * (data.n_heads + 1) + 140), margin: {l: 50, r: 10, t: 30, b: 40},
            xaxis: {tickvals: ticks, ticktext: labels, title: {text: "layer"}, zeroline: false, showgrid: false},
            yaxis: {tickvals: yt, ticktext: yl, autorange: "reversed", zeroline: false, showgrid: false},
            legend: {orientation: "h", y: 1.06}, hovermode: "closest", template: "plotly_white"};
  }

  function highlightTrace() {
    var n = state.selected && byName[state.selected];
    return {type: "scatter", mode: "markers", x: n ? [n.x] : [], y: n ? [n.y] : [], hoverinfo: "skip",
            meta: "selected", showlegend: false,
            marker: {size: 30, color: "rgba(0,0,0,0)", line: {color: "#000", width: 2.5}}};
  }

  function drawCircuit() {
    var traces = edgeTraces(state.drawn).concat([nodeTraces(), highlightTrace()]);
    var div = document.getElementById("circuit-plot");
    Plotly.react(div, traces, layout(), PLOT_CONFIG);
    div.setAttribute("data-drawn-edges", String(state.drawn));
  }

  function thresholdText(t, asked) {
    var pct = t.percent + "% of edges (" + t.n_edges.toLocaleString("en") + " of " +
              data.total_edges.toLocaleString("en") + ")";
    var drawn = Math.min(t.n_edges, data.edges.length);
    var label = "top " + pct + (drawn < t.n_edges ? "; drawn: the strongest " + drawn : "");
    var said = "Faithfulness of the top " + pct + ": f = " + num(t.faithfulness, 3) + " (95% CI " +
               num(t.ci_low, 3) + " to " + num(t.ci_high, 3) + "), measured at that size.";
    if (asked !== null && Math.abs(asked - t.percent) > 1e-9) {
      said += " Asked for " + num(asked, 3) + "%: " + (t.percent <= asked ?
        "this is the measured point at or nearest below it (no value is interpolated)." :
        "no point was measured at or below it; this is the smallest measured one.");
    }
    return {label: label, said: said};
  }

  function showThreshold(index, askedPercent) {
    var t = data.thresholds[index];
    state.index = index;
    state.drawn = Math.min(t.n_edges, data.edges.length);
    var text = thresholdText(t, askedPercent);
    document.getElementById("threshold").value = String(index);
    document.getElementById("threshold-label").textContent = text.label;
    var out = document.getElementById("threshold-faithfulness");
    out.textContent = text.said;
    out.setAttribute("data-faithfulness", String(t.faithfulness));
    out.setAttribute("data-percent", String(t.percent));
    out.setAttribute("data-edges", String(t.n_edges));
    drawCircuit();
  }

  function setThreshold(fraction) {
    if (!data.thresholds.length) { return null; }
    var asked = 100 * fraction, best = 0;
    data.thresholds.forEach(function (t, i) { if (t.percent <= asked + 1e-9) { best = i; } });
    showThreshold(best, asked);
    return data.thresholds[best];
  }

  function edgeRows(edges, other) {
    if (!edges.length) { return "<p class=\"hint\">none scored</p>"; }
    return "<table><tr><th>" + other + "</th><th>channel</th><th>score</th></tr>" + edges.map(function (e) {
      return "<tr><td>" + esc(other === "from" ? e.sender : e.receiver) + "</td><td>" + esc(e.channel) +
             "</td><td data-value=\"" + e.score + "\">" + num(e.score) + "</td></tr>";
    }).join("") + "</table>";
  }

  function numberRows(numbers, prefix) {
    return Object.keys(numbers).map(function (k) {
      var v = numbers[k];
      return "<tr data-key=\"" + esc(prefix + k) + "\"><th>" + esc(k) + "</th><td data-value=\"" + esc(v) + "\">" +
             esc(num(v)) + "</td></tr>";
    }).join("");
  }

  function select(name) {
    var n = byName[name];
    if (!n) { throw new Error("circuitlab.select: no node " + name + " in this report"); }
    state.selected = name;
    var html = ["<h3 data-node=\"" + esc(n.name) + "\">" + esc(n.name) + "</h3>"];
    html.push("<p>" + esc(n.kind) + (n.layer >= 0 && n.kind !== "logits" ? ", layer " + n.layer : "") +
              (n.head >= 0 ? ", head " + n.head : "") + "; " + (n.in_circuit ? "in the circuit" : "not in the circuit") +
              (n.role ? "; role <b>" + esc(n.role) + "</b>" : "") +
              (n.kind === "head" && n.in_circuit && data.variables.length ?
               "; carries <b data-carries=\"" + esc(n.carries) + "\">" + esc(carriesText(n)) + "</b>" : "") + "</p>");
    html.push("<table class=\"numbers\">" + numberRows(n.numbers, "") + "</table>");
    n.role_evidence.forEach(function (r) {
      html.push("<h4>" + esc(r.role) + ": score " + num(r.score) + (r.score >= r.threshold ? " \u2265 " : " < ") +
                "threshold " + num(r.threshold) + "</h4>");
      html.push("<table class=\"numbers\">" + numberRows(r.evidence, r.role + ":") + "</table>");
    });
    if (n.kind === "head" && !n.role_evidence.length) {
      html.push("<p class=\"hint\">No role threshold reached (or role detection was off).</p>");
    }
    html.push("<h4>Strongest incoming edges</h4>" + edgeRows(n.incoming, "from"));
    html.push("<h4>Strongest outgoing edges</h4>" + edgeRows(n.outgoing, "to"));
    html.push("<h4>Attention pattern</h4>");
    if (n.kind === "head" && data.attention[n.name]) {
      html.push("<label>prompt <select id=\"attention-prompt\">" + data.prompts.map(function (tokens, i) {
        return "<option value=\"" + i + "\">" + i + ": " + esc(tokens.join("").slice(0, 40)) + "</option>";
      }).join("") + "</select></label><div id=\"attention-plot\" data-node=\"" + esc(n.name) + "\"></div>");
    } else {
      html.push("<p class=\"hint\">No attention pattern: " + (n.kind === "head" ? (data.prompts.length ?
        "this head is not in the circuit (patterns are stored for the circuit's heads)" :
        "this run's folder stores none (made before tables/attention.parquet existed)") :
        (n.kind === "mlp" ? "an MLP" : "the " + n.kind + " node") + " does not attend") + ".</p>");
    }
    document.getElementById("evidence").innerHTML = html.join("");
    var chooser = document.getElementById("attention-prompt");
    if (chooser) {
      chooser.addEventListener("change", function () { showAttention(name, parseInt(chooser.value, 10)); });
      showAttention(name, 0);
    }
    drawCircuit();
    return n;
  }

  // A head's pattern on one example prompt: rows are queries, columns keys (null above the diagonal: causal).
  function attention(name, prompt) {
    var rows = data.attention[name], tokens = data.prompts[prompt];
    if (!rows || !tokens) { throw new Error("circuitlab.attention: no pattern of " + name + " on prompt " + prompt); }
    var z = rows[prompt].map(function (row) {
      return tokens.map(function (_, k) { return k < row.length ? row[k] : null; });
    });
    return {tokens: tokens, z: z};
  }

  function showAttention(name, prompt) {
    var a = attention(name, prompt), div = document.getElementById("attention-plot");
    var labels = a.tokens.map(function (t, i) { return i + " " + t; });  // positions keep repeated tokens apart
    document.getElementById("attention-prompt").value = String(prompt);
    div.setAttribute("data-prompt", String(prompt));
    Plotly.react(div, [{type: "heatmap", z: a.z, x: labels, y: labels, zmin: 0, zmax: 1, colorscale: [[0, "#ffffff"], [1, "#08306b"]],
                        showscale: false, hovertemplate: "query %{y}<br>key %{x}<br>weight %{z:.4f}<extra></extra>"}],
                 {height: 320, margin: {l: 80, r: 5, t: 5, b: 80}, font: {size: 9},
                  yaxis: {autorange: "reversed", type: "category"}, xaxis: {type: "category", tickangle: -60}},
                 {displaylogo: false, responsive: true});
  }

  // The node under the pointer (within its marker, or 12 px): Plotly's own pick may be an edge's hover point.
  function nodeAt(div, ev) {
    var p = ev.points && ev.points[0];
    if (p && p.data.meta === "nodes") { return byName[p.customdata]; }
    if (!ev.event) { return null; }
    var box = div.getBoundingClientRect(), xa = div._fullLayout.xaxis, ya = div._fullLayout.yaxis;
    var px = ev.event.clientX - box.left - xa._offset, py = ev.event.clientY - box.top - ya._offset;
    var best = null, bestD = 12 * 12;
    data.nodes.forEach(function (n) {
      var d = Math.pow(xa.l2p(n.x) - px, 2) + Math.pow(ya.l2p(n.y) - py, 2);
      if (d <= bestD) { best = n; bestD = d; }
    });
    return best;
  }

  function setUpExplorer() {
    if (!data) { return; }
    data.nodes.forEach(function (n) { byName[n.name] = n; });
    setUpColorBy();
    var slider = document.getElementById("threshold");
    if (data.thresholds.length) {
      slider.max = String(data.thresholds.length - 1);
      slider.addEventListener("input", function () { showThreshold(parseInt(slider.value, 10), null); });
      var start = 0;  // the largest measured size whose edges all fit in the drawing
      data.thresholds.forEach(function (t, i) { if (t.n_edges <= data.edges.length) { start = i; } });
      showThreshold(start, null);
    } else {
      slider.disabled = true;
      state.drawn = data.edges.length;
      document.getElementById("threshold-label").textContent = data.edges.length + " edges (" + data.source + ")";
      document.getElementById("threshold-faithfulness").textContent =
        "No top-k edge faithfulness curve was measured on these edges in this run.";
      drawCircuit();
    }
    var div = document.getElementById("circuit-plot");
    div.on("plotly_click", function (ev) { var n = nodeAt(div, ev); if (n) { select(n.name); } });
  }

  window.circuitlab = {
    select: select,
    setThreshold: setThreshold,
    colorBy: colorBy,
    nodeColor: nodeColor,
    attention: attention,
    showAttention: showAttention,
    drawnEdges: function () { return state.drawn; },
    data: data,
    drawAll: function () { document.querySelectorAll("div.plot[data-figure]").forEach(drawFigure); }
  };
  drawFigures();
  setUpTables();
  setUpExplorer();
  document.body.setAttribute("data-ready", "1");
}());
