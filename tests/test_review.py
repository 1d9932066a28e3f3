"""review.html: one file that fetches nothing, whose data cannot break out of its JSON block, and
in a real browser: flagged fields first, typed edits, rows deleted and added, a prediction fixed as
text, the export byte-equal to Python's json.dumps in the labels' layout, and every edit still there
after a reload."""

import base64
import contextlib
import io
import json
import random

import pytest
from PIL import Image

from paligemma_json.confidence import leaf_spans
from paligemma_json.demo import make_manifest
from paligemma_json.review import write_review_page
from paligemma_json.schema import infer_schema, with_layout
from helpers import PageParser, collect_problems, launch_chromium, new_documents, run_script

PROMPT = "extract data in JSON format"
THRESHOLD = 0.5
RUN_KEY = "/runs/manifests-7"
HOSTILE_IMAGE = '"><img src=x onerror=alert(3)>.jpg'
ON_HOLD = {"dock": None}  # one label without a dock: the inferred schema lets dock be null


def data_block(parser):
    """The page's data: the first script, the JSON one."""
    return json.loads(parser.scripts[0])


def page_from(tmp_path, rows, schema):
    path = tmp_path / "review.html"
    write_review_page(rows, str(path), threshold=THRESHOLD, schema=schema, run_key=RUN_KEY, source_dir=str(tmp_path))
    parser = PageParser()
    parser.feed(path.read_text(encoding="utf-8"))
    return path, parser


def confidences(text: str, low: dict) -> list[dict]:
    """What --predict writes for `text`: each leaf with its pointer, the pointers in `low` at their
    given confidence, every other at 0.95."""
    return [{"field": field, "value": value, "confidence": low.get(pointer, 0.95), "pointer": pointer}
            for field, value, _, _, pointer in leaf_spans(text)]


def manifests():
    """Five predicted manifests: two to fix, one cut off, one hostile, one with non-ASCII text."""
    records = [make_manifest(random.Random(k)) for k in range(5)]
    records[3].update(salesman="<img src=x onerror=alert(1)>", destination="</script><script>alert(2)</script>")
    records[4]["destination"] = "Zürich DC 😀"
    return records


@pytest.fixture
def review(tmp_path):
    """(path, rows, records, schema, layout) for a page over five predicted manifests."""
    records = manifests()
    for k in (0, 1, 2, 4):
        Image.new("RGB", (1400, 1000) if k == 0 else (300, 400), (200, 180 + 10 * k, 120)).save(tmp_path / f"m{k}.jpg")
    names = ["m0.jpg", "m1.jpg", "m2.jpg", HOSTILE_IMAGE, "m4.jpg"]
    low = [{"/salesman": 0.31, "/products/1/cases": 0.42},
           {"/products/0/description": 0.2, "/products/1/layers": 0.3, "/total_cases": 0.45},
           {}, {"/salesman": 0.1}, {}]
    texts = [json.dumps(record) for record in records]
    texts[2] = texts[2][:150]  # cut off at MAX_NEW_TOKENS
    labels = records + [{**records[0], **ON_HOLD}]
    layout = (", ", ": ")
    schema = with_layout(infer_schema(labels), [json.dumps(label, separators=layout) for label in labels])
    rows = [{"image": name, "image_path": str(tmp_path / name), "prefix": PROMPT, "prediction": text,
             "truncated": k == 2, "confidence": confidences(text, low[k]) if k != 2 else [], "parsed": k != 2}
            for k, (name, text) in enumerate(zip(names, texts))]
    path, _ = page_from(tmp_path, rows, schema)
    return path, rows, records, schema, layout


# --- Without a browser -------------------------------------------------------------------------

def test_the_page_is_one_file_that_fetches_nothing(review):
    path = review[0]
    parser = PageParser()
    parser.feed(path.read_text(encoding="utf-8"))
    for name, value in parser.attributes:
        if name in ("src", "href", "action", "srcset", "poster"):
            assert value.startswith("data:"), (name, value)
    text = path.read_text(encoding="utf-8")
    assert "http:" not in text and "https:" not in text and "url(" not in text and "@import" not in text
    assert [tag for tag, _ in parser.tags if tag in ("link", "iframe", "object", "embed")] == []
    assert [attrs.get("type") for tag, attrs in parser.tags if tag == "script"] == ["application/json", None]


