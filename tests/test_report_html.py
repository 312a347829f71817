"""The interactive report, checked in Python on every run and in a real browser where Chromium is installed.

`test_report_page_data` always runs: it parses report.html with the standard library and checks its inlined
figure and explorer data against the run folder's own files. The browser tests open the page from disk in
headless Chromium through Playwright (the system `chromium` that `make browser` installs; nothing is downloaded)
and use it like a reader: click a node, move the threshold, sort a table.
"""

import json
import os
import re
import subprocess
import sys
import time
from html.parser import HTMLParser

import pandas as pd
import pytest
import torch
from PIL import Image

from circuitlab.patching.models import boot_native_model, load_model, save_model
from circuitlab.reports.plots import plotly_js
from circuitlab.reports.save import read_value
from tests.conftest import TINY_CONFIG

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def run_log(tmp_path_factory):
    """A real run of the tiny model, its output piped (not a terminal), as a user's log file would get it."""
    root = tmp_path_factory.mktemp("html")
    save_model(boot_native_model(TINY_CONFIG), root / "model")
    out = root / "run"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-m", "circuitlab.reports.cli", "run", "--task", "repeated_tokens",
                           "--model", str(root / "model"), "--out", str(out), "--n", "6", "--task-option", "seq_len=5",
                           "--n-boot", "50", "--percents", "1,10,50,100", "--oracle-edges", "30", "--variables", "next"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def run_dir(run_log):
    return run_log[0]


def test_log_without_terminal_has_no_progress_bars(run_log):
    _, log = run_log
    assert "\r" not in log and "fwd/s" not in log and "it/s" not in log  # no tqdm bar when output is not a terminal
    done = re.findall(r"^\[(\w+)\] done in ([0-9.]+) s$", log, flags=re.M)
    assert {"baseline", "scores", "exact", "faithfulness"} <= {name for name, _ in done}  # one line per stage


