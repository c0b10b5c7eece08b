"""`trace --html`: the page is self-contained, holds the trace's values, stays small for a 60-layer,
256-expert model, and works in a real headless Chromium (no console errors, the layer count shown, the
heatmaps drawn, hover values, a screenshot that is not blank). Plus the terminal overview and the CLI."""

from __future__ import annotations

import io
import json
import re

import pytest
import torch

from llmcli.demo import ensure_demo
from llmcli.loader import load_model
from llmcli.report_html import heatmap, render_page, section
from llmcli.trace import build_trace_json, run_trace
from llmcli.trace_html import trace_html
from tests.headless import Browser, find_browser

PROMPT = 'Experts <b>route</b> "tokens" </script> & attention sees the context. 你好!'
BIG_BUDGET = 5_000_000  # bytes: the limit for the 60-layer, 256-expert report



def widened(data: dict, layers: int = 60, experts: int = 256, heads: int = 128, dense: int = 3) -> dict:
    """A real trace's JSON stretched to DeepSeek-V3's shape (60 layers, 256 experts in 8 groups, 8 per
    token, 128 heads) with random routing and statistics: the report's size depends only on the shape of
    its data. (Building a real 60 x 256-expert model takes minutes of Python; benchmarks/trace_report.py
    measures one.)"""
    gen = torch.Generator().manual_seed(0)
    n = len(data["tokens"])
    template_dense, template_moe = data["layers"][0], data["layers"][-1]
    out = []
    for index in range(layers):
        layer = json.loads(json.dumps(template_dense if index < dense else template_moe))
        layer["index"] = index
        stats = layer["attention_stats"]
        for key in ("entropy", "sink", "distance"):
            stats[key] = torch.rand(heads, generator=gen).tolist()
        if index >= dense:
            chosen = torch.rand(n, experts, generator=gen).topk(8).indices
            layer["router"].update(
                num_experts=experts, experts=chosen.tolist(), weights=torch.rand(n, 8, generator=gen).tolist(),
                groups=torch.rand(n, 8, generator=gen).topk(4).indices.tolist(),
                load=torch.bincount(chosen.reshape(-1), minlength=experts).tolist())
        out.append(layer)
    return {**data, "num_layers": layers, "layers": out}


@pytest.fixture(scope="module")
def moe_trace():
    loaded = load_model("demo-deepseek", ensure_demo("demo-deepseek"), device="cpu")
    ids = loaded.tokenizer.encode(PROMPT)
    run = run_trace(loaded.runner, ids, generate=3, logit_lens=5, attention_stats=True)
    return build_trace_json(run, loaded.model, loaded.tokenizer, "demo-deepseek", {"prompt": PROMPT})


def figures_of(page: str) -> list[dict]:
    payload = re.search(r'<script type="application/json" id="figures">(.*?)</script>', page, re.S).group(1)
    return json.loads(payload.replace("<\\/", "</"))


def test_page_is_self_contained_and_holds_the_values(moe_trace):
    page = trace_html(moe_trace)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # nothing fetched when viewed
    assert "@import" not in page and "url(http" not in page
    assert page.count("</script>") == 2  # the prompt's "</script>" cannot end a script early
    assert "4 layers" in page and "demo-deepseek" in page
    assert "&lt;b&gt;route&lt;/b&gt;" in page  # the prompt is escaped, not markup
    figures = {f["title"]: f for f in figures_of(page)}
    rms = figures["RMS over hidden at resid_post"]
    assert rms["values"][2] == moe_trace["layers"][2]["rms_per_token"]["resid_post"]
    assert rms["rows"] == ["0", "1", "2", "3"] and len(rms["cols"]) == len(moe_trace["tokens"])
    lens = figures["top-1 token after each layer (colour: its probability)"]
    assert lens["values"][3] == [row[0] for row in moe_trace["layers"][3]["logit_lens"]["top_probs"]]
    load = figures["expert load: tokens routed to each expert"]
    assert load["values"] == [layer["router"]["load"] for layer in moe_trace["layers"] if layer["router"]]
    choices = next(f for t, f in figures.items() if t.startswith("expert choices per token"))
    first = moe_trace["layers"][1]["router"]
    assert choices["cells"][0][0] == str(first["experts"][0][0])
    assert f"{first['experts'][0][0]}:" in choices["tips"][0][0] and "groups kept" in choices["tips"][0][0]
    entropy = figures["entropy (nats) per head (mean over queries)"]
    assert entropy["values"][0] == moe_trace["layers"][0]["attention_stats"]["entropy"]
    assert "max |x| over hidden at attn_out" in figures and "window span: tokens the last query sees" in figures


def test_report_builder_takes_plain_data():
    page = render_page("workload", [("prompts", "3")], [
        section("Routing", [heatmap("load", ["0", "1"], ["a", "b", "c"], [[1, 2, None], [0, 5, float("nan")]],
                                    row_name="layer", col_name="expert")])])
    fig = figures_of(page)[0]
    assert fig["values"] == [[1.0, 2.0, None], [0.0, 5.0, None]]  # non-finite values become blanks
    with pytest.raises(ValueError, match="2 x 3"):
        heatmap("bad", ["0", "1"], ["a", "b", "c"], [[1, 2, 3]])


@pytest.fixture(scope="module")
def wide_trace(moe_trace):
    return widened(moe_trace)