def test_hostile_text_cannot_leave_the_data_block(tmp_path):
    attacks = ["</script><script>alert(1)</script>", "<!--<script>", '"><img src=x onerror=alert(2)>', "&lt;b&gt;"]
    rows = [{"image": attack, "image_path": None, "prefix": attack, "prediction": json.dumps({"note": attack}) + attack,
             "truncated": False, "confidence": [], "parsed": False} for attack in attacks]
    path, parser = page_from(tmp_path, rows, None)
    assert len(parser.scripts) == 2 and "alert" not in parser.scripts[1]  # the data, then the page's own script
    assert [row["prediction"] for row in data_block(parser)["documents"]] == [row["prediction"] for row in rows]
    assert [attrs for tag, attrs in parser.tags if tag == "img"] == [{"alt": "the photo at full size"}]  # the zoom's, empty
    assert not [name for name, _ in parser.attributes if name.startswith("on")]
    assert "<" not in parser.scripts[0] and ">" not in parser.scripts[0] and "&" not in parser.scripts[0]


def test_the_embedded_data_round_trips(review):
    path, rows, _, schema, _ = review
    parser = PageParser()
    parser.feed(path.read_text(encoding="utf-8"))
    data = data_block(parser)
    assert (data["run_key"], data["threshold"], data["layout"]) == (RUN_KEY, THRESHOLD, [", ", ": "])
    assert data["schema"] == {key: value for key, value in schema.items() if key != "$schema"}
    assert [(d["image"], d["prefix"], d["prediction"], d["truncated"]) for d in data["documents"]] == [
        (row["image"], row["prefix"], row["prediction"], row["truncated"]) for row in rows]
    assert [d["flags"] for d in data["documents"]] == [
        {"/salesman": 0.31, "/products/1/cases": 0.42},
        {"/products/0/description": 0.2, "/products/1/layers": 0.3, "/total_cases": 0.45}, {}, {"/salesman": 0.1}, {}]
    photo = Image.open(io.BytesIO(base64.b64decode(data["documents"][0]["photo"].split(",", 1)[1])))
    assert photo.size == (1024, 731)  # 1400 × 1000 fitted into 1024: readable, not the report's 360
    assert data["documents"][3]["photo"] is None  # no such image: the page says so


@pytest.mark.parametrize("guidance, layout", [(None, [", ", ": "]), ({"whitespace_pattern": "[ ]{0,4}"}, [", ", ": "]),
                                              ({"item_separator": ",", "key_separator": ":"}, [",", ":"])])
def test_the_export_layout_is_the_labels(tmp_path, guidance, layout):
    schema = {"type": "object"} if guidance is None else {"type": "object", "x-guidance": guidance}
    rows = [{"image": "a.jpg", "image_path": None, "prefix": PROMPT, "prediction": "{}", "confidence": []}]
    assert data_block(page_from(tmp_path, rows, schema)[1])["layout"] == layout
    assert data_block(page_from(tmp_path, rows, None)[1])["layout"] == [", ", ": "]


# --- In headless Chromium ------------------------------------------------------------------------

@contextlib.contextmanager
def review_page(executable, path):
    """(context, page, problems) as test_html_report's `opened`, plus any dialog (an alert from a
    prediction would be one) in `problems`, and one browser context, so localStorage outlives a
    reload."""
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright, executable)
        context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
        page = context.new_page()
        problems = collect_problems(page, local=("file:", "data:", "blob:"))  # blob: the export's download
        page.on("dialog", lambda dialog: (problems.append(f"dialog: {dialog.message}"), dialog.dismiss()))
        page.goto(f"file://{path}")
        yield page, problems
        browser.close()


def card(page, index):
    return page.locator(f'section.card[data-index="{index}"]')


def field(page, index, pointer, where="all-fields"):
    return card(page, index).locator(f'.{where} .field[data-pointer="{pointer}"] .value')


def flagged(page, index):
    return card(page, index).locator(".flagged-list .field").evaluate_all("rows => rows.map(row => row.dataset.pointer)")


def exported(page) -> bytes:
    with page.expect_download() as info:
        page.click("#export")
    assert info.value.suggested_filename == "corrections.jsonl"
    with open(info.value.path(), "rb") as file:
        return file.read()