class _Page(HTMLParser):
    """Collects the page's JSON blocks, tags with src/href, table shapes and visible text."""

    VOID = {"img", "meta", "br", "hr", "link", "input"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.json: dict[str, str] = {}
        self.refs: list[str] = []
        self.tables: list[list[int]] = []
        self.text: list[str] = []
        self.errors: list[str] = []
        self._json_id = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.refs += [attrs[k] for k in ("src", "href") if attrs.get(k) and not attrs[k].startswith(("#", "data:"))]
        if tag == "script" and attrs.get("type") == "application/json":
            self._json_id = attrs["id"]
            self.json[self._json_id] = ""
        if tag == "table":
            self.tables.append([])
        elif tag == "tr" and self.tables:
            self.tables[-1].append(0)
        elif tag in ("td", "th") and self.tables and self.tables[-1]:
            self.tables[-1][-1] += 1
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if tag == "script":
            self._json_id = None
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            return
        self.stack.pop()

    def handle_data(self, data):
        if self._json_id:
            self.json[self._json_id] += data
        elif not self.stack or self.stack[-1] not in ("script", "style"):
            self.text.append(data)


def _signed_curve(run_dir) -> pd.DataFrame:
    curve = pd.read_csv(run_dir / "faithfulness.csv")
    return curve[curve["selection"] == "signed"].set_index("percent")


def test_report_page_data(run_dir):
    html = (run_dir / "report.html").read_text(encoding="utf-8")
    page = _Page()
    page.feed(html)
    page.close()
    assert not page.errors and page.stack == [], (page.errors[:3], page.stack)
    assert page.refs == []  # nothing is loaded from anywhere: scripts, styles and data are inline
    assert "http://" not in html.replace(plotly_js(), "") and "https://" not in html.replace(plotly_js(), "")
    figures = {k: json.loads(v) for k, v in page.json.items() if k.startswith("data-")}
    assert set(figures) >= {f"data-{n}" for n in ("baseline", "heads", "mlps", "resid", "faithfulness", "agreement")}
    assert all(fig["data"] for fig in figures.values())
    explorer = json.loads(page.json["explorer-data"])
    curve = _signed_curve(run_dir)
    assert [t["percent"] for t in explorer["thresholds"]] == list(curve.index)
    assert [t["faithfulness"] for t in explorer["thresholds"]] == pytest.approx(list(curve["faithfulness"]))
    edges = pd.read_parquet(run_dir / "tables" / "edges.parquet")
    assert explorer["total_edges"] == len(edges)
    top = edges.sort_values("score", ascending=False)["score"].head(len(explorer["edges"]))
    assert [e["score"] for e in explorer["edges"]] == pytest.approx(list(top))  # in the order the curve kept them
    faithful = json.loads((run_dir / "run.json").read_text())["circuit_faithfulness"]
    prompts = pd.read_parquet(run_dir / "tables" / "circuit_prompts.parquet")["circuit"]
    base = pd.read_csv(run_dir / "baseline.csv")
    assert len(prompts) == len(base) and "diamond-open" in page.json["data-baseline"]  # drawn per prompt
    f = (prompts.mean() - base["corrupt"].mean()) / (base["clean"].mean() - base["corrupt"].mean())
    assert f == pytest.approx(faithful["discovery"], rel=1e-5)  # per-prompt values average to the circuit's f
    attention = pd.read_parquet(run_dir / "tables" / "attention.parquet")  # the circuit's heads, 4 prompts
    heads = {n["id"] for n in json.loads((run_dir / "circuit.json").read_text())["nodes"] if n["kind"] == "head"}
    assert set(attention["node"]) == heads == set(explorer["attention"]) and len(explorer["prompts"]) == 4
    assert attention.groupby(["prompt", "node", "query"])["weight"].sum().to_numpy() == pytest.approx(1, abs=1e-5)
    circuit = json.loads((run_dir / "circuit.json").read_text())  # --variables: the carried variable per head
    carries = {n["name"]: n["carries"] for n in explorer["nodes"] if n["in_circuit"] and n["kind"] == "head"}
    assert carries == {n["id"]: n["carries"] for n in circuit["nodes"] if n["kind"] == "head"}
    assert explorer["variables"] == ["next"] and explorer["baselines"]["next"] == circuit["graph"]["iia_next_none"]
    assert "iia_next_das4" in html and "exceeds that variable" in (run_dir / "report.md").read_text()
    assert page.tables and all(len(set(rows)) == 1 for rows in page.tables)  # rectangular tables
    text = " ".join(page.text)
    for bad in ("Traceback", "Error:", "undefined", "{{", "{%", "position -1"):
        assert bad not in text, bad
    assert " nan " not in f" {text.lower()} ", "NaN printed in the report (use n/a)"


# ---------------------------------------------------------------------- in a real browser

@pytest.fixture(scope="module")
def browser_page(run_dir):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM} (`make browser` installs it); test_report_page_data checked the "
                    "page without a browser")
    sync_playwright = pytest.importorskip("playwright.sync_api", reason="playwright (the dev extra) is not installed"
                                          ).sync_playwright
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        seen = {"requests": [], "errors": []}
        page.on("request", lambda r: seen["requests"].append(r.url))
        page.on("console", lambda m: seen["errors"].append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: seen["errors"].append(str(e)))
        start = time.perf_counter()
        page.goto((run_dir / "report.html").resolve().as_uri())
        page.wait_for_selector("body[data-ready='1']", timeout=60_000)
        print(f"\nreport.html ({(run_dir / 'report.html').stat().st_size / 1e6:.1f} MB) rendered in headless Chromium "
              f"in {time.perf_counter() - start:.2f} s")
        yield page, seen
        browser.close()


def test_no_network_and_no_console_error(browser_page):
    page, seen = browser_page
    assert seen["requests"] and all(u.startswith(("file:", "data:")) for u in seen["requests"]), seen["requests"]
    assert seen["errors"] == []
    page.locator("#fig-heads").scroll_into_view_if_needed()  # figures are drawn as they come into view
    page.wait_for_selector("#fig-heads .main-svg", timeout=10_000)
    page.evaluate("window.circuitlab.drawAll()")
    assert page.locator("div.plot[data-drawn='1']").count() == page.locator("div.plot[data-figure]").count()
    page.wait_for_timeout(200)
    assert seen["errors"] == []


