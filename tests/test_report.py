"""The interactive HTML report (gdn_intervene.report): one offline file, checked in a real headless
browser (Debian's chromium + chromium-driver, driven by selenium; `.ci/run` installs them)."""

import re
import shutil

import pytest
import torch

from gdn_intervene import report
from gdn_intervene.tracing import TraceResult

pytest.importorskip("plotly", reason="the report needs plotly (pip install -e '.[all]')")

T = 8
# tokens are data, never markup: plotly reads tags, entities and $...$ in labels; these must show literally
TOKENS = ["<s>", "x<br>y", "v3", "k2", "a&amp;b", "k5", "<b>", "$x^2$"]
LABELS = [f"{p}:{t}" for p, t in enumerate(TOKENS)]


def _result():
    state = torch.zeros(2, T)
    state[0, 4:7] = torch.tensor([0.25, 0.5, 0.75])
    state[:, -1] = float("nan")
    k = torch.zeros(2, T)
    k[1, 3] = -0.125
    return TraceResult(
        ("k", "state"), (0, 1), TOKENS, (22, 19), 3.0, -2.0, {"k": k, "state": state}, corrupted_positions=(3,)
    )


def _attention():
    M = torch.arange(2 * T * T, dtype=torch.float32).reshape(2, T, T).tril() / 1000
    M[1] *= -1  # head 1: negative weights, so the views differ visibly
    return {0: (M, [0, 1])}


def _attribution():
    from gdn_intervene.analysis import Attribution

    C = torch.zeros(1, 2, 2, 1, T)
    C[0, 0, 0, 0, 4] = 0.75  # layer 0, head 0: source position 4
    C[0, 1, 1, 0, 2] = -0.25  # layer 1, head 1: source position 2
    z = torch.zeros
    return Attribution(C, z(1, 2, 2, 1), z(1, 2, 1), C.sum((2, 4)), z(1, 1, 4), (0, 1), (0, 1), (T - 1,))


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    path = tmp_path_factory.mktemp("report") / "report.html"
    report.write_html(
        path,
        trace=_result(),
        trace_answers=("</s>", "$$"),
        attention=_attention(),
        tokens=TOKENS,
        attribution=_attribution(),
        attribution_of="logit(<b>) - logit(\\alpha)",
    )
    return path


def test_one_self_contained_file(page):
    text = page.read_text()
    assert len(text) > 1_000_000 and text.count("<html") == 1  # plotly.js embedded once
    assert not re.search(r"<script[^>]+src=", text)  # nothing loaded from the network
    with pytest.raises(ValueError, match="needs at least one of"):
        report.write_html(page.parent / "empty.html")


def _driver():
    chrome = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or (
        "/usr/bin/chromedriver" if shutil.which("/usr/bin/chromedriver") else None
    )
    if not (chrome and driver):
        pytest.skip("no headless browser: apt-get install chromium chromium-driver (.ci/run does)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[all]')")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chrome
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1800"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=opts)


@pytest.fixture(scope="module")
def browser(page):
    d = _driver()
    try:
        d.get(page.as_uri())
        from selenium.webdriver.support.ui import WebDriverWait

        WebDriverWait(d, 30).until(
            lambda d: d.execute_script(
                "return document.querySelectorAll('.js-plotly-plot .hm image, .js-plotly-plot .heatmaplayer image').length >= 2"
            )
        )
        yield d
    finally:
        d.quit()


def _menu(d, div: str, labels: list[str]):
    """Open the drop-down of `div` and return its buttons once all of them show their labels
    (plotly draws the buttons first and their text after: reading at once gave ['', ...])."""
    from selenium.webdriver.support.ui import WebDriverWait

    d.find_element("css selector", f"#{div} .updatemenu-header").click()
    texts = (
        f"return Array.from(document.querySelectorAll('#{div} .updatemenu-dropdown-button')).map(b => b.textContent)"
    )
    WebDriverWait(d, 10).until(lambda d: d.execute_script(texts) == labels)
    return d.find_elements("css selector", f"#{div} .updatemenu-dropdown-button")


