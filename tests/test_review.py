"""review.html: one file that fetches nothing, whose data cannot break out of its JSON block, and
in a real browser: flagged fields first, typed edits, rows deleted and added, a prediction fixed as
text, the export byte-equal to Python's json.dumps in the labels' layout, and every edit still there
after a reload. A backlog: the documents that most need a look first, in pages of a bounded size
under an index, each page exporting its own file, and the next run taking two pages' exports."""

import base64
import contextlib
import io
import json
import os
import random
import re
import shutil

import pytest
from PIL import Image

from paligemma_json.confidence import leaf_spans
from paligemma_json.demo import make_manifest
from paligemma_json.review import PAGE_OWN_BYTES, PAGE_SIZE, PHOTO_BOX, PHOTO_BYTES, review_order, write_review
from paligemma_json.schema import infer_schema, with_layout
from helpers import PageParser, collect_problems, launch_chromium, run_script

PROMPT = "extract data in JSON format"
THRESHOLD = 0.5
HOSTILE_IMAGE = '"><img src=x onerror=alert(3)>.jpg'
ON_HOLD = {"dock": None}  # one label without a dock: the inferred schema lets dock be null
SHOWN = [2, 1, 0, 3, 4]  # the fixture's rows as the page shows them: cut off, then 3, 2, 1 and 0 fields flagged


def data_block(parser):
    """The page's data: the first script, the JSON one."""
    return json.loads(parser.scripts[0])


def write_predictions(folder, rows) -> str:
    """`rows` as --predict writes them, in `folder`/predict.jsonl."""
    path = os.path.join(folder, "predict.jsonl")
    with open(path, "w") as out:
        out.writelines(json.dumps(row) + "\n" for row in rows)
    return path


def page_from(tmp_path, rows, schema):
    """The review of `rows` (few: one page, review.html) and its parsed HTML."""
    write_review(write_predictions(tmp_path, rows), str(tmp_path), threshold=THRESHOLD, schema=schema,
                 source_dir=str(tmp_path))
    path = tmp_path / "review.html"
    parser = PageParser()
    parser.feed(path.read_text(encoding="utf-8"))
    return path, parser


def run_key(tmp_path) -> str:
    return str(tmp_path / "predict.jsonl")


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
    assert (data["run_key"], data["threshold"], data["layout"]) == (str(path.parent / "predict.jsonl"), THRESHOLD,
                                                                    [", ", ": "])
    assert (data["export_name"], data["folder"]) == ("corrections-review.jsonl", str(path.parent))
    assert data["schema"] == {key: value for key, value in schema.items() if key != "$schema"}
    assert [(d["row"], d["image"], d["prefix"], d["prediction"], d["truncated"]) for d in data["documents"]] == [
        (k, rows[k]["image"], rows[k]["prefix"], rows[k]["prediction"], rows[k]["truncated"]) for k in SHOWN]
    assert [d["flags"] for d in data["documents"]] == [
        {}, {"/products/0/description": 0.2, "/products/1/layers": 0.3, "/total_cases": 0.45},
        {"/salesman": 0.31, "/products/1/cases": 0.42}, {"/salesman": 0.1}, {}]
    photo = Image.open(io.BytesIO(base64.b64decode(data["documents"][2]["photo"].split(",", 1)[1])))
    assert photo.size == (640, 457)  # 1400 × 1000 fitted into the page's 640 px; the file is a click away
    assert data["documents"][2]["full"] == "m0.jpg" and data["documents"][3]["full"] is None
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