def test_edits_export_as_python_writes_them_and_survive_a_reload(chromium, review, tmp_path):
    path, rows, records, _, layout = review
    expected = [json.loads(json.dumps(record)) for record in records]
    with review_page(chromium, path) as (page, problems):
        assert page.locator("section.card").count() == 5
        assert page.text_content("#status") == "0 of 5 documents reviewed · 6 of 6 flagged fields untouched"
        assert flagged(page, 0) == ["/salesman", "/products/1/cases"]  # in document order, the rest hidden
        assert card(page, 0).locator(".all-fields").is_hidden() and card(page, 2).locator("textarea").is_visible()
        assert str(tmp_path / "corrections.jsonl") in page.text_content(".help")
        assert page.evaluate("document.querySelector('section.card img').naturalWidth") == 1024
        card(page, 0).locator("img").click()
        assert page.locator("#zoom").is_visible()
        page.keyboard.press("Escape")
        assert page.locator("#zoom").is_hidden()

        # Document 0: a flagged string, a flagged number (first not a number: blocked), a field emptied.
        field(page, 0, "/salesman", "flagged-list").fill("Ana Müller")
        field(page, 0, "/products/1/cases", "flagged-list").fill("1 7")
        card(page, 0).locator(".reviewed").check()
        assert "products › #2 › cases: \"1 7\" is not a number" in page.text_content("#blocked")
        assert page.text_content("#export").startswith("Export 0 ")
        field(page, 0, "/products/1/cases", "flagged-list").fill("17")
        card(page, 0).locator(".show-all").check()
        assert field(page, 0, "/products/1/cases").input_value() == "17"  # the same value in both lists
        field(page, 0, "/dock").fill("")  # emptied: null, which the schema allows here
        expected[0].update(salesman="Ana Müller", dock=None)
        expected[0]["products"][1]["cases"] = 17

        # Document 1: its first line item deleted (its flag goes, the next row's moves up), a row added.
        card(page, 1).locator(".show-all").check()
        card(page, 1).locator('.item[data-pointer="/products/0"] .delete-row').first.click()
        assert flagged(page, 1) == ["/products/0/layers", "/total_cases"]
        card(page, 1).locator(".add-row").click()
        new = len(expected[1]["products"]) - 1
        for key, typed in [("description", "Sparkling Water 6x1L"), ("cases", "3"), ("sales_units", "18"), ("layers", "1")]:
            field(page, 1, f"/products/{new}/{key}").fill(typed)
        expected[1]["products"] = expected[1]["products"][1:] + [
            {"description": "Sparkling Water 6x1L", "cases": 3, "sales_units": 18, "layers": 1}]
        card(page, 1).locator(".reviewed").check()

        # Document 2, cut off: blocked until fixed as text (typed indented: exported in the labels' layout).
        card(page, 2).locator(".reviewed").check()
        assert "not exported: m2.jpg: its JSON text does not parse" in page.text_content("#blocked")
        card(page, 2).locator("textarea").fill(json.dumps(records[2], indent=2))
        assert page.text_content("#blocked") == ""
        for index in (3, 4):  # the hostile one and the one in Zürich, unchanged
            card(page, index).locator(".reviewed").check()

        # The hostile text is text: in the title, in its field, and exported as it came.
        assert card(page, 3).locator("h2").text_content() == HOSTILE_IMAGE
        assert field(page, 3, "/salesman", "flagged-list").input_value() == "<img src=x onerror=alert(1)>"
        assert page.locator('img[src="x"]').count() == 0 and page.locator("section.card img").count() == 4

        status = "5 of 5 documents reviewed · 3 of 5 flagged fields untouched"
        assert page.text_content("#status") == status
        lines = [json.dumps({"image": row["image"], "prefix": PROMPT, "suffix": json.dumps(value, separators=layout)})
                 for row, value in zip(rows, expected)]
        first = exported(page)
        assert first.decode("ascii").splitlines() == lines  # row by row, byte for byte
        assert first == ("\n".join(lines) + "\n").encode()

        page.reload()
        assert page.evaluate("Object.keys(localStorage)") == ["paligemma-json-review:" + RUN_KEY]
        assert page.text_content("#status") == status
        assert field(page, 0, "/salesman", "flagged-list").input_value() == "Ana Müller"
        assert field(page, 0, "/dock").input_value() == "" and field(page, 0, "/products/1/cases").input_value() == "17"
        assert card(page, 1).locator(".all-fields .item").count() == len(expected[1]["products"])
        assert all(card(page, index).locator(".reviewed").is_checked() for index in range(5))
        assert exported(page) == first

        # Predicted again, document 0 reads differently: its old edits do not apply, the others' do.
        changed = {**records[0], "route": "R000"}
        write_review_page([{**rows[0], "prediction": json.dumps(changed)}, *rows[1:]], str(path), threshold=THRESHOLD,
                          schema=review[3], run_key=RUN_KEY, source_dir=str(tmp_path))
        page.reload()
        assert field(page, 0, "/salesman", "flagged-list").input_value() == records[0]["salesman"]
        assert not card(page, 0).locator(".reviewed").is_checked() and card(page, 1).locator(".reviewed").is_checked()
        card(page, 4).locator(".show-raw").check()  # any document opens as text too, readably indented
        assert json.loads(card(page, 4).locator("textarea").input_value()) == records[4]
    assert problems == []