def test_clicking_a_node_shows_its_own_numbers(browser_page, run_dir, tmp_path):
    page, _ = browser_page
    circuit = json.loads((run_dir / "circuit.json").read_text())
    node = max((n for n in circuit["nodes"] if n["kind"] == "head"), key=lambda n: abs(n["exact_effect"]))
    page.locator("#explorer").scroll_into_view_if_needed()
    x, y = page.evaluate("""(name) => {
        const gd = document.getElementById('circuit-plot'), n = window.circuitlab.data.nodes.find(m => m.name === name);
        const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis, box = gd.getBoundingClientRect();
        return [box.left + xa._offset + xa.l2p(n.x), box.top + ya._offset + ya.l2p(n.y)]; }""", node["id"])
    page.mouse.click(x, y)
    page.wait_for_selector(f"#evidence h3[data-node='{node['id']}']", timeout=5_000)
    shown = {row.get_attribute("data-key"): row.locator("td").get_attribute("data-value")
             for row in page.locator("#evidence table.numbers tr[data-key]").all()}
    assert float(shown["score"]) == pytest.approx(node["score"], rel=1e-12)
    assert float(shown["exact_effect"]) == pytest.approx(node["exact_effect"], rel=1e-12)
    for key, value in json.loads(node["evidence"]).items():
        assert shown[key] == str(value) or float(shown[key]) == pytest.approx(value, rel=1e-12)
    edges = pd.read_parquet(run_dir / "tables" / "edges.parquet")
    incoming = edges[edges["receiver"] == node["id"]]
    strongest = incoming.loc[incoming["score"].abs().idxmax()]
    assert page.locator("#evidence").inner_text().count(strongest["sender"]) >= 1
    page.locator("#explorer").screenshot(path=tmp_path / "explorer.png")  # bench/report_page.py: the README's
    colours = Image.open(tmp_path / "explorer.png").convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 100  # drawn nodes, edges and the panel, not a blank box


def _drawn_edges(page) -> int:
    """Edge segments in the explorer's Plotly traces (lines drawn: x, x, null per edge)."""
    return page.evaluate("""() => document.getElementById('circuit-plot').data
        .filter(t => t.meta === 'edges').reduce((s, t) => s + t.x.filter(v => v === null).length, 0)""")


def test_threshold_changes_edges_and_states_measured_faithfulness(browser_page, run_dir):
    page, _ = browser_page
    curve = _signed_curve(run_dir)
    counts = {}
    for percent in (10.0, 50.0):
        page.evaluate("f => window.circuitlab.setThreshold(f)", percent / 100)
        stated = page.locator("#threshold-faithfulness")
        assert float(stated.get_attribute("data-faithfulness")) == pytest.approx(curve.loc[percent, "faithfulness"])
        assert f"f = {curve.loc[percent, 'faithfulness']:.3f}" in stated.inner_text()
        counts[percent] = _drawn_edges(page)
        assert counts[percent] == min(int(curve.loc[percent, "n_edges"]), 400)
    assert counts[10.0] < counts[50.0]
    page.evaluate("f => window.circuitlab.setThreshold(f)", 0.3)  # between measured points: the one below, said so
    stated = page.locator("#threshold-faithfulness")
    assert float(stated.get_attribute("data-percent")) == 10.0 and "nearest below" in stated.inner_text()
    page.locator("#threshold").focus()
    page.keyboard.press("ArrowRight")  # the control itself: one measured point up
    assert float(stated.get_attribute("data-percent")) == 50.0 and _drawn_edges(page) == counts[50.0]


def test_table_sorts_and_page_fits_1280(browser_page, run_dir):
    page, _ = browser_page
    table = page.locator("table.sortable").filter(has=page.locator("th", has_text="difference")).first
    header = table.locator("th").filter(has_text="corrupt").first
    column = [h.inner_text().strip() for h in table.locator("th").all()].index("corrupt")
    header.click()
    values = [float(v) for v in table.locator(f"tbody tr td:nth-child({column + 1})").all_inner_texts()]
    expected = sorted(pd.read_csv(run_dir / "baseline.csv")["corrupt"])
    assert values == pytest.approx([round(v, 3) for v in expected], abs=1e-9)
    header.click()
    descending = [float(v) for v in table.locator(f"tbody tr td:nth-child({column + 1})").all_inner_texts()]
    assert descending == values[::-1]
    width = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    assert width[0] <= width[1], f"horizontal overflow at 1280 px: {width}"