def exported(page, name="corrections-review.jsonl") -> bytes:
    with page.expect_download() as info:
        page.click("#export")
    assert info.value.suggested_filename == name
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
        assert "corrections-review.jsonl" in page.text_content(".help") and str(tmp_path) in page.text_content(".help")
        assert page.locator("section.card").evaluate_all("cards => cards.map(card => Number(card.dataset.index))") == SHOWN
        assert card(page, 0).locator("img").evaluate("img => img.naturalWidth") == 640
        card(page, 0).locator("img").click()  # the full image, from its file
        assert page.locator("#zoom").is_visible()
        page.wait_for_function("document.querySelector('#zoom img').complete")
        assert page.evaluate("document.querySelector('#zoom img').naturalWidth") == 1400
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
        lines = [json.dumps({"image": rows[k]["image"], "prefix": PROMPT, "suffix": json.dumps(expected[k], separators=layout),
                             "folder": str(tmp_path)}) for k in SHOWN]
        first = exported(page)
        assert first.decode("ascii").splitlines() == lines  # row by row, byte for byte
        assert first == ("\n".join(lines) + "\n").encode()

        page.reload()
        assert page.evaluate("Object.keys(localStorage)") == ["paligemma-json-review:" + run_key(tmp_path)]
        assert page.text_content("#status") == status
        assert field(page, 0, "/salesman", "flagged-list").input_value() == "Ana Müller"
        assert field(page, 0, "/dock").input_value() == "" and field(page, 0, "/products/1/cases").input_value() == "17"
        assert card(page, 1).locator(".all-fields .item").count() == len(expected[1]["products"])
        assert all(card(page, index).locator(".reviewed").is_checked() for index in range(5))
        assert exported(page) == first

        # Predicted again, document 0 reads differently: its old edits do not apply, the others' do.
        changed = {**records[0], "route": "R000"}
        write_review(write_predictions(tmp_path, [{**rows[0], "prediction": json.dumps(changed)}, *rows[1:]]),
                     str(tmp_path), threshold=THRESHOLD, schema=review[3], source_dir=str(tmp_path))
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
    """The README's three commands on the demo's model: --predict on the new pages the demo left, with
    one of its test photos among them (renamed), writes review.html, which marks that photo held out
    before anything is edited; in the browser a flagged string and a number are corrected, a line item
    deleted, two pages marked reviewed, the export saved in another folder, as a browser's download is;
    the next run's train split takes those rows, their photos found in the folder the export carries."""
    import finetune_paligemma2 as flow
    from paligemma_json.corrections import add_corrections
    folder = str(tmp_path / "new-pages")
    shutil.copytree(os.path.join(demo_run[0], "demo-new-pages"), folder)
    assert len(os.listdir(folder)) == 6  # the demo's own new pages: --predict has something to read
    test_split = os.path.join(demo_run[0], "demo-dataset", "test")
    test_photo = json.loads(open(os.path.join(test_split, "annotations.jsonl")).readline())["image"]
    shutil.copy(os.path.join(test_split, test_photo), os.path.join(folder, "scan-7.jpg"))
    result = run_script("--output-dir", demo_run[0], "--predict", folder)
    assert result.returncode == 0, result.stderr[-2000:]
    page_path = f"{demo_run[0]}/review.html"
    assert f"review: open {page_path} in a browser" in result.stdout
    rows = [json.loads(line) for line in open(f"{demo_run[0]}/predict.jsonl")]
    assert {row["image"]: row.get("held_out") for row in rows if row.get("held_out")} == {
        "scan-7.jpg": f"test's {test_photo}"}  # found by its hash, whatever its name
    held = next(index for index, row in enumerate(rows) if row.get("held_out"))
    parsed = [index for index, row in enumerate(rows) if row["parsed"] and index != held]
    assert len(parsed) >= 2, "the demo model writes valid JSON under the constraint"
    first, second = parsed[:2]
    value = json.loads(rows[first]["prediction"])
    with review_page(chromium, page_path) as (page, problems):
        assert f"held out: test's {test_photo}" in card(page, held).locator(".held-out").text_content()
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
    lines = {line["image"]: line for line in map(json.loads, export.decode("ascii").splitlines())}
    assert sorted(lines) == sorted([rows[first]["image"], rows[second]["image"]])  # in the page's order
    assert {line["folder"] for line in lines.values()} == {folder}
    assert json.loads(lines[rows[first]["image"]]["suffix"]) == value
    assert lines[rows[first]["image"]]["suffix"] == json.dumps(value)
    assert lines[rows[second]["image"]]["suffix"] == json.dumps(json.loads(rows[second]["prediction"]))
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / "corrections-review.jsonl").write_bytes(export)
    splits = flow.load_splits(demo_assets[0], PROMPT)
    before = len(splits["train"])
    assert add_corrections(splits, [str(tmp_path / "downloads" / "corrections-review.jsonl")], PROMPT) == 2
    assert {entry["image"]: entry["suffix"] for entry in splits["train"].entries[before:]} == {
        os.path.join(folder, image): line["suffix"] for image, line in lines.items()}