def test_the_page_writes_numbers_and_strings_as_python_does(chromium, tmp_path):
    path, _ = page_from(tmp_path, [], None)
    numbers = ["0", "-0", "12", "1.0", "2.50", "-0.0", "1e5", "1E-7", "0.1", "1e16", "1.5e16", "123456789012345.6",
               "1e-4", "1e-5", "-3.25e2", "1e308", "5e-324", "9007199254740993", "123456789012345678901234567890"]
    strings = ["plain", 'quo"te \\ /', "tab\tnew\nline\r\b\f", "\x00\x1f\x7f", "Zürich", "😀 ✓", "\u2028", "e\u0301"]
    with review_page(chromium, path) as (page, problems):
        assert page.evaluate("texts => texts.map(pyNumber)", numbers) == [json.dumps(json.loads(text)) for text in numbers]
        assert page.evaluate("texts => texts.map(pyString)", strings) == [json.dumps(text) for text in strings]
        assert page.evaluate("['01', '1.', '.5', '+1', '1e400', 'NaN', '1 2'].map(pyNumber)") == [None] * 7
        text = '{"a": [1, 2.0, {"b": null, "b2": true}], "c": "\\u00fc", "a": "again"}'  # a repeated key, as Python keeps it
        assert page.evaluate("text => dumps(parseDocument(text), {item: ',', key: ':'})", text) == \
            json.dumps(json.loads(text), separators=(",", ":"))
    assert problems == []


def test_the_loop_on_the_demo_predict_review_export_and_train_on_it(chromium, demo_run, demo_assets, tmp_path):
    """The README's three commands on the demo's model: --predict on new pages writes review.html; in
    the browser a flagged string and a number are corrected, a line item deleted, two pages marked
    reviewed, the export saved where the page says; the next run's train split takes those rows."""
    import finetune_paligemma2 as flow
    from paligemma_json.corrections import add_corrections
    folder = str(tmp_path / "new-pages")
    new_documents(folder, count=3)
    result = run_script("--output-dir", demo_run[0], "--predict", folder)
    assert result.returncode == 0, result.stderr[-2000:]
    page_path = f"{demo_run[0]}/review.html"
    assert f"review: open {page_path} in a browser" in result.stdout
    rows = [json.loads(line) for line in open(f"{demo_run[0]}/predict.jsonl")]
    parsed = [index for index, row in enumerate(rows) if row["parsed"]]
    assert len(parsed) >= 2, "the demo model writes valid JSON under the constraint"
    first, second = parsed[:2]
    value = json.loads(rows[first]["prediction"])
    with review_page(chromium, page_path) as (page, problems):
        flags = flagged(page, first)
        assert flags, "the demo model is unsure of most fields: some are flagged"
        card(page, first).locator(".show-all").check()
        field(page, first, "/salesman").fill("Ana Müller")
        field(page, first, "/pallet_number").fill("7")
        card(page, first).locator('.item[data-pointer="/products/0"] .delete-row').first.click()
        card(page, first).locator(".reviewed").check()
        card(page, second).locator(".reviewed").check()
        export = exported(page)
        page.reload()  # the edits and marks are still there, and export the same bytes
        assert field(page, first, "/salesman").input_value() == "Ana Müller"
        assert exported(page) == export
    assert problems == []
    value.update(salesman="Ana Müller", pallet_number=7)
    value["products"] = value["products"][1:]
    lines = [json.loads(line) for line in export.decode("ascii").splitlines()]
    assert [line["image"] for line in lines] == [rows[first]["image"], rows[second]["image"]]
    assert json.loads(lines[0]["suffix"]) == value and lines[0]["suffix"] == json.dumps(value)
    assert lines[1]["suffix"] == json.dumps(json.loads(rows[second]["prediction"]))
    (tmp_path / "new-pages" / "corrections.jsonl").write_bytes(export)  # where the page says to save it
    splits = flow.load_splits(demo_assets[0], PROMPT)
    before = len(splits["train"])
    assert add_corrections(splits, f"{folder}/corrections.jsonl", PROMPT) == 2
    assert splits["train"][before][1]["suffix"] == lines[0]["suffix"]
