"""report.html: one card per test row, wrong fields marked, data escaped, nothing fetched, and it
renders in a real browser."""

import json
import os
import shutil
from html.parser import HTMLParser

import pytest

from paligemma_json.html_report import write_html_report
from paligemma_json.metrics import compute_metrics

ATTACKS = ["<script>alert(1)</script>", '"><img src=x onerror=alert(2)>', "</textarea><svg onload=alert(3)>"]


class PageParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.attributes, self.scripts, self.in_script = [], [], [], False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self.attributes += attrs
        self.in_script = tag == "script"
        if tag == "script":
            self.scripts.append("")

    def handle_data(self, data):
        if self.in_script:
            self.scripts[-1] += data

    def handle_endtag(self, tag):
        self.in_script = False


def hostile_rows(image_path):
    truth = {"route": "R1", "dock": "D2", "note": ATTACKS[0]}
    return [
        {"image": "a.jpg", "image_path": image_path, "suffix": json.dumps(truth),
         "prediction": json.dumps({"route": "R1", "dock": ATTACKS[1], ATTACKS[2]: "x"})},
        {"image": ATTACKS[1], "image_path": "/nowhere.jpg", "suffix": json.dumps(truth), "prediction": ATTACKS[0]},
        {"image": "c.jpg", "image_path": image_path, "suffix": json.dumps(truth), "prediction": json.dumps(truth)},
    ]


@pytest.fixture
def page(demo_assets, tmp_path):
    folder = os.path.join(demo_assets[0], "test")
    image = os.path.join(folder, json.loads(open(os.path.join(folder, "annotations.jsonl")).readline())["image"])
    rows = hostile_rows(image)
    path = tmp_path / "report.html"
    write_html_report(rows, compute_metrics(rows), str(path))
    parser = PageParser()
    parser.feed(path.read_text())
    return path, parser


def test_one_card_per_row_with_wrong_fields_marked(page):
    _, parser = page
    cards = [attrs for tag, attrs in parser.tags if tag == "div" and attrs.get("class") == "card"]
    assert [card["data-wrong"] for card in cards] == ["3", "1", "0"]  # dock wrong, note missing, one extra
    statuses = [(attrs["data-field"], attrs["data-status"]) for tag, attrs in parser.tags if "data-status" in attrs]
    assert ("dock", "wrong") in statuses and ("note", "missing") in statuses and ("route", "right") in statuses


def test_data_from_labels_and_predictions_is_escaped(page):
    path, parser = page
    assert len(parser.scripts) == 1 and "alert" not in parser.scripts[0]  # only the page's own script
    assert not [name for name, _ in parser.attributes if name.startswith("on")]
    assert not [attrs for tag, attrs in parser.tags if tag in ("svg", "textarea")
                or (tag == "img" and attrs.get("src") == "x")]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in path.read_text()


def test_the_page_fetches_nothing(page):
    path, parser = page
    for name, value in parser.attributes:
        if name in ("src", "href", "action", "srcset"):
            assert value.startswith("data:"), (name, value)
    assert "url(" not in path.read_text() and "@import" not in path.read_text()


def test_the_demo_writes_the_report(demo_run):
    output_dir, result = demo_run
    assert result.returncode == 0
    parser = PageParser()
    parser.feed(open(os.path.join(output_dir, "report.html")).read())
    assert sum(1 for tag, attrs in parser.tags if tag == "div" and attrs.get("class") == "card") == 24
    report = json.load(open(os.path.join(output_dir, "dataset_report.json")))
    assert report["rows"] == {"train": 150, "valid": 16, "test": 24} and report["leaks"]["same_photo"] == []
    assert "label tokens min/med/max" in result.stdout


def chromium_path():
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("CHROMIUM NOT INSTALLED: report.html was not rendered (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("PLAYWRIGHT NOT INSTALLED: report.html was not rendered (pip install playwright)")
    return path


@pytest.mark.parametrize("width", [1280, 390], ids=["laptop", "phone"])
def test_the_report_renders_in_headless_chromium(demo_run, width, tmp_path):
    from playwright.sync_api import sync_playwright
    executable = chromium_path()
    path = os.path.join(demo_run[0], "report.html")
    problems = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": width, "height": 900})
        page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: problems.append(str(error)))
        page.on("request", lambda request: None if request.url.startswith(("file:", "data:"))
                else problems.append(f"fetched {request.url}"))
        page.goto(f"file://{path}")
        assert page.locator(".card").count() == 24 and page.locator(".card").first.is_visible()
        assert page.evaluate("document.documentElement.scrollWidth") <= width  # no sideways scrolling
        page.check("#only-errors")
        page.select_option("#order", "wrong")
        page.select_option("#field", "route")
        shown = page.locator(".card:not(.hidden)")
        assert 0 < shown.count() <= 24
        page.screenshot(path=str(tmp_path / f"report-{width}.png"))
        browser.close()
    assert problems == []
