"""report.html: one card per test row, wrong fields marked, data escaped, nothing fetched, and it
renders in a real browser."""

import base64
import contextlib
import io
import json
import os

import pytest
from PIL import Image

from helpers import PageParser, collect_problems, launch_chromium
from paligemma_json.html_report import thumbnail_data_uri, write_html_report
from paligemma_json.metrics import compute_metrics, score_rows
from paligemma_json.pictures import THUMB_SIZE, _thumbnail_or_placeholder

ATTACKS = ["<script>alert(1)</script>", '"><img src=x onerror=alert(2)>', "</textarea><svg onload=alert(3)>"]


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
    write_html_report(score_rows(rows), compute_metrics(rows), str(path))
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


def test_thumbnails_fit_their_square_in_rgb_or_stand_in_for_a_missing_image(tmp_path):
    path = str(tmp_path / "page.png")
    Image.new("L", (520, 660), 90).save(path)  # a grey scan: shown in RGB
    in_page = Image.open(io.BytesIO(base64.b64decode(thumbnail_data_uri(path).split(",", 1)[1])))
    in_picture = _thumbnail_or_placeholder(path)
    assert (in_page.size, in_page.mode) == ((284, 360), "RGB")  # 520 × 660 fitted into 360 × 360
    assert (in_picture.size, in_picture.mode) == ((236, THUMB_SIZE), "RGB")
    assert thumbnail_data_uri(str(tmp_path / "gone.png")) is None  # the page says "(image not found)"
    assert _thumbnail_or_placeholder(str(tmp_path / "gone.png")).size == (THUMB_SIZE, THUMB_SIZE)


def test_the_demo_writes_the_report(demo_run):
    output_dir, result = demo_run
    assert result.returncode == 0
    parser = PageParser()
    parser.feed(open(os.path.join(output_dir, "report.html")).read())
    assert sum(1 for tag, attrs in parser.tags if tag == "div" and attrs.get("class") == "card") == 24
    report = json.load(open(os.path.join(output_dir, "dataset_report.json")))
    assert report["rows"] == {"train": 150, "valid": 16, "test": 24} and report["leaks"]["same_photo"] == []
    assert "label tokens min/med/max" in result.stdout


@contextlib.contextmanager
def opened(executable, path, width=1280):
    """(page, problems): the report in headless chromium, with every console error, page error and
    request for anything but the file itself or a data: URI collected in `problems`."""
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright, executable)
        page = browser.new_page(viewport={"width": width, "height": 900})
        problems = collect_problems(page)
        page.goto(f"file://{path}")
        yield page, problems
        browser.close()


def shown_cards(page):
    """The rows (data-index) of the cards on show, top to bottom."""
    return page.eval_on_selector_all(".card:not(.hidden)", "cards => cards.map(card => Number(card.dataset.index))")


def shown_fields(page, index):
    return page.eval_on_selector_all(f'.card[data-index="{index}"] tr[data-field]:not(.hidden)',
                                     "rows => rows.map(row => row.dataset.field)")


def test_each_filter_shows_what_it_must(chromium, tmp_path):
    truth = {"route": "R1", "dock": "D2", "total": 5}
    predictions = [truth,                                  # 0: right
                   {**truth, "route": "R9"},               # 1: route wrong
                   {"route": "R1", "dock": "D7"},          # 2: dock wrong, total missing
                   '{"route": "R1", "do',                  # 3: not JSON: no field rows at all
                   {**truth, "note": "x"}]                 # 4: one extra field
    rows = [{"image": f"{n}.jpg", "image_path": "/nowhere.jpg", "suffix": json.dumps(truth),
             "prediction": p if isinstance(p, str) else json.dumps(p)} for n, p in enumerate(predictions)]
    path = tmp_path / "report.html"
    write_html_report(score_rows(rows), compute_metrics(rows), str(path))
    with opened(chromium, path) as (page, problems):
        assert shown_cards(page) == [0, 1, 2, 3, 4]
        page.check("#only-errors")
        assert shown_cards(page) == [1, 2, 3, 4]
        page.select_option("#order", "wrong")
        assert shown_cards(page) == [2, 1, 3, 4]  # most wrong first, then as in the dataset
        page.select_option("#field", "route")
        assert shown_cards(page) == [1] and shown_fields(page, 1) == ["route"]  # route wrong, its row alone
        page.uncheck("#only-errors")
        assert shown_cards(page) == [2, 1, 4, 0]  # every card with a route, showing its route alone
        assert all(shown_fields(page, index) == ["route"] for index in (2, 1, 4, 0))
        page.select_option("#field", "")
        page.select_option("#order", "index")
        assert shown_cards(page) == [0, 1, 2, 3, 4]
        assert shown_fields(page, 2) == ["dock", "route", "total"]  # every field again, keys sorted as Donut does
    assert problems == []


@pytest.mark.parametrize("width", [1280, 390], ids=["laptop", "phone"])
def test_the_report_renders_in_headless_chromium(chromium, demo_run, width, tmp_path):
    output_dir = demo_run[0]
    rows = [json.loads(line) for line in open(os.path.join(output_dir, "predictions.jsonl"))]
    statuses = [row.statuses for row in score_rows(rows)]
    wrong = [sum(status != "right" for status, *_ in row) for row in statuses]  # every prediction parses here
    route_wrong = {index for index, row in enumerate(statuses)
                   if any(key == "route" and status != "right" for status, key, *_ in row)}
    with opened(chromium, os.path.join(output_dir, "report.html"), width) as (page, problems):
        assert page.locator(".card").count() == 24 and page.locator(".card").first.is_visible()
        assert page.evaluate("document.documentElement.scrollWidth") <= width  # no sideways scrolling
        page.check("#only-errors")
        with_errors = [index for index in range(24) if wrong[index]]
        assert shown_cards(page) == with_errors
        page.select_option("#order", "wrong")
        assert shown_cards(page) == sorted(with_errors, key=lambda index: (-wrong[index], index))
        page.select_option("#field", "route")
        assert shown_cards(page) == [index for index in sorted(with_errors, key=lambda index: (-wrong[index], index))
                                     if index in route_wrong]
        assert all(shown_fields(page, index) == ["route"] for index in route_wrong)
        page.screenshot(path=str(tmp_path / f"report-{width}.png"))
    assert problems == []
