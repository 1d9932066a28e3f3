"""`review.html`: where a person checks `--predict`'s documents and exports what they fixed as
training rows in the labels' own layout.

A review that scales to a backlog: documents are ordered by how much they need a look (`needs_a_look`),
and cut into pages of at most PAGE_SIZE. With one page, `review.html` is that page; with more it is an
index linking `review-001.html`, `review-002.html`, ..., each page one file of its own. Each page
exports its own `corrections-<page>.jsonl` (`corrections-review-002.jsonl`), so downloads do not
collide, and `--corrections` takes several of them or their folder (corrections.py). The pages are
written from `predict.jsonl` as it lies on disk, one page's rows at a time: what is kept per document
while ordering is a sort key and the row's place in the file.

Each page is a self-contained file that opens from disk: no server, no network, no framework. The
rows go in as JSON inside `<script type="application/json">` with `<`, `>` and `&` escaped, and the
page's script renders them with `textContent` and `input.value` only, so a prediction holding
`</script>` or `<img onerror=...>` is data, shown as text and exported unchanged. The only files it
links to are its sibling pages and, one click away, each photo's own file where it still is on disk.

What the page does (its script, PAGE_SCRIPT, below):
- Fields whose confidence is below the threshold are flagged: listed first in each document,
  highlighted, editable. "show all fields" opens every other field, and the rows of lists (add a
  row: the last row's keys, empty; delete a row). "edit as JSON" opens the whole document as text,
  open from the start for a prediction that is not valid JSON.
- Values keep their JSON type: a number field takes only a JSON number (anything else is marked and
  blocks that document's export), a boolean is chosen from true/false, a string stays a string.
  An emptied field becomes null.
- A row marked `"unreadable": "<reason>"` (a file `--predict` could not read) is a card with its
  reason and nothing to edit; a row marked `"held_out": "<split>'s <image>"` (a photo the trained run
  held out) says so on its card and is never exported, since the next run would refuse it.
- Edits and "reviewed" marks are kept in the browser's localStorage under
  `paligemma-json-review:<run_key>`, one entry for all of a run's pages, holding only the documents a
  person touched (the edited tree, or just the marks), each dropped when that document's prediction
  changed (a new --predict run).
- Export downloads the page's own file: one `{"image", "prefix", "suffix", "folder"}` line per
  reviewed document that passes the labels' schema, the suffix written as Python's
  `json.dumps(value, separators=(item, key))` writes it, byte for byte; `folder` is where the image
  was read, so the file works wherever the browser saved it.

Limits of the page's own JSON reader, writer and schema check (kept small on purpose):
- NaN and Infinity, which Python's json reads, are refused: such a prediction opens as text to fix.
- Floats are written as Python's repr writes them (`1.0`, `1e-05`, `1.5e+16`), from JavaScript's
  shortest round-trip digits, which are the same digits; integers of any size stay exact.
- The schema check covers what `schema.infer_schema` writes (type, properties, required,
  additionalProperties, items, enum, const, minimum, maximum, minLength, maxLength, minItems, maxItems,
  anyOf, allOf); other keywords (`$ref`, `pattern`, `format`, ...) are not checked here.
"""

import base64
import io
import json
import os
import re
import urllib.request
from html import escape

from PIL import Image

from paligemma_json import FlowError
from paligemma_json.confidence import field_flags, shown
from paligemma_json.files import write_text_atomically
from paligemma_json.html_report import page_head
from paligemma_json.json_text import parse_json
from paligemma_json.schema import label_layout

INDEX_NAME = "review.html"
PAGE_NAME = re.compile(r"review-\d{3,}\.html")  # an index's pages; an earlier run's extra ones are removed
PAGE_SIZE = 100  # documents a page: with PHOTO_BYTES, at most ~10 MB, which a browser opens at once
PHOTO_BOX = (640, 1280)  # px: the photo's widest on the page (640 CSS px); a long receipt stops at 1280 tall
PHOTO_BYTES = 100_000  # the most a photo adds to its page (base64 JPEG): its quality, then its size, lowered to fit
PHOTO_QUALITIES = (80, 65, 50, 35)
PAGE_OWN_BYTES = 64_000  # the page's own style, script, help and links, whatever it shows (a test holds it)
# Why a document needs a look, in the order the pages show them; within a kind, the most flagged
# fields first, then the lowest confidence, then the folder's order.
KINDS = ("unreadable", "not valid JSON or cut off", "flagged", "nothing flagged")


def export_name(page_name: str) -> str:
    """The file a page's export downloads as: `corrections-review-002.jsonl` for `review-002.html`."""
    return f"corrections-{os.path.splitext(page_name)[0]}.jsonl"


def schema_for_page(schema: dict | None) -> dict | None:
    """The schema the page checks against, without `$schema`/`$id`: addresses the page never fetches,
    left out so that nothing on it even looks like one."""
    if schema is None:
        return None
    return {key: value for key, value in schema.items() if key not in ("$schema", "$id")}


def parsed(row: dict) -> bool:
    return row["parsed"] if "parsed" in row else parse_json(str(row.get("prediction") or "")) is not None


def needs_a_look(row: dict, threshold: float) -> tuple[int, int, float]:
    """The row's place in the review, smallest first: its kind (KINDS), minus its flagged fields,
    its lowest flagged confidence."""
    flags = field_flags(row.get("confidence") or [], threshold)
    kind = (0 if row.get("unreadable") else 1 if row.get("truncated") or not parsed(row)
            else 2 if flags else 3)
    return kind, -len(flags), min(flags.values(), default=1.0)


def review_order(predict_path: str, threshold: float) -> list[tuple]:
    """`(kind, -flags, lowest confidence, row number, byte offset)` of every row of `predict_path`,
    in the order the review shows them: a few numbers a document, never its prediction."""
    order, number, offset = [], 0, 0
    with open(predict_path, "rb") as file:
        for line, raw in enumerate(file, start=1):
            if raw.strip():
                row = read_row(raw, f"{predict_path} line {line}")
                order.append((*needs_a_look(row, threshold), number, offset))
                number += 1
            offset += len(raw)
    return sorted(order)


def read_row(raw: bytes, where: str) -> dict:
    try:
        row = json.loads(raw)
    except ValueError:
        row = None
    if not isinstance(row, dict):
        raise FlowError(f"{where}: not a --predict row; run --predict again to write the file whole")
    return row


