"""`report.html`: every test prediction beside its image, field by field, in one self-contained page
that opens from disk (no server, no network, no framework). Everything from labels and predictions
is escaped: a label holding `<script>` shows as text."""

import base64
import io
from html import escape

from paligemma_json.files import write_text_atomically
from paligemma_json.metrics import ScoredRow
from paligemma_json.pictures import load_thumbnail

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 0 auto; padding: 12px; max-width: 1200px; color: #222; }
h1 { font-size: 20px; } h2 { font-size: 17px; margin-top: 24px; }
table { border-collapse: collapse; display: block; max-width: 100%; overflow-x: auto; }
td, th { padding: 2px 8px; text-align: left; border-bottom: 1px solid #ddd; }
td { overflow-wrap: anywhere; }
.tables { display: flex; flex-wrap: wrap; gap: 24px; align-items: flex-start; }
.controls { position: sticky; top: 0; background: #f4f4f4; padding: 8px; display: flex; flex-wrap: wrap; gap: 12px; }
.card { display: flex; flex-wrap: wrap; gap: 12px; border: 1px solid #ccc; border-radius: 6px; padding: 10px; margin: 10px 0; }
.card img { width: 240px; max-width: 100%; height: auto; align-self: flex-start; }
.card .fields { flex: 1 1 320px; min-width: 0; overflow-wrap: anywhere; }
.card h3 { font-size: 14px; margin: 0 0 6px; }
.right { color: #14822e; } .wrong { color: #c41e1e; } .missing { color: #c96f00; } .extra { color: #7a3caa; }
.raw { white-space: pre-wrap; background: #fbecec; padding: 6px; font-family: monospace; }
.hidden { display: none; }
"""

SCRIPT = """
const cards = Array.from(document.querySelectorAll('.card'));
const onlyErrors = document.getElementById('only-errors');
const field = document.getElementById('field');
const order = document.getElementById('order');
function update() {
  const wanted = field.value;
  for (const card of cards) {
    let show = !onlyErrors.checked || Number(card.dataset.wrong) > 0;
    let rows = card.querySelectorAll('tr[data-field]');
    let match = false;
    for (const row of rows) {
      const mine = wanted === '' || row.dataset.field === wanted;
      row.classList.toggle('hidden', !mine);
      if (mine && (!onlyErrors.checked || row.dataset.status !== 'right')) match = true;
    }
    if (wanted !== '') show = show && match;
    card.classList.toggle('hidden', !show);
  }
  const sorted = cards.slice().sort((a, b) => order.value === 'wrong'
    ? Number(b.dataset.wrong) - Number(a.dataset.wrong) || Number(a.dataset.index) - Number(b.dataset.index)
    : Number(a.dataset.index) - Number(b.dataset.index));
  const list = document.getElementById('cards');
  for (const card of sorted) list.appendChild(card);
}
for (const control of [onlyErrors, field, order]) control.addEventListener('change', update);
update();
"""


def thumbnail_data_uri(path: str | None, size: int = 360) -> str | None:
    image = load_thumbnail(path, size)
    if image is None:
        return None
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def shade(confidence) -> str:
    """Low confidence as a yellow background, stronger the lower it is; the figure on hover."""
    if confidence is None:
        return ""
    return (f' style="background: rgba(255, 200, 0, {max(0.0, min(1.0, 1 - float(confidence))) * 0.6:.2f})"'
            f' title="confidence {float(confidence):.2f}" data-confidence="{float(confidence):.4f}"')


def card_html(index: int, scored: ScoredRow) -> tuple[str, int]:
    """One test row: its image, then each field with the true and predicted value."""
    row = scored.raw
    uri = thumbnail_data_uri(row.get("image_path"))
    image = f'<img src="{uri}" alt="{escape(str(row.get("image", "")))}">' if uri else "<p>(image not found)</p>"
    if scored.prediction is None:
        body, wrong = (f'<p class="wrong">invalid JSON, as generated:</p>'
                       f'<div class="raw">{escape(row["prediction"]) or "(empty)"}</div>'), 1
        if scored.truth is not None:
            body += f'<p>true:</p><div class="raw">{escape(row["suffix"])}</div>'
    else:
        statuses = scored.statuses
        wrong = sum(status != "right" for status, _, _, _ in statuses)
        lines = []
        for status, key, true, predicted in statuses:
            lines.append(f'<tr data-field="{escape(key)}" data-status="{status}" class="{status}"'
                         f'{shade(scored.confidence_of(key, predicted))}><td>{escape(key)}</td><td>{escape(true)}</td>'
                         f'<td>{escape(predicted)}</td><td>{status}</td></tr>')
        body = ("<table><tr><th>field</th><th>true</th><th>predicted</th><th></th></tr>"
                + "".join(lines) + "</table>")
    cut_off = " · cut off at MAX_NEW_TOKENS" if row.get("truncated") else ""
    title = f'<h3>{escape(str(row.get("image", f"row {index + 1}")))} · {wrong} wrong, missing or extra{cut_off}</h3>'
    return (f'<div class="card" data-index="{index}" data-wrong="{wrong}">{image}'
            f'<div class="fields">{title}{body}</div></div>'), wrong


def metrics_tables(metrics: dict) -> str:
    overall = "".join(f"<tr><td>{escape(name)}</td><td>{value:.3f}</td></tr>" if isinstance(value, float) else
                      f"<tr><td>{escape(name)}</td><td>{escape(str(value))}</td></tr>"
                      for name, value in metrics.items() if name != "per_field")
    fields = "".join(f"<tr><td>{escape(name)}</td><td>{f['accuracy']:.3f}</td><td>{f['correct']}</td>"
                     f"<td>{f['support']}</td><td>{f['predicted']}</td></tr>"
                     for name, f in metrics.get("per_field", {}).items())
    return (f'<div class="tables"><table><tr><th>metric</th><th>value</th></tr>{overall}</table>'
            f"<table><tr><th>field (worst first)</th><th>accuracy</th><th>correct</th><th>support</th>"
            f"<th>predicted</th></tr>{fields}</table></div>")


def page_head(title: str, style: str) -> str:
    """The start of a self-contained page, up to its `<body>`: report.html's and review.html's."""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title><style>{style}</style></head>
<body>"""


def write_html_report(rows: list[ScoredRow], metrics: dict, path: str) -> None:
    cards = [card_html(index, row) for index, row in enumerate(rows)]
    options = "".join(f'<option value="{escape(name)}">{escape(name)}</option>' for name in metrics.get("per_field", {}))
    page = f"""{page_head("Test predictions", STYLE)}
<h1>Test predictions: {len(rows)} rows, {sum(wrong > 0 for _, wrong in cards)} with errors</h1>
{metrics_tables(metrics)}
<h2>Every test row</h2>
<div class="controls">
<label><input type="checkbox" id="only-errors"> only rows with errors</label>
<label>field <select id="field"><option value="">all fields</option>{options}</select></label>
<label>order <select id="order"><option value="index">as in the dataset</option>
<option value="wrong">most wrong fields first</option></select></label>
</div>
<div id="cards">{"".join(html for html, _ in cards)}</div>
<script>{SCRIPT}</script>
</body></html>
"""
    write_text_atomically(page, path)