# --- A backlog: ordered, paged, bounded --------------------------------------------------------

UNREADABLE = {7: "empty file (0 bytes)", 130: "cannot identify image file", 249: "image file is truncated"}
HELD_OUT = 11  # a photo the trained run held out: shown, never exported


def backlog(folder, count=250) -> list[dict]:
    """`count` rows as --predict writes them over small generated photos in `folder`/photos: three
    unreadable, one held out, every 50th cut off, the rest with 0 to 6 fields below THRESHOLD (at
    random confidences), written to `folder`/predict.jsonl."""
    rng, photos = random.Random(5), os.path.join(folder, "photos")
    os.makedirs(photos)
    rows = []
    for k in range(count):
        name = f"doc-{k:04d}.jpg"
        path = os.path.join(photos, name)
        row = {"image": name, "image_path": path, "prefix": PROMPT, "truncated": False}
        if k in UNREADABLE:
            open(path, "wb").close()
            rows.append({**row, "prediction": "", "confidence": [], "parsed": False, "unreadable": UNREADABLE[k]})
            continue
        Image.new("RGB", (48, 64), (rng.randrange(256), 200, 120)).save(path)
        text = json.dumps(make_manifest(random.Random(k)))
        if k % 50 == 3:
            rows.append({**row, "prediction": text[:120], "truncated": True, "confidence": [], "parsed": False})
            continue
        pointers = [pointer for *_, pointer in leaf_spans(text)]
        flagged = 6 if k == HELD_OUT else rng.randrange(7)  # the held-out one on page 1
        low = {pointer: rng.uniform(0.05, THRESHOLD - 0.01) for pointer in rng.sample(pointers, flagged)}
        rows.append({**row, "prediction": text, "confidence": confidences(text, low), "parsed": True,
                     **({"held_out": "test's IMG_0014.jpg"} if k == HELD_OUT else {})})
    write_predictions(folder, rows)
    return rows


def most_needed_first(rows) -> list[int]:
    """The promised order: unreadable files, predictions that are not JSON or were cut off, then the
    most flagged fields (ties: the lowest confidence), then nothing flagged; the folder's order last."""
    def need(k):
        row = rows[k]
        flags = [field["confidence"] for field in row["confidence"] if field["confidence"] < THRESHOLD]
        kind = 0 if "unreadable" in row else 1 if not row["parsed"] else 2 if flags else 3
        return kind, -len(flags), min(flags, default=1.0), k
    return sorted(range(len(rows)), key=need)


def pages_of(folder) -> dict:
    """Each review page's name and data, in name order."""
    pages = {}
    for name in sorted(os.listdir(folder)):
        if re.fullmatch(r"review-\d+\.html", name):
            parser = PageParser()
            parser.feed(open(os.path.join(folder, name), encoding="utf-8").read())
            pages[name] = data_block(parser)
    return pages


def page_bound(folder, name, rows) -> int:
    """The stated bound: the page's own bytes, the photos' folder (in its help and data), and per
    document its photo, its predict.jsonl line six times (the escapes at worst) and its link's paths."""
    documents = pages_of(folder)[name]["documents"]
    lines = [len(json.dumps(rows[document["row"]])) + 1 for document in documents]
    links = [3 * (len(os.path.abspath(rows[document["row"]]["image_path"])) + len(os.path.abspath(folder)))
             for document in documents]
    return (PAGE_OWN_BYTES + 12 * len(os.path.abspath(os.path.join(folder, "photos")))
            + sum(PHOTO_BYTES + 6 * line + link + 200 for line, link in zip(lines, links)))