def photo_data_uri(path: str | None) -> str | None:
    """The photo fitted into PHOTO_BOX as a JPEG data URI of at most PHOTO_BYTES, or None when it is
    gone or unreadable: a predictions file outlives its images."""
    try:
        with Image.open(path) as image:
            image.draft("RGB", PHOTO_BOX)  # a large JPEG decodes at a fraction of its size: fast
            image = image.convert("RGB")
    except Exception:
        return None
    image.thumbnail(PHOTO_BOX)
    while True:
        for quality in PHOTO_QUALITIES:
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=quality)
            uri = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
            if len(uri) <= PHOTO_BYTES:
                return uri
        image = image.resize((max(1, image.width // 2), max(1, image.height // 2)))  # noise-like: smaller still


def file_link(path, page_dir: str) -> str | None:
    """A relative URL from the page to the photo's own file (it still opens when the run folder and
    the photos move together), or None when the file is gone."""
    if not isinstance(path, str) or not os.path.isfile(path):
        return None
    try:
        return urllib.request.pathname2url(os.path.relpath(os.path.abspath(path), page_dir))
    except ValueError:  # another drive, on Windows
        return "file:" + urllib.request.pathname2url(os.path.abspath(path))


def document_data(row: dict, number: int, threshold: float, page_dir: str) -> dict:
    """What the page's script reads of one row; any row, whatever it lacks, makes a card."""
    document = {"row": number, "image": str(row.get("image", "")), "prefix": str(row.get("prefix") or ""),
                "prediction": str(row.get("prediction") or ""), "truncated": bool(row.get("truncated")),
                "full": file_link(row.get("image_path"), page_dir)}
    if row.get("unreadable"):
        return {**document, "unreadable": str(row["unreadable"]), "flags": {}, "photo": None}
    held_out = {"held_out": str(row["held_out"])} if row.get("held_out") else {}
    return {**document, **held_out, "flags": field_flags(row.get("confidence") or [], threshold),
            "photo": photo_data_uri(row.get("image_path"))}


def embedded_json(data) -> str:
    """JSON that cannot end its `<script>` block: `</script>` or `<!--` in a prediction is written
    `\\u003c/script\\u003e`, which JSON.parse reads back as the same text."""
    return (json.dumps(data, ensure_ascii=True)
            .replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"))


def write_review(predict_path: str, output_dir: str, *, threshold: float, schema: dict | None, source_dir: str,
                 page_size: int = PAGE_SIZE) -> str:
    """The review of `predict_path`'s rows (the images read from `source_dir`) in `output_dir`: its
    pages, then `review.html`, each written whole; an earlier review's extra pages removed. Returns
    the line that says what to open and what to do with the exports."""
    order = review_order(predict_path, threshold)
    pages = [order[start:start + page_size] for start in range(0, len(order), page_size)] or [[]]
    names = [INDEX_NAME] if len(pages) == 1 else [f"review-{k:03d}.html" for k in range(1, len(pages) + 1)]
    context = {"threshold": threshold, "schema": schema, "run_key": os.path.abspath(predict_path),
               "folder": os.path.abspath(source_dir), "total": len(order)}
    start = 0
    with open(predict_path, "rb") as file:
        for number, (name, page) in enumerate(zip(names, pages)):
            rows = []
            for *_, row_number, offset in page:  # one page's rows in memory at a time
                file.seek(offset)
                row = read_row(file.readline(), f"{predict_path} at byte {offset}")
                rows.append(document_data(row, row_number, threshold, os.path.abspath(output_dir)))
            nav = None if len(pages) == 1 else (number, names, start)
            write_review_page(rows, os.path.join(output_dir, name), nav=nav, **context)
            start += len(page)
    if len(pages) > 1:
        write_text_atomically(index_html(pages, names, **context), os.path.join(output_dir, INDEX_NAME))
    for stale in sorted(os.listdir(output_dir)):
        if PAGE_NAME.fullmatch(stale) and stale not in names:
            os.remove(os.path.join(output_dir, stale))
    index = os.path.join(output_dir, INDEX_NAME)
    what = (f"{len(pages)} pages of up to {page_size} documents, the most flagged first; each page exports "
            f"its own corrections-review-NNN.jsonl" if len(pages) > 1 else f"it exports {export_name(INDEX_NAME)}")
    return (f"review: open {index} in a browser ({what}); correct and mark documents, export, then train again "
            f"with --corrections and the exported files, or the folder you saved them in")


def page_summary(page: list[tuple]) -> str:
    """What one page holds, by kind: `3 unreadable, 97 flagged (12 to 4 fields)`."""
    parts = []
    for kind, name in enumerate(KINDS):
        flags = [-place[1] for place in page if place[0] == kind]
        if not flags:
            continue
        if kind == KINDS.index("flagged"):
            name += f" ({max(flags)} to {min(flags)} fields)" if max(flags) > min(flags) else f" ({flags[0]} each)"
        parts.append(f"{len(flags)} {name}")
    return ", ".join(parts)


def index_html(pages: list[list[tuple]], names: list[str], *, threshold: float, folder: str, total: int,
               **_) -> str:
    """`review.html` over several pages: what each holds, linked; no script, nothing embedded."""
    rows, start = [], 0
    for name, page in zip(names, pages):
        rows.append(f'<tr><td><a href="{escape(name)}">{escape(name)}</a></td><td>{start + 1}–{start + len(page)}'
                    f"</td><td>{sum(-place[1] for place in page)}</td><td>{escape(page_summary(page))}</td></tr>")
        start += len(page)
    everything = [place for page in pages for place in page]
    return f"""{page_head("Review predictions", PAGE_STYLE)}
<h1>Review: {total} documents in {len(pages)} pages, the ones that most need a look first</h1>
<p>{escape(page_summary(everything))} (fields with confidence below {shown(threshold)} are flagged; the unrounded threshold decides). Pages are
ordered: files that could not be read, then predictions that are not valid JSON or were cut off, then the
documents with the most flagged fields (ties: the lowest confidence first), then those with nothing flagged.</p>
<div class="help"><p>Each page keeps its edits in this browser and exports its own file
(<code>corrections-review-001.jsonl</code>, ...). Its rows name the images in <code>{escape(folder)}</code>
and carry that folder, so an export works wherever your browser saved it. Train on them with
<code class="command">--corrections FILE FILE ...</code>, or with <code>--corrections FOLDER</code> for
every <code>corrections*.jsonl</code> in the folder you saved them in.</p></div>
<table class="pages"><thead><tr><th>page</th><th>documents</th><th>flagged fields</th><th>what it holds</th></tr></thead>
<tbody>{"".join(rows)}</tbody></table>
</body></html>
"""


def write_review_page(documents: list[dict], path: str, *, threshold: float, schema: dict | None, run_key: str,
                      folder: str, total: int, nav: tuple | None = None) -> None:
    """One page at `path` over `documents` (`document_data`'s, in order): `nav` is `(page number,
    every page's name, how many documents come before)` when there are several pages; `run_key`
    keeps a run's edits apart from other runs' in the browser; `folder` is where the images were read."""
    name = os.path.basename(path)
    data = {"run_key": run_key, "threshold": threshold, "layout": label_layout(schema),
            "schema": schema_for_page(schema), "export_name": export_name(name), "folder": folder,
            "documents": documents}
    flagged = sum(len(document["flags"]) for document in documents)
    if nav is None:
        title, links = f"{len(documents)} documents", ""
    else:
        number, names, before = nav
        title = f"page {number + 1} of {len(names)}, documents {before + 1}–{before + len(documents)} of {total}"
        around = [(INDEX_NAME, "all pages")] + ([(names[number - 1], "← previous page")] if number else []) + \
            ([(names[number + 1], "next page →")] if number + 1 < len(names) else [])
        links = '<nav class="pages">' + " · ".join(f'<a href="{escape(href)}">{text}</a>' for href, text in around) + "</nav>"
    page = f"""{page_head("Review predictions", PAGE_STYLE)}
{links}
<h1>Review: {title}, {flagged} fields flagged (confidence below {shown(threshold)}; the unrounded threshold decides)</h1>
<div class="help">
<p>The documents that most need a look come first: unreadable files, then predictions that are not valid JSON
or were cut off, then the most flagged fields. Flagged fields come first in each document, highlighted: check
each against the photo (click the photo to see the full image). <b>show all fields</b> opens the others, where
list rows can be added and deleted; <b>edit as JSON</b> opens the whole document as text, for a prediction that
is not valid JSON or was cut off.</p>
<p>Values keep their type: a number field takes a number only (anything else is marked in red and blocks
that document's export); <b>an emptied field becomes null</b>. Tick <b>reviewed</b> when a document is
right: only reviewed documents that pass the labels' schema are exported.</p>
<p>Edits are kept in this browser: they survive a reload and a restart, not a change of browser or
clearing its site data, nor a new <code>--predict</code> run that reads a document differently.
<b>Export</b> downloads <code class="target">{escape(data["export_name"])}</code>: its rows name the images in
<code>{escape(folder)}</code> and carry that folder, so it works wherever it is saved. Train with
<code class="command">--corrections</code> and this file (with other pages' files, or the folder they are in).</p>
</div>
<div class="controls">
<span id="status"></span>
<button type="button" id="export">Export</button>
<span id="storage-note"></span>
<ul id="blocked"></ul>
</div>
<main id="cards"></main>
<div id="zoom" hidden><img alt="the photo at full size"></div>
<script type="application/json" id="review-data">{embedded_json(data)}</script>
<script>{PAGE_SCRIPT}</script>
</body></html>
"""
    write_text_atomically(page, path)


PAGE_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 0 auto; padding: 12px; max-width: 1400px; color: #222; }
h1 { font-size: 20px; } h2 { font-size: 15px; margin: 0; overflow-wrap: anywhere; }
code { overflow-wrap: anywhere; background: #f0f0f0; padding: 0 3px; }
.controls { position: sticky; top: 0; z-index: 1; background: #f4f4f4; padding: 8px; display: flex;
  flex-wrap: wrap; gap: 12px; align-items: center; }
#blocked { flex-basis: 100%; margin: 0; color: #c41e1e; } #blocked:empty { display: none; }
.card { border: 1px solid #ccc; border-radius: 6px; padding: 10px; margin: 12px 0; }
.card.is-reviewed { border-color: #14822e; box-shadow: 0 0 0 1px #14822e; }
.card header { display: flex; flex-wrap: wrap; gap: 12px; align-items: baseline; margin-bottom: 8px; }
.card .note { color: #c96f00; }
.card.unreadable { border-color: #c41e1e; } .card .held-out { color: #c41e1e; font-weight: bold; }
.photo figcaption { font-size: 12px; }
nav.pages { margin: 4px 0; } table.pages { border-collapse: collapse; }
table.pages td, table.pages th { padding: 2px 10px; text-align: left; border-bottom: 1px solid #ddd; }
.body { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
.photo { flex: 1 1 420px; max-width: 640px; margin: 0; }
.photo img { max-width: 100%; height: auto; cursor: zoom-in; border: 1px solid #ddd; }  /* never blown up */
.fields { flex: 1 1 380px; min-width: 0; }
.fields h3 { font-size: 14px; margin: 4px 0; }
.field { display: grid; grid-template-columns: minmax(7em, 13em) minmax(0, 1fr) auto; gap: 2px 8px;
  grid-template-areas: "name value confidence" ". problem problem"; align-items: center; padding: 2px 4px; }
.field .name { grid-area: name; overflow-wrap: anywhere; } .field .value { grid-area: value; }
.field .confidence { grid-area: confidence; } .field .problem { grid-area: problem; }
.field input, .field select { font: inherit; min-width: 0; }
.field.flagged { background: #fff0b3; border-left: 4px solid #e0a800; }
.field.flagged.touched { background: #eaf6ea; border-left-color: #14822e; }
.field .confidence { color: #7a5a00; font-size: 12px; }
.field .problem { color: #c41e1e; font-size: 12px; } .field .problem:empty { display: none; }
.field input.bad { border: 2px solid #c41e1e; background: #fdeaea; }
fieldset { border: 1px solid #ddd; margin: 4px 0; padding: 4px 6px; }
.item { border-top: 1px dashed #ccc; padding: 2px 0; }
.item-head { display: flex; gap: 8px; align-items: center; font-size: 12px; color: #555; }
.toggles { display: flex; flex-wrap: wrap; gap: 12px; margin: 6px 0; }
.raw textarea { width: 100%; box-sizing: border-box; min-height: 12em; font: 12px/1.3 monospace; }
.raw .problem { color: #c41e1e; }
.problems { color: #c41e1e; margin: 4px 0; } .problems:empty { display: none; }
#zoom { position: fixed; inset: 0; z-index: 2; background: rgba(0, 0, 0, 0.85); overflow: auto; cursor: zoom-out; }
#zoom img { display: block; margin: 0 auto; max-width: none; }
[hidden] { display: none !important; }
@media (max-width: 600px) {  /* a phone: the value under its name, full width */
  .field { grid-template-columns: minmax(0, 1fr) auto;
    grid-template-areas: "name confidence" "value value" "problem problem"; }
}
@media (min-width: 900px) {  /* beside a long list of fields, the photo stays in view */
  .photo { position: sticky; top: 56px; }
}
"""

# The page's script. It reads the rows from the JSON block and never writes HTML from them: every
# element is made with createElement and filled through textContent or value.
PAGE_SCRIPT = r"""
"use strict";
const DATA = JSON.parse(document.getElementById("review-data").textContent);
const [ITEM_SEPARATOR, KEY_SEPARATOR] = DATA.layout;
const STORE_KEY = "paligemma-json-review:" + DATA.run_key;  // every file:// page shares one store

// --- JSON as Python reads and writes it ---------------------------------------------------------
// A document is a tree of nodes, so that edits keep what JSON.parse would lose: key order as
// written, 1.0 apart from 1, integers past 2**53. Nodes: {t: "o", e: [[key, node], ...]},
// {t: "a", i: [node, ...]}, and leaves {t: "v", kind: "string" | "number" | "boolean", v, flag?,
// error?, typed?}, where a number's v is its text as Python's json.dumps writes it, and v null is null.

const NUMBER = /^-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][-+]?\d+)?$/;
const SHORT_ESCAPES = {"\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", '"': '\\"', "\\": "\\\\"};

function pyFloat(x) {
  // Python's repr: the shortest digits that read back (JavaScript finds the same ones), fixed
  // notation for exponents -4 to 15, else d.ddde+XX.
  if (x === 0) return Object.is(x, -0) ? "-0.0" : "0.0";
  const [mantissa, power] = Math.abs(x).toExponential().split("e");
  const digits = mantissa.replace(".", ""), exponent = Number(power), sign = x < 0 ? "-" : "";
  if (exponent >= 16 || exponent < -4) {
    const fraction = digits.length > 1 ? "." + digits.slice(1) : "";
    return sign + digits[0] + fraction + "e" + (exponent < 0 ? "-" : "+") + String(Math.abs(exponent)).padStart(2, "0");
  }
  if (exponent < 0) return sign + "0." + "0".repeat(-exponent - 1) + digits;
  const whole = digits.padEnd(exponent + 1, "0");
  return sign + whole.slice(0, exponent + 1) + "." + (whole.slice(exponent + 1) || "0");
}

function pyNumber(text) {
  // A JSON number as Python writes it back after reading it, or null when it is none.
  if (!NUMBER.test(text)) return null;
  if (!/[.eE]/.test(text)) return BigInt(text).toString();  // an int: exact at any size, -0 is 0
  const x = Number(text);
  return Number.isFinite(x) ? pyFloat(x) : null;
}

function pyString(text) {
  // json.dumps with ensure_ascii: printable ASCII as is, the rest as \uXXXX in lowercase hex (a
  // character past U+FFFF as its two surrogates, which is what JavaScript strings hold).
  let out = '"';
  for (const unit of text.split("")) {
    const code = unit.charCodeAt(0);
    out += SHORT_ESCAPES[unit] || (code >= 0x20 && code <= 0x7e ? unit : "\\u" + code.toString(16).padStart(4, "0"));
  }
  return out + '"';
}

function dumps(node, layout, depth = 0) {
  // json.dumps(value, separators=(item, key)); with layout.indent, the raw editor's readable form.
  if (node.t === "v") {
    if (node.v === null) return "null";
    if (node.kind === "number") return node.v;
    if (node.kind === "boolean") return node.v ? "true" : "false";
    return pyString(node.v);
  }
  const parts = node.t === "o"
    ? node.e.map(([key, child]) => pyString(key) + layout.key + dumps(child, layout, depth + 1))
    : node.i.map(child => dumps(child, layout, depth + 1));
  const [open, close] = node.t === "o" ? ["{", "}"] : ["[", "]"];
  if (!parts.length) return open + close;
  if (!layout.indent) return open + parts.join(layout.item) + close;
  const inner = "\n" + " ".repeat(layout.indent * (depth + 1)), outer = "\n" + " ".repeat(layout.indent * depth);
  return open + inner + parts.join("," + inner) + outer + close;
}

const LABEL_LAYOUT = {item: ITEM_SEPARATOR, key: KEY_SEPARATOR};
const READABLE_LAYOUT = {item: ", ", key: ": ", indent: 2};

function parseDocument(text) {
  // The tree of a JSON object or array, or an Error saying where the text stops being JSON.
  let i = 0;
  const fail = what => {
    throw new Error(i >= text.length ? "the text ends before the JSON does (cut off?)" : `${what} at character ${i + 1}`);
  };
  const space = () => { while (i < text.length && " \t\n\r".includes(text[i])) i++; };
  function string() {
    const start = i++;
    while (i < text.length && text[i] !== '"') i += text[i] === "\\" ? 2 : 1;
    if (i >= text.length) fail("");
    i++;
    try { return JSON.parse(text.slice(start, i)); } catch (error) { i = start; fail("a bad string"); }
  }
  function value() {
    space();
    if (text[i] === "{" || text[i] === "[") {
      const isObject = text[i++] === "{", node = isObject ? {t: "o", e: []} : {t: "a", i: []};
      space();
      if (text[i] === (isObject ? "}" : "]")) { i++; return node; }
      for (;;) {
        if (isObject) {
          space();
          if (text[i] !== '"') fail("expected a key in double quotes");
          const key = string();
          space();
          if (text[i++] !== ":") { i--; fail("expected ':'"); }
          const child = value(), same = node.e.find(([name]) => name === key);
          // A key written twice: its first place and its last value, as Python's json reads it.
          if (same) same[1] = child; else node.e.push([key, child]);
        } else {
          node.i.push(value());
        }
        space();
        if (text[i] === ",") { i++; continue; }
        if (text[i] === (isObject ? "}" : "]")) { i++; return node; }
        fail(isObject ? "expected ',' or '}'" : "expected ',' or ']'");
      }
    }
    if (text[i] === '"') return {t: "v", kind: "string", v: string()};
    for (const [word, v] of [["true", true], ["false", false], ["null", null]]) {
      if (text.startsWith(word, i)) { i += word.length; return {t: "v", kind: v === null ? null : "boolean", v}; }
    }
    const found = /-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][-+]?\d+)?/y;
    found.lastIndex = i;
    const match = found.exec(text);
    if (!match) fail("expected a value");
    const number = pyNumber(match[0]);
    if (number === null) fail("a number too large for a float");
    i += match[0].length;
    return {t: "v", kind: "number", v: number};
  }
  const tree = value();
  space();
  if (i < text.length) fail("extra text after the JSON");
  if (tree.t === "v") throw new Error("not a JSON object or array");
  return withKinds(tree);
}

// --- Walking a tree beside its schema ----------------------------------------------------------

// Own keys only: a field named "constructor" must not find Object.prototype's.
const own = (object, key) => object !== null && typeof object === "object" &&
  Object.prototype.hasOwnProperty.call(object, key);

function schemaTypes(schema) {
  if (!schema || typeof schema !== "object") return [];
  return [].concat(schema.type || [], ...(schema.anyOf || []).map(schemaTypes));
}

function branch(schema, type) {
  // The part of a schema that describes an object or an array (infer_schema's anyOf has one each).
  if (!schema || typeof schema !== "object") return null;
  const match = (schema.anyOf || []).find(part => schemaTypes(part).includes(type));
  return match ? branch(match, type) : schema;
}

function childSchema(schema, key, isItem) {
  const part = branch(schema, isItem ? "array" : "object");
  if (!part) return null;
  return isItem ? part.items || null : (own(part.properties, key) ? part.properties[key] : null);
}

function kindFromSchema(schema) {
  // What a null field holds once typed into: the schema's first type that is not null.
  for (const type of schemaTypes(schema)) {
    if (type === "string" || type === "boolean") return type;
    if (type === "integer" || type === "number") return "number";
  }
  return "string";
}

const escapeStep = key => key.replace(/~/g, "~0").replace(/\//g, "~1");  // RFC 6901, as confidence.json_pointer

function* leaves(node, pointer = "", label = [], schema = DATA.schema) {
  // [leaf, JSON pointer, readable name, its schema] for every value, in document order.
  if (node.t === "o") {
    for (const [key, child] of node.e) {
      yield* leaves(child, pointer + "/" + escapeStep(key), [...label, key], childSchema(schema, key, false));
    }
  } else if (node.t === "a") {
    for (let k = 0; k < node.i.length; k++) {
      yield* leaves(node.i[k], pointer + "/" + k, [...label, "#" + (k + 1)], childSchema(schema, k, true));
    }
  } else {
    yield [node, pointer, label.join(" › ") || "(value)", schema];
  }
}

function withKinds(tree) {
  for (const [leaf, , , schema] of leaves(tree)) if (leaf.kind === null) leaf.kind = kindFromSchema(schema);
  return tree;
}

function blankLike(node) {
  // A new list row: the keys of `node`, every value null (of the same kind), nested lists empty.
  if (node.t === "o") return {t: "o", e: node.e.map(([key, child]) => [key, blankLike(child)])};
  if (node.t === "a") return {t: "a", i: []};
  return {t: "v", kind: node.kind, v: null};
}

function blankFromSchema(schema) {
  const object = branch(schema, "object");
  if (schemaTypes(schema).includes("object") && object && object.properties) {
    return {t: "o", e: Object.keys(object.properties).map(key => [key, blankFromSchema(object.properties[key])])};
  }
  if (schemaTypes(schema).includes("array")) return {t: "a", i: []};
  return {t: "v", kind: kindFromSchema(schema), v: null};
}

function plain(node) {
  // The value as JSON.parse would give it, for the schema check.
  if (node.t === "o") return Object.fromEntries(node.e.map(([key, child]) => [key, plain(child)]));
  if (node.t === "a") return node.i.map(plain);
  return node.v !== null && node.kind === "number" ? Number(node.v) : node.v;
}

// --- The schema check ----------------------------------------------------------------------------

function typeOf(value) {
  if (value === null) return "null";
  if (Array.isArray(value)) return "array";
  if (typeof value === "number") return Number.isInteger(value) ? "integer" : "number";
  return typeof value;
}

function hasType(value, type) {
  const actual = typeOf(value);
  return actual === type || (type === "number" && actual === "integer");  // 2.0 is an integer, as in jsonschema
}

function same(a, b) {
  if (typeOf(a) !== typeOf(b) && !(typeof a === "number" && typeof b === "number")) return false;
  if (Array.isArray(a)) return a.length === b.length && a.every((item, k) => same(item, b[k]));
  if (a && typeof a === "object") {
    const keys = Object.keys(a);
    return keys.length === Object.keys(b).length && keys.every(key => own(b, key) && same(a[key], b[key]));
  }
  return a === b;
}

function shown(value) {
  const text = String(JSON.stringify(value));  // "undefined" for a keyword the schema lacks: check() builds messages first
  return text.length > 60 ? text.slice(0, 57) + "..." : text;
}

function pointerLabel(pointer) {
  const steps = pointer.split("/").slice(1).map(step => step.replace(/~1/g, "/").replace(/~0/g, "~"));
  return steps.map(step => /^\d+$/.test(step) ? "#" + (Number(step) + 1) : step).join(" › ") || "the document";
}

function validate(value, schema, pointer = "") {
  // Messages for each way `value` breaks `schema`, [] when it passes.
  if (schema === true || schema === undefined || schema === null) return [];
  const where = pointerLabel(pointer);
  if (schema === false) return [`${where}: not allowed`];
  if (own(schema, "type")) {
    const types = [].concat(schema.type);
    if (!types.some(type => hasType(value, type))) return [`${where}: ${shown(value)} is not ${types.join(" or ")}`];
  }
  const errors = [], has = keyword => own(schema, keyword);
  const check = (broken, message) => { if (broken) errors.push(`${where}: ${message}`); };
  check(has("enum") && !schema.enum.some(option => same(option, value)), `${shown(value)} is not one of ${shown(schema.enum)}`);
  check(has("const") && !same(schema.const, value), `${shown(value)} is not ${shown(schema.const)}`);
  if (typeof value === "number") {
    check(has("minimum") && value < schema.minimum, `${value} is below the minimum ${schema.minimum}`);
    check(has("maximum") && value > schema.maximum, `${value} is above the maximum ${schema.maximum}`);
  }
  if (typeof value === "string") {
    const length = Array.from(value).length;  // characters, as Python counts them, not UTF-16 units
    check(has("maxLength") && length > schema.maxLength, `${length} characters, more than ${schema.maxLength}`);
    check(has("minLength") && length < schema.minLength, `${length} characters, fewer than ${schema.minLength}`);
  }
  if (Array.isArray(value)) {
    check(has("maxItems") && value.length > schema.maxItems, `${value.length} rows, more than ${schema.maxItems}`);
    check(has("minItems") && value.length < schema.minItems, `${value.length} rows, fewer than ${schema.minItems}`);
    if (schema.items) value.forEach((item, k) => errors.push(...validate(item, schema.items, pointer + "/" + k)));
  } else if (typeOf(value) === "object") {
    for (const key of schema.required || []) check(!own(value, key), `"${key}" is missing`);
    for (const [key, child] of Object.entries(value)) {
      const at = pointer + "/" + escapeStep(key);
      if (own(schema.properties, key)) errors.push(...validate(child, schema.properties[key], at));
      else if (schema.additionalProperties === false) check(true, `"${key}" is not one of its fields`);
      else if (has("additionalProperties")) errors.push(...validate(child, schema.additionalProperties, at));
    }
  }
  for (const part of schema.allOf || []) errors.push(...validate(value, part, pointer));
  if (schema.anyOf && !schema.anyOf.some(part => validate(value, part, pointer).length === 0)) {
    // Where one form has the value's type, its own complaint says more than "fits none".
    const typed = schema.anyOf.filter(part => !own(part, "type") || [].concat(part.type).some(type => hasType(value, type)));
    if (typed.length === 1) errors.push(...validate(value, typed[0], pointer));
    else check(true, `${shown(value)} fits none of its allowed forms`);
  }
  return errors;
}

// --- Each document's state, kept in localStorage -------------------------------------------------

function fingerprint(text) {  // FNV-1a: a saved edit applies only to the prediction it was made on
  let hash = 0x811c9dc5;
  for (let k = 0; k < text.length; k++) hash = Math.imul(hash ^ text.charCodeAt(k), 0x01000193) >>> 0;
  return hash.toString(16) + ":" + text.length;
}

function initialState(source) {
  let tree = null, rawError = null;
  try { tree = parseDocument(source.prediction); } catch (error) { rawError = error.message; }
  if (tree) {
    for (const [leaf, pointer] of leaves(tree)) {
      if (own(source.flags, pointer)) leaf.flag = {confidence: source.flags[pointer], touched: false};
    }
  }
  // A prediction that is not JSON opens as text; `raw` is the editor's text while it is the source.
  return {tree, raw: tree ? null : source.prediction, rawError, reviewed: false, showAll: false, showRaw: !tree};
}

// What is saved of a document a person touched: its marks, and its text only once edited (a
// backlog's "reviewed" marks then fit the browser's few MB of storage).
const MARKS = ["reviewed", "showAll", "showRaw"], EDITS = ["tree", "raw", "rawError"];
// An unreadable file has nothing to edit: it is shown with its reason and left out of the rest.
const documents = DATA.documents.filter(source => !source.unreadable).map(source => {
  const first = initialState(source);
  // Keyed by the image, not the page: a document keeps its edits when a new order moves it to another page.
  const key = source.image + "\n" + fingerprint(source.image + "\n" + source.prediction);
  return {...source, source, key, touched: false, edited: false, generatedJson: first.tree !== null, ...first};
});
const THRESHOLD = String(Number(DATA.threshold.toPrecision(4)));  // as confidence.shown: 0.1398, not 0.13980783571249336

function stored() {
  const saved = JSON.parse(localStorage.getItem(STORE_KEY) || "{}");
  return saved && typeof saved === "object" ? saved : {};
}

function restore() {
  let saved = {};
  try { saved = stored(); } catch (error) { storageTrouble(); }
  for (const doc of documents) {
    const mine = own(saved, doc.key) ? saved[doc.key] : null;
    if (!mine || typeof mine !== "object") continue;
    for (const key of MARKS.concat(EDITS)) if (own(mine, key)) doc[key] = mine[key];
    doc.touched = true;
    doc.edited = own(mine, "tree");
  }
}

function save() {
  // One entry for all of a run's pages: this page's documents are replaced in it, the others' kept.
  try {
    const saved = stored();
    for (const doc of documents) {
      if (!doc.touched) { delete saved[doc.key]; continue; }
      saved[doc.key] = Object.fromEntries((doc.edited ? MARKS.concat(EDITS) : MARKS).map(key => [key, doc[key]]));
    }
    localStorage.setItem(STORE_KEY, JSON.stringify(saved));
  } catch (error) { storageTrouble(); }
}

function storageTrouble() {
  document.getElementById("storage-note").textContent =
    "This browser does not keep this page's edits (no localStorage for files): export before closing it.";
}

// --- Edits ---------------------------------------------------------------------------------------

function setLeaf(leaf, typed) {
  leaf.error = null;
  leaf.typed = null;
  if (leaf.kind === "boolean") leaf.v = typed === "" ? null : typed === "true";
  else if (typed === "" || (leaf.kind === "number" && typed.trim() === "")) leaf.v = null;  // emptied: null
  else if (leaf.kind === "number") {
    const number = pyNumber(typed.trim());
    if (number === null) { leaf.error = `${JSON.stringify(typed)} is not a number`; leaf.typed = typed; }
    else leaf.v = number;
  } else leaf.v = typed;
  if (leaf.flag) leaf.flag.touched = true;
}

function carryFlags(before, after) {
  // A flag stays on the field at its place in the edited text, touched if its value changed.
  if (!before) return;
  const old = new Map(Array.from(leaves(before), ([leaf, pointer]) => [pointer, leaf]));
  for (const [leaf, pointer] of leaves(after)) {
    const was = old.get(pointer);
    if (was && was.flag) {
      leaf.flag = {...was.flag, touched: was.flag.touched || was.v !== leaf.v || was.kind !== leaf.kind};
    }
  }
}

function problems(doc) {
  // Why this document cannot be exported as it is: [] when it can.
  if (doc.held_out) return [`a photo the trained run held out (${doc.held_out}): the next run would refuse its correction`];
  if (doc.rawError) return [`its JSON text does not parse: ${doc.rawError}`];
  const found = Array.from(leaves(doc.tree)).filter(([leaf]) => leaf.error)
    .map(([leaf, , label]) => `${label}: ${leaf.error}`);
  return DATA.schema ? found.concat(validate(plain(doc.tree), DATA.schema)) : found;
}

// --- Drawing ------------------------------------------------------------------------------------

function el(tag, properties = {}, ...children) {
  const element = Object.assign(document.createElement(tag), properties);
  element.append(...children);  // strings become text nodes, never markup
  return element;
}

function leafInput(doc, leaf) {
  let input;
  if (leaf.kind === "boolean") {
    input = el("select", {}, ...[["true", "true"], ["false", "false"], ["", "(empty: null)"]]
      .map(([value, textContent]) => el("option", {value, textContent})));
  } else {
    input = el("input", {type: "text", placeholder: "null"});
    if (leaf.kind === "number") input.inputMode = "decimal";
  }
  input.className = "value";
  input.leaf = leaf;
  input.addEventListener(leaf.kind === "boolean" ? "change" : "input", () => {
    setLeaf(leaf, input.value);
    doc.edited = true;
    doc.raw = null;
    doc.rawError = null;
    showLeaf(doc, leaf);
    refresh(doc);
  });
  return input;
}

function fieldRow(doc, leaf, pointer, name) {
  const row = el("label", {className: "field" + (leaf.flag ? " flagged" : "")},
                 el("span", {className: "name", textContent: name, title: pointer}), leafInput(doc, leaf));
  row.dataset.pointer = pointer;
  row.append(el("span", {className: "confidence", textContent: leaf.flag ? `confidence ${Number(leaf.flag.confidence).toFixed(2)}` : ""}),
             el("span", {className: "problem"}));
  return row;
}

function showLeaf(doc, leaf) {
  // Every input of this value in the card (flagged list and all fields) shows it as it is now.
  for (const input of doc.view.card.querySelectorAll(".value")) {
    if (input.leaf !== leaf) continue;
    const row = input.closest(".field");
    if (input !== document.activeElement) {
      input.value = leaf.error ? leaf.typed : leaf.v === null ? "" : String(leaf.v);
    }
    input.classList.toggle("bad", Boolean(leaf.error));
    // Green once it holds a value of its type.
    row.classList.toggle("touched", Boolean(leaf.flag && leaf.flag.touched && !leaf.error));
    row.querySelector(".problem").textContent = leaf.error || "";
  }
}

function renderObject(doc, node, pointer, schema) {
  const box = el("div", {className: "object"});
  for (const [key, child] of node.e) {
    box.append(renderChild(doc, child, pointer + "/" + escapeStep(key), key, childSchema(schema, key, false)));
  }
  return box;
}

function renderChild(doc, node, pointer, name, schema) {
  if (node.t === "v") return fieldRow(doc, node, pointer, name);
  const legend = node.t === "a" ? `${name} (${node.i.length} rows)` : name;
  const group = el("fieldset", {className: "group"}, el("legend", {textContent: legend}));
  group.append(node.t === "o" ? renderObject(doc, node, pointer, schema) : renderList(doc, node, pointer, schema));
  return group;
}

function renderList(doc, node, pointer, schema) {
  const box = el("div", {className: "list"});
  node.i.forEach((item, k) => {
    const at = pointer + "/" + k, itemSchema = childSchema(schema, k, true);
    const remove = el("button", {type: "button", className: "delete-row", textContent: `delete row #${k + 1}`});
    remove.addEventListener("click", () => { node.i.splice(k, 1); structureChanged(doc); });
    const head = el("div", {className: "item-head"}, el("b", {textContent: "#" + (k + 1)}), remove);
    const row = el("div", {className: "item"}, head);
    row.dataset.pointer = at;
    row.append(item.t === "v" ? fieldRow(doc, item, at, "value")
               : item.t === "o" ? renderObject(doc, item, at, itemSchema) : renderList(doc, item, at, itemSchema));
    box.append(row);
  });
  const itemSchema = branch(schema, "array") && branch(schema, "array").items;
  if (node.i.length || itemSchema) {
    const add = el("button", {type: "button", className: "add-row", textContent: "add a row"});
    add.addEventListener("click", () => {
      node.i.push(node.i.length ? blankLike(node.i[node.i.length - 1]) : blankFromSchema(itemSchema));
      structureChanged(doc);
    });
    box.append(add);
  }
  return box;
}

function renderFields(doc) {
  const {flagged, all} = doc.view;
  if (!doc.tree) {
    flagged.replaceChildren(el("p", {textContent: "No fields to show: the prediction is not valid JSON. Fix it as text."}));
    all.replaceChildren();
    return;
  }
  const rows = Array.from(leaves(doc.tree)).filter(([leaf]) => leaf.flag)
    .map(([leaf, pointer, label]) => fieldRow(doc, leaf, pointer, label));
  const title = rows.length ? `To check: confidence below ${THRESHOLD}` : "No field below the confidence threshold";
  flagged.replaceChildren(el("h3", {textContent: title}), ...rows);
  const tree = doc.tree.t === "o" ? renderObject(doc, doc.tree, "", DATA.schema) : renderList(doc, doc.tree, "", DATA.schema);
  all.replaceChildren(el("h3", {textContent: "All fields"}), tree);
  for (const [leaf] of leaves(doc.tree)) showLeaf(doc, leaf);
}

function structureChanged(doc) {
  doc.edited = true;
  doc.raw = null;
  doc.rawError = null;
  renderFields(doc);
  refresh(doc);
}

function buildCard(doc) {
  const reviewed = el("input", {type: "checkbox", className: "reviewed"});
  reviewed.addEventListener("change", () => { doc.reviewed = reviewed.checked; refresh(doc); });
  const notes = [doc.generatedJson ? "" : "not valid JSON as generated",
                 doc.truncated ? "cut off at MAX_NEW_TOKENS" : ""].filter(Boolean);
  const photo = doc.photo ? el("img", {src: doc.photo, alt: "the photo of " + doc.image, title: "click for the full image"})
                          : el("p", {className: "no-photo", textContent: "(image not found: moved or deleted since)"});
  if (doc.photo) photo.addEventListener("click", () => zoom(doc.full, doc.photo));
  const caption = doc.full ? el("figcaption", {}, el("a", {href: doc.full, target: "_blank", textContent: "the image file"})) : "";
  const showAll = el("input", {type: "checkbox", className: "show-all"});
  const showRaw = el("input", {type: "checkbox", className: "show-raw"});
  const textarea = el("textarea", {spellcheck: false});
  const reset = el("button", {type: "button", className: "reset", textContent: "undo all edits of this document"});
  const view = {
    card: el("section", {className: "card"}), reviewed, showAll, showRaw, textarea,
    flagged: el("div", {className: "flagged-list"}), all: el("div", {className: "all-fields"}),
    raw: el("div", {className: "raw"}), rawProblem: el("p", {className: "problem"}),
    problems: el("ul", {className: "problems"})};
  view.card.dataset.index = doc.row;  // its row in predict.jsonl: the page's order is the review's
  view.raw.append(textarea, view.rawProblem);
  view.card.append(
    el("header", {}, el("h2", {textContent: doc.image}), el("span", {className: "note", textContent: notes.join(" · ")}),
       el("span", {className: "held-out", textContent: doc.held_out ? "held out: " + doc.held_out + ", not exported" : ""}),
       el("label", {}, reviewed, " reviewed")),
    el("div", {className: "body"}, el("figure", {className: "photo"}, photo, caption),
       el("div", {className: "fields"}, view.flagged, view.problems,
          el("div", {className: "toggles"}, el("label", {}, showAll, " show all fields"),
             el("label", {}, showRaw, " edit as JSON"), reset),
          view.all, view.raw)));
  showAll.addEventListener("change", () => { doc.showAll = showAll.checked; refresh(doc); });
  showRaw.addEventListener("change", () => { doc.showRaw = showRaw.checked; refresh(doc); });
  textarea.addEventListener("input", () => {
    doc.edited = true;
    doc.raw = textarea.value;
    try {
      const tree = parseDocument(doc.raw);
      carryFlags(doc.tree, tree);
      doc.tree = tree;
      doc.rawError = null;
      renderFields(doc);
    } catch (error) { doc.rawError = error.message; }
    refresh(doc);
  });
  reset.addEventListener("click", () => {
    Object.assign(doc, initialState(doc.source), {edited: false});
    renderFields(doc);
    refresh(doc, false);  // as it came: nothing of it kept
  });
  doc.view = view;
  return view.card;
}

function refresh(doc, touched = true) {  // after a person's change to the document
  doc.touched = touched;
  refreshCard(doc);
  save();
  refreshStatus();
}

function refreshCard(doc) {
  // What follows from the document's state: its toggles, its text in the raw editor, its problems.
  const view = doc.view;
  view.reviewed.checked = doc.reviewed;
  view.showAll.checked = doc.showAll;
  view.showRaw.checked = doc.showRaw;
  view.card.classList.toggle("is-reviewed", doc.reviewed);
  view.all.hidden = !doc.showAll || !doc.tree;
  view.raw.hidden = !doc.showRaw;
  if (view.textarea !== document.activeElement) {
    view.textarea.value = doc.raw !== null ? doc.raw : doc.tree ? dumps(doc.tree, READABLE_LAYOUT) : "";
  }
  view.rawProblem.textContent = doc.rawError ? "Not valid JSON: " + doc.rawError : "";
  const found = doc.rawError ? [] : problems(doc);  // a text that does not parse is said under the text
  view.problems.replaceChildren(...found.map(problem => el("li", {textContent: problem})));
}

function unreadableCard(source) {
  // A file --predict could not read: its name and why, nothing to edit or export.
  const card = el("section", {className: "card unreadable"}, el("header", {}, el("h2", {textContent: source.image}),
    el("span", {className: "note", textContent: "unreadable: " + source.unreadable})));
  card.dataset.index = source.row;
  if (source.full) card.append(el("a", {href: source.full, target: "_blank", textContent: "the file"}));
  return card;
}

function refreshStatus() {
  let flagged = 0, untouched = 0;
  for (const doc of documents) {
    if (!doc.tree) continue;
    for (const [leaf] of leaves(doc.tree)) if (leaf.flag) { flagged++; if (!leaf.flag.touched) untouched++; }
  }
  const reviewed = documents.filter(doc => doc.reviewed);
  const blocked = reviewed.map(doc => [doc, problems(doc)]).filter(([, found]) => found.length);
  document.getElementById("status").textContent =
    `${reviewed.length} of ${documents.length} documents reviewed · ${untouched} of ${flagged} flagged fields untouched`;
  const button = document.getElementById("export");
  button.textContent = `Export ${reviewed.length - blocked.length} reviewed documents (${DATA.export_name})`;
  button.disabled = reviewed.length === blocked.length;
  document.getElementById("blocked").replaceChildren(...blocked.map(([doc, found]) =>
    el("li", {textContent: `not exported: ${doc.image}: ${found.join("; ")}`})));
}

function exportLines() {
  // One JSON line per reviewed document that passes, as Python's json.dumps(row) writes it.
  return documents.filter(doc => doc.reviewed && !problems(doc).length).map(doc =>
    "{" + [["image", doc.image], ["prefix", doc.prefix], ["suffix", dumps(doc.tree, LABEL_LAYOUT)], ["folder", DATA.folder]]
      .map(([key, value]) => pyString(key) + ": " + pyString(String(value))).join(", ") + "}\n");
}

function download() {
  const file = new Blob(exportLines(), {type: "application/jsonl"});
  const link = el("a", {href: URL.createObjectURL(file), download: DATA.export_name});
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 60000);
}

function zoom(file, photo) {
  // The image's own file where it still is, else the page's copy.
  const box = document.getElementById("zoom"), image = box.querySelector("img");
  image.onerror = () => { if (image.src !== photo) image.src = photo; };
  image.src = file || photo;
  box.hidden = false;
}

document.getElementById("zoom").addEventListener("click", event => { event.currentTarget.hidden = true; });
document.addEventListener("keydown", event => {
  if (event.key === "Escape") document.getElementById("zoom").hidden = true;
});
document.getElementById("export").addEventListener("click", download);
restore();
const byRow = new Map(documents.map(doc => [doc.row, doc]));
document.getElementById("cards").append(...DATA.documents.map(source =>
  source.unreadable ? unreadableCard(source) : buildCard(byRow.get(source.row))));
for (const doc of documents) { renderFields(doc); refreshCard(doc); }
refreshStatus();
"""