def _hover(d, div: str, x: int, y: int) -> str:
    """Move the real mouse over cell (x, y) of heatmap `div`; return the hover label's text."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.support.ui import WebDriverWait

    drag = d.find_element("css selector", f"#{div} .nsewdrag")
    # the cell's centre in the drag layer's coordinates, from plotly's own axes
    px, py, w, h = d.execute_script(
        "const gd = document.getElementById(arguments[0]), L = gd._fullLayout;"
        "return [L.xaxis.l2p(arguments[1]), L.yaxis.l2p(arguments[2]), L.xaxis._length, L.yaxis._length];",
        div,
        x,
        y,
    )
    ActionChains(d).move_to_element_with_offset(drag, int(px - w / 2), int(py - h / 2)).perform()
    label = WebDriverWait(d, 10).until(lambda d: d.find_elements("css selector", f"#{div} .hoverlayer .hovertext"))
    return " ".join(label[0].text.split())


def test_page_loads_without_console_errors_and_plots_render(browser):
    errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
    assert not errors, errors
    ids = browser.execute_script("return Array.from(document.querySelectorAll('.js-plotly-plot')).map(e => e.id)")
    assert ids == ["trace", "attention", "attribution"]
    for div in ids:
        size = browser.execute_script(
            "const r = document.getElementById(arguments[0]).getBoundingClientRect();return [r.width, r.height]", div
        )
        assert min(size) > 200, (div, size)


def test_hovering_a_trace_cell_shows_its_numbers(browser):
    # rows: k layer 0, k layer 1, state layer 0, state layer 1; columns: positions
    text = _hover(browser, "trace", 5, 2)
    assert "site state, layer 0" in text and "position 5:k5 (token k5)" in text and "score 0.500" in text, text
    text = _hover(browser, "trace", 3, 1)
    assert "site k, layer 1" in text and "3:k2" in text and "score -0.125" in text, text
    text = _hover(browser, "trace", 4, 0)
    assert "position 4:a&amp;b (token a&amp;b)" in text, text


def _ticks(d, div: str, axis: str) -> list[str]:
    return d.execute_script(
        f"return Array.from(document.querySelectorAll('#{div} .{axis}tick text')).map(e => e.textContent)"
    )


def test_tokens_show_literally_in_labels_and_titles(browser):
    assert _ticks(browser, "trace", "x") == LABELS
    assert _ticks(browser, "attention", "x") == LABELS
    assert _ticks(browser, "attention", "y")[::-1] == LABELS  # the query axis runs downwards
    assert _ticks(browser, "attribution", "x") == LABELS
    title = "return document.querySelector('#' + arguments[0] + ' .gtitle').textContent"
    assert "clean answer </s> vs corrupted answer $$" in browser.execute_script(title, "trace")
    assert browser.execute_script(title, "attribution").startswith(
        "Attribution of logit(<b>) - logit(\\alpha) at position 7:$x^2$"
    )


def test_trace_marks_the_corrupted_position_on_the_x_axis(browser):
    # as the PNG figure does: the corrupted position's tick label red and bold, the axis title says so
    marked = browser.execute_script(
        "return Array.from(document.querySelectorAll('#trace .xtick text')).map(e => e.innerHTML)"
    )
    assert "fill:#d62728" in marked[3] and "font-weight:bold" in marked[3], marked
    assert not any("d62728" in m or "bold" in m for m in marked[:3] + marked[4:]), marked
    assert "red: corrupted" in browser.find_element("css selector", "#trace .g-xtitle").text


def test_head_picker_changes_the_view(browser):
    from selenium.webdriver.support.ui import WebDriverWait

    visible = "return document.getElementById('attention').data.map(t => t.visible)"
    assert browser.execute_script(visible) == [True, False]
    text = _hover(browser, "attention", 2, 5)  # query 5, key 2: M[0, 5, 2] = (5 * 8 + 2) / 1000
    assert "query t = 5:k5" in text and "key s = 2:v3" in text and "M[t, s] = 0.0420" in text, text
    buttons = _menu(browser, "attention", ["layer 0, head 0", "layer 0, head 1"])
    buttons[1].click()
    WebDriverWait(browser, 10).until(lambda d: d.execute_script(visible) == [False, True])
    title = browser.find_element("css selector", "#attention .gtitle").text
    assert title.endswith("layer 0, head 1")
    text = _hover(browser, "attention", 2, 5)  # head 1: M[1, 5, 2] = -(64 + 42) / 1000
    assert "M[t, s] = -0.1060" in text, text


def test_attribution_view_picks_layer_and_head(browser):
    from selenium.webdriver.support.ui import WebDriverWait

    visible = "return document.getElementById('attribution').data.map(t => t.visible)"
    assert browser.execute_script(visible) == [True, False, False, False]
    buttons = _menu(
        browser, "attribution", ["layer 0, head 0", "layer 0, head 1", "layer 1, head 0", "layer 1, head 1"]
    )
    buttons[3].click()
    WebDriverWait(browser, 10).until(lambda d: d.execute_script(visible) == [False, False, False, True])
    ys = browser.execute_script("return document.getElementById('attribution').data[3].y")
    assert ys[2] == -0.25 and sum(abs(y) for y in ys) == 0.25


# ---------------------------------------------------------------- attribution patching


def _atp(steps: int = 1):
    """An attribution-patching result of `_result()`'s cells, two of them verified."""
    import dataclasses

    from gdn_intervene.tracing import ATTRIBUTION, Cell

    r = _result()
    return dataclasses.replace(
        r,
        scores={k: v * 0.5 for k, v in r.scores.items()},
        method=ATTRIBUTION,
        steps=steps,
        verified={Cell("state", 0, 6): 0.75, Cell("state", 0, 5): 0.5},
    )


def test_an_atp_result_is_headed_and_captioned_as_estimates_with_its_verified_cells(tmp_path):
    """`gdn-intervene trace --method atp --html`: the report says attribution patching, calls the
    scores estimates (first order or K steps), outlines and lists the verified cells."""
    for steps, how in ((1, "first-order estimate"), (8, "8-step integrated-gradient estimate")):
        path = report.write_html(tmp_path / f"atp{steps}.html", trace=_atp(steps), trace_answers=("</s>", "$$"))
        text = path.read_text()
        assert "<h2>Attribution patching</h2>" in text and "<h2>Causal trace</h2>" not in text
        assert "Each cell restores" not in text and "Estimates, not measurements" in text
        assert how in text
        assert (
            '<table class="verified">' in text and "<td>6:&lt;b&gt;</td><td>0.375</td><td>0.750</td>" in text
        )  # escaped
    fig = report.trace_figure(_atp())
    outlined = [sh for sh in fig.layout.shapes if sh.line.color == "black"]
    assert len(outlined) == 2
    assert any("measured by activation patching 0.750" in str(c) for row in fig.data[0].customdata for c in row)


def test_the_scatter_draws_the_diagonal_in_the_png_colours():
    from gdn_intervene import plot

    trace = _result()
    fig = report.atp_scatter_figure(_atp(), trace)
    names = [t.name for t in fig.data]
    assert names[-1] == "agreement (y = x)" and fig.data[-1].x == fig.data[-1].y
    for t in fig.data[:-1]:
        assert t.marker.color == plot.site_colour(t.name.split()[0])