def test_a_backlog_is_paged_most_needed_first_under_an_index(tmp_path):
    rows = backlog(str(tmp_path))
    said = write_review(str(tmp_path / "predict.jsonl"), str(tmp_path), threshold=THRESHOLD, schema=None,
                        source_dir=str(tmp_path / "photos"))
    assert said.startswith(f"review: open {tmp_path}/review.html in a browser (3 pages of up to 100 documents")
    pages = pages_of(tmp_path)
    assert list(pages) == ["review-001.html", "review-002.html", "review-003.html"]
    assert [len(page["documents"]) for page in pages.values()] == [PAGE_SIZE, PAGE_SIZE, 50]
    shown = [document["row"] for page in pages.values() for document in page["documents"]]
    assert shown == most_needed_first(rows)
    assert shown[:3] == sorted(UNREADABLE)  # always shown, first, with their reason
    assert [(d["unreadable"], d["photo"]) for d in pages["review-001.html"]["documents"][:3]] == [
        (UNREADABLE[k], None) for k in sorted(UNREADABLE)]
    assert [page["export_name"] for page in pages.values()] == [f"corrections-review-00{k}.jsonl" for k in (1, 2, 3)]
    held = [d for page in pages.values() for d in page["documents"] if d.get("held_out")]
    assert [(d["row"], d["held_out"]) for d in held] == [(HELD_OUT, "test's IMG_0014.jpg")]
    index = (tmp_path / "review.html").read_text(encoding="utf-8")
    assert re.findall(r'<a href="([^"]+)">', index) == list(pages)
    assert "<script" not in index and "data:" not in index
    for name in pages:
        assert os.path.getsize(tmp_path / name) <= page_bound(str(tmp_path), name, rows), name

    # Fewer documents the next time: review.html is the one page, and the earlier pages are gone.
    write_predictions(str(tmp_path), rows[:40])
    write_review(str(tmp_path / "predict.jsonl"), str(tmp_path), threshold=THRESHOLD, schema=None,
                 source_dir=str(tmp_path / "photos"))
    assert sorted(name for name in os.listdir(tmp_path) if name.endswith(".html")) == ["review.html"]
    parser = PageParser()
    parser.feed((tmp_path / "review.html").read_text(encoding="utf-8"))
    assert [d["row"] for d in data_block(parser)["documents"]] == most_needed_first(rows[:40])


def test_a_page_of_large_noisy_photos_holds_its_size_bound(tmp_path):
    """Noise is JPEG's worst case: each photo still fits PHOTO_BOX and PHOTO_BYTES, so each page fits
    the stated bound; a large plain scan is fitted into the box; the full image stays one click away."""
    rng = random.Random(3)
    os.makedirs(tmp_path / "photos")
    rows = []
    for k in range(7):
        path = str(tmp_path / "photos" / f"scan-{k}.png")
        plain = Image.new("RGB", (2000, 3000), (230, 228, 220))  # compresses to little: only the box shrinks it
        (plain if k == 6 else Image.frombytes("RGB", (900, 1400), rng.randbytes(900 * 1400 * 3))).save(
            path, compress_level=0 if k < 6 else 6)
        text = json.dumps(make_manifest(random.Random(k)))
        rows.append({"image": f"scan-{k}.png", "image_path": path, "prefix": PROMPT, "prediction": text,
                     "truncated": False, "confidence": confidences(text, {}), "parsed": True})
    write_review(write_predictions(str(tmp_path), rows), str(tmp_path), threshold=THRESHOLD, schema=None,
                 source_dir=str(tmp_path / "photos"), page_size=4)
    pages = pages_of(tmp_path)
    assert [len(page["documents"]) for page in pages.values()] == [4, 3]
    for name, page in pages.items():
        for document in page["documents"]:
            assert len(document["photo"]) <= PHOTO_BYTES
            photo = Image.open(io.BytesIO(base64.b64decode(document["photo"].split(",", 1)[1])))
            assert photo.width <= PHOTO_BOX[0] and photo.height <= PHOTO_BOX[1]
            if document["image"] == "scan-6.png":
                assert photo.size == (640, 960)
            assert document["full"] == f"photos/{document['image']}"
        assert os.path.getsize(tmp_path / name) <= page_bound(str(tmp_path), name, rows), name


def test_ordering_a_backlog_keeps_a_few_numbers_a_document(tmp_path):
    """The order is taken from predict.jsonl on disk, never holding the rows: what it keeps grows by
    under 400 bytes a document (measured about 160), between 200 and 1,200 rows of 2 KB each."""
    import tracemalloc
    text = json.dumps(make_manifest(random.Random(0)))
    kept = {}
    for count in (200, 1200):
        rows = [{"image": f"IMG_{k:05d}.jpg", "image_path": f"/photos/IMG_{k:05d}.jpg", "prefix": PROMPT,
                 "prediction": text, "truncated": False, "confidence": confidences(text, {"/dock": k / count}),
                 "parsed": True} for k in range(count)]
        path = write_predictions(str(tmp_path), rows)
        tracemalloc.start()
        order = review_order(path, THRESHOLD)
        kept[count] = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        assert len(order) == count
    assert (kept[1200] - kept[200]) / 1000 < 400