def test_evidence_panel_draws_the_heads_attention_pattern(browser_page, run_dir):
    """The heatmap a head's evidence panel draws equals the pattern read here with plain TransformerLens hooks
    (`run_with_cache` on `blocks.L.attn.hook_pattern`) on that example prompt; choosing another prompt redraws it."""
    page, seen = browser_page
    circuit = json.loads((run_dir / "circuit.json").read_text())
    head = max((n for n in circuit["nodes"] if n["kind"] == "head"), key=lambda n: abs(n["exact_effect"]))
    layer, index = head["layer"], head["head"]
    model = load_model(str(run_dir.parent / "model"))
    pairs = read_value(run_dir, "pairs")
    page.evaluate("name => window.circuitlab.select(name)", head["id"])
    plot = page.locator(f"#evidence #attention-plot[data-node='{head['id']}']")
    drawn = {}
    for prompt in (1, 0):
        page.locator("#attention-prompt").select_option(str(prompt))  # the control a reader uses
        page.wait_for_selector(f"#attention-plot[data-prompt='{prompt}'] .main-svg", timeout=5_000)
        z = page.evaluate("() => document.getElementById('attention-plot').data[0].z")
        assert z == page.evaluate("a => window.circuitlab.attention(a[0], a[1]).z", [head["id"], prompt])
        tokens = pairs.clean_tokens[prompt, :int(pairs.lengths[prompt])]  # the prompt without its padding
        name = f"blocks.{layer}.attn.hook_pattern"
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens[None], names_filter=lambda n: n == name)
        expected = cache[name][0, index]
        n = len(tokens)
        assert len(z) == n and all(len(row) == n for row in z)
        for q, k in ((n - 1, 0), (n - 1, n - 2), (n // 2, n // 2), (n - 1, n - 1)):
            assert z[q][k] == pytest.approx(float(expected[q, k]), abs=1e-4), (prompt, q, k)
        assert z[0][n - 1] is None  # causal: a query sees no later key
        drawn[prompt] = z
    assert plot.count() == 1 and drawn[0] != drawn[1]
    mlp = next(n["name"] for n in page.evaluate("window.circuitlab.data.nodes") if n["kind"] == "mlp")
    page.evaluate("name => window.circuitlab.select(name)", mlp)
    assert "no attention pattern" in page.locator("#evidence").inner_text().lower()
    assert page.locator("#attention-plot").count() == 0 and seen["errors"] == []


def _node_colours(page) -> dict[str, str]:
    return page.evaluate("""() => { const t = document.getElementById('circuit-plot').data.find(d => d.meta === 'nodes');
        return Object.fromEntries(t.customdata.map((name, i) => [name, t.marker.color[i]])); }""")


def test_heads_coloured_by_the_variable_they_carry(browser_page, run_dir):
    """The explorer colours each circuit head by the variable circuit.json says it carries (the run measured
    `next`), states the rule and the baseline, and the colour-by control switches to roles and back."""
    page, seen = browser_page
    circuit = json.loads((run_dir / "circuit.json").read_text())
    heads = {n["id"]: n for n in circuit["nodes"] if n["kind"] == "head"}
    data = page.evaluate("window.circuitlab.data")
    palette = data["variable_colors"]
    assert set(palette) == {"next", ""} and palette["next"] != palette[""]
    rule = page.locator("#carries-rule").inner_text()
    assert "exceeds" in rule and f"next {circuit['graph']['iia_next_none']:.2f}" in rule
    assert page.locator("#color-by").input_value() == "carried"  # the default once variables were measured
    colours = _node_colours(page)
    assert {n: colours[n] for n in heads} == {n: palette[h["carries"]] for n, h in heads.items()}
    page.locator("#color-by").select_option("role")
    colours = _node_colours(page)
    assert {n: colours[n] for n in heads} == {n: data["role_colors"].get(h.get("role", ""), "#6baed6")
                                               if h.get("role") else "#6baed6" for n, h in heads.items()}
    page.locator("#color-by").select_option("var:next")
    colours = _node_colours(page)
    assert {n: colours[n] for n in heads} == {n: palette["next" if h["carries"] == "next" else ""]
                                               for n, h in heads.items()}
    # the colour follows the carried variable (the tiny random model's heads carry none): a head said to carry
    # `next` turns that colour under "carried" and "var:next"
    head = sorted(heads)[0]
    page.evaluate("""name => { window.circuitlab.data.nodes.find(n => n.name === name).carries = 'next';
                               window.circuitlab.colorBy('carried'); }""", head)
    assert _node_colours(page)[head] == palette["next"]
    page.evaluate("window.circuitlab.colorBy('var:next')")
    assert _node_colours(page)[head] == palette["next"]
    page.evaluate("""name => { window.circuitlab.data.nodes.find(n => n.name === name).carries = '';
                               window.circuitlab.colorBy('carried'); }""", head)
    # a head --variables-heads left out (no iia_ numbers) is "not measured" (white), not "none"
    page.evaluate("""name => { const n = window.circuitlab.data.nodes.find(m => m.name === name);
        Object.keys(n.numbers).filter(k => k.startsWith('iia_')).forEach(k => delete n.numbers[k]);
        window.circuitlab.colorBy('carried'); }""", head)
    assert _node_colours(page)[head] == "#ffffff" and "not measured" in page.locator("#color-by-box").inner_text()
    assert seen["errors"] == []