def test_wide_moe_report_stays_under_budget(wide_trace):
    data = wide_trace
    page = trace_html(data)
    size = len(page.encode())
    assert size < BIG_BUDGET, size
    assert "60 layers" in page
    load = next(f for f in figures_of(page) if f["title"].startswith("expert load"))
    assert len(load["rows"]) == 57 and len(load["cols"]) == 256
    assert all(sum(row) == 8 * len(data["token_ids"]) for row in load["values"])


# -- in a real browser ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    executable = find_browser()
    if executable is None:
        pytest.skip("no Chromium found (apt-get install chromium, as .ci/run does; or pip install playwright "
                    "&& playwright install chromium)")
    with Browser(executable) as b:
        yield b


def blank(png: bytes) -> bool:
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    colours = image.getcolors(maxcolors=1 << 20) or []
    background = max(colours)[0] if colours else image.width * image.height
    return len(colours) < 16 or background > 0.97 * image.width * image.height


def test_report_in_headless_chromium(browser, moe_trace, tmp_path):
    path = tmp_path / "trace.html"
    path.write_text(trace_html(moe_trace), encoding="utf-8")
    browser.open(path.as_uri())
    assert browser.errors() == []
    text = browser.evaluate("document.body.innerText")
    assert "4 layers" in text and "Logit lens" in text and "Mixture of experts" in text
    expected = len(figures_of(path.read_text()))
    assert browser.evaluate("document.body.dataset.figures") == str(expected)
    assert browser.evaluate("document.querySelectorAll('canvas').length") == expected
    assert not blank(browser.screenshot())
    # Hover the lens grid's cell for layer 3, position 2: the tooltip names both and gives the exact value.
    cell = browser.evaluate(
        "(() => { const c = document.querySelector('canvas'); const r = c.getBoundingClientRect(); "
        "const L = JSON.parse(c.dataset.layout); "
        "return [r.left + L.rowLabel + 2.5 * L.cw, r.top + L.top + 3.5 * L.ch]; })()")
    browser.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": cell[0], "y": cell[1]}, browser.session)
    tip = browser.evaluate("document.getElementById('tip').hidden ? '' : document.getElementById('tip').textContent")
    lens = moe_trace["layers"][3]["logit_lens"]
    assert tip.startswith("layer 3 · token 2 "), tip
    probability = float(re.search(r"probability = (\S+)", tip).group(1))
    assert probability == pytest.approx(lens["top_probs"][2][0], rel=1e-5) and "top:" in tip
    assert browser.errors() == []


def test_wide_moe_report_in_headless_chromium(browser, wide_trace, tmp_path):
    path = tmp_path / "wide.html"
    path.write_text(trace_html(wide_trace), encoding="utf-8")
    browser.open(path.as_uri())
    assert browser.errors() == []
    assert "60 layers" in browser.evaluate("document.body.innerText")
    assert float(browser.evaluate("document.body.dataset.renderedMs")) > 0
    assert not blank(browser.screenshot())


# -- CLI and terminal ------------------------------------------------------------------------------------


def test_cli_writes_html_and_json_that_agree(run_cli, tmp_path):
    html_path, json_path = tmp_path / "t.html", tmp_path / "t.json"
    code, out, err = run_cli("trace", "demo-qwen", "-p", "hello world", "--logit-lens", "--attention-stats",
                             "--html", html_path, "--json", json_path)
    assert code == 0, err
    assert f"wrote {html_path}" in err
    data = json.loads(json_path.read_text())
    assert data["logit_lens"]["k"] == 5 and data["settings"]["prompt"] == "hello world"
    assert data["settings"]["logit_lens"] == 5 and data["settings"]["attention_stats"] is True
    assert all(len(layer["logit_lens"]["top_ids"][0]) == 5 for layer in data["layers"])
    assert len(data["layers"][0]["attention_stats"]["entropy"]) == 4  # demo-qwen has 4 heads
    page = html_path.read_text()
    figures = {f["title"]: f for f in figures_of(page)}
    assert figures["RMS over hidden at resid_mid"]["values"][1] == data["layers"][1]["rms_per_token"]["resid_mid"]
    # The overview comes first and has one row per layer; the lens and statistics tables follow.
    overview = out.split("RMS over hidden")[0]
    assert "overview: 4 of 4 layers" in overview
    assert len(re.findall(r"^\s+[0-3]\s+\d", overview, re.M)) == 4
    assert "logit lens at the last position: top 5" in out and "attention per head" in out


def test_cli_logit_lens_value_and_errors(run_cli, tmp_path):
    code, out, err = run_cli("trace", "demo-qwen", "--logit-lens", "2", "--layer", "1", "--json", "-")
    assert code == 0, err
    data = json.loads(out)
    assert data["logit_lens"]["k"] == 2 and [layer["index"] for layer in data["layers"]] == [1]
    assert len(data["layers"][0]["logit_lens"]["top_ids"][0]) == 2
    assert data["layers"][0]["attention_stats"] is None
    code, _, err = run_cli("trace", "demo-qwen", "--html", tmp_path / "missing" / "t.html")
    assert code == 1 and err.strip().splitlines()[-1].startswith("error: cannot write")
    code, _, err = run_cli("trace", "demo-qwen", "--logit-lens", "500")
    assert code == 2 and "error:" in err and "Traceback" not in err