def test_overwrite_removes_every_review_page(tmp_path):
    from paligemma_json.plan import prepare_output_dir
    for name in ("final", "review-001.html", "review-002.html", "review.html", "notes-review-1.html"):
        (tmp_path / name).mkdir() if name == "final" else (tmp_path / name).write_text("")
    prepare_output_dir(str(tmp_path), overwrite=True, resume=False, demo=False)
    assert os.listdir(tmp_path) == ["notes-review-1.html"]  # the user's own file stays


def test_page_two_exports_its_own_file_and_the_next_run_takes_two_pages(chromium, demo_assets, tmp_path):
    """In Chromium: the index links the pages; page 2 shows its documents in the promised order; an
    edit there reaches its own export; page 1 shows the unreadable files and refuses to export the
    held-out photo; page 2's edit outlives page 1's saves; both exports, saved elsewhere (as a
    browser's downloads are), join the next run's train split with their photos found."""
    import finetune_paligemma2 as flow
    from paligemma_json.corrections import add_corrections
    rows, photos = backlog(str(tmp_path)), str(tmp_path / "photos")
    write_review(str(tmp_path / "predict.jsonl"), str(tmp_path), threshold=THRESHOLD, schema=None, source_dir=photos)
    pages = pages_of(tmp_path)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    with review_page(chromium, tmp_path / "review.html") as (page, problems):
        assert page.locator("table.pages tbody tr").count() == 3
        page.click('a[href="review-002.html"]')
        shown = [document["row"] for document in pages["review-002.html"]["documents"]]
        assert page.locator("section.card").evaluate_all("cards => cards.map(card => Number(card.dataset.index))") == shown
        assert page.text_content("h1").startswith("Review: page 2 of 3, documents 101–200 of 250, ")
        edited = shown[0]
        card(page, edited).locator(".show-all").check()
        field(page, edited, "/salesman").fill("Ana Müller")
        card(page, edited).locator(".reviewed").check()
        second = exported(page, "corrections-review-002.jsonl")
        (downloads / "corrections-review-002.jsonl").write_bytes(second)

        page.click("text=← previous page")
        assert page.locator("section.card.unreadable").all_text_contents() == [
            f"doc-{k:04d}.jpgunreadable: {UNREADABLE[k]}the file" for k in sorted(UNREADABLE)]
        card(page, HELD_OUT).locator(".reviewed").check()
        assert "held out" in card(page, HELD_OUT).locator(".held-out").text_content()
        assert page.text_content("#blocked").startswith("not exported: doc-0011.jpg: a photo the trained run held out")
        kept = next(d["row"] for d in pages["review-001.html"]["documents"] if d["flags"] and d["row"] != HELD_OUT)
        card(page, kept).locator(".reviewed").check()
        first = exported(page, "corrections-review-001.jsonl")
        (downloads / "corrections-review-001.jsonl").write_bytes(first)

        page.click("text=next page →")  # page 2's edit is still there after page 1 saved its own
        assert field(page, edited, "/salesman").input_value() == "Ana Müller"
        assert card(page, edited).locator(".reviewed").is_checked()
    assert problems == []
    lines = [json.loads(line) for export in (first, second) for line in export.decode("ascii").splitlines()]
    assert [(line["image"], line["folder"]) for line in lines] == [(rows[kept]["image"], photos),
                                                                   (rows[edited]["image"], photos)]
    assert json.loads(lines[1]["suffix"])["salesman"] == "Ana Müller"
    assert lines[0]["suffix"] == rows[kept]["prediction"]
    splits = flow.load_splits(demo_assets[0], PROMPT)
    before = len(splits["train"])
    assert add_corrections(splits, [str(downloads)], PROMPT) == 2  # the folder: both pages' files, oldest first
    assert [(entry["image"], entry["suffix"]) for entry in splits["train"].entries[before:]] == [
        (os.path.join(photos, line["image"]), line["suffix"]) for line in (lines[1], lines[0])]
