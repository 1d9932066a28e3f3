"""Pictures of a run: test predictions field by field, and the training curves."""

import os
import textwrap

from PIL import Image, ImageDraw, ImageFont

from paligemma_json.files import replace_atomically
from paligemma_json.confidence import FALLBACK_THRESHOLD, shown
from paligemma_json.metrics import ScoredRow

RIGHT, WRONG, MISSING, EXTRA = (20, 130, 50), (200, 30, 30), (215, 120, 0), (120, 60, 170)
UNSURE = (255, 226, 120)  # the highlight behind a field whose confidence is below the threshold
CARD_WIDTH, CARD_HEIGHT, THUMB_SIZE, LINE = 860, 400, 300, 15


def _font(size: int, bold: bool = False):
    """DejaVu, which matplotlib ships, has the ✓ ✗ → marks that Pillow's built-in font lacks."""
    import matplotlib
    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    try:
        return ImageFont.truetype(os.path.join(matplotlib.get_data_path(), "fonts", "ttf", name), size)
    except OSError:
        return ImageFont.load_default(size=size)


def load_thumbnail(path: str | None, size: int) -> Image.Image | None:
    """The image shrunk to fit a `size` square, or None when it is gone or unreadable: a
    predictions file outlives its images."""
    try:
        image = Image.open(path).convert("RGB")
    except Exception:
        return None
    image.thumbnail((size, size))
    return image


def _thumbnail_or_placeholder(path: str | None) -> Image.Image:
    image = load_thumbnail(path, THUMB_SIZE)
    if image is None:
        image = Image.new("RGB", (THUMB_SIZE, THUMB_SIZE), (200, 200, 200))
        ImageDraw.Draw(image).text((20, THUMB_SIZE // 2), "image not found", fill=(90, 90, 90), font=_font(16))
    return image


def _draw_card(scored: ScoredRow, font, bold, threshold: float) -> Image.Image:
    row = scored.raw
    card = Image.new("RGB", (CARD_WIDTH, CARD_HEIGHT), "white")
    draw = ImageDraw.Draw(card)
    card.paste(_thumbnail_or_placeholder(row.get("image_path")), (8, 30))
    draw.text((8, 6), str(row.get("image", ""))[:90], fill="black", font=bold)
    x, y, bottom = THUMB_SIZE + 24, 30, CARD_HEIGHT - 2 * LINE - 4
    if scored.prediction is None:
        draw.text((x, y), "invalid JSON, as generated:", fill=WRONG, font=bold)
        text = row["prediction"] or "(empty)"
        for start in range(0, min(len(text), 24 * 60), 60):
            y += LINE
            draw.text((x, y), text[start:start + 60], fill=(60, 60, 60), font=font)
        return card
    lines = field_lines(scored, threshold, (bottom - y) // LINE)
    for number, (text, colour, sureness) in enumerate(lines):
        y += LINE if number else 0
        if sureness is not None:  # the model itself was unsure: worth a second look, right or wrong
            draw.rectangle((x - 2, y, x + draw.textlength(text, font=font) + 2, y + LINE - 1), fill=UNSURE)
        draw.text((x, y), text, fill=colour, font=font if number else bold)
    return card


MARKS = {"right": ("✓", RIGHT), "wrong": ("✗", WRONG), "missing": ("–", MISSING), "extra": ("+", EXTRA)}


def field_lines(scored: ScoredRow, threshold: float, room: int) -> list[tuple[str, tuple, float | None]]:
    """A card's text lines, `(text, colour, confidence below the threshold or None)`, at most `room` + 1:
    a count, then each field, errors first. When they do not all fit, the right fields come first as
    a list of their names (so what the model reads shows on every card), then as many errors as fit."""
    statuses = scored.statuses
    wrong = sum(status != "right" for status, _, _, _ in statuses)
    lines = [(f"{len(statuses) - wrong} right, {wrong} wrong, missing or extra", (0, 0, 0), None)]
    ordered = sorted(statuses, key=lambda s: s[0] == "right")  # errors first: they matter most
    if len(ordered) > room:
        names = list(dict.fromkeys(key for status, key, _, _ in statuses if status == "right"))
        wrapped = textwrap.wrap("✓ " + ", ".join(names), 70) if names else []
        lines += [(text, RIGHT, None) for text in wrapped[:2]]  # at most two lines of names
        if len(wrapped) > 2:
            lines[-1] = (lines[-1][0] + " …", RIGHT, None)
        ordered = [status for status in ordered if status[0] != "right"]
    for number, (status, key, true, predicted) in enumerate(ordered):
        if len(lines) > room:
            lines[-1] = (f"... {len(ordered) - number + 1} more", (90, 90, 90), None)
            break
        mark, colour = MARKS[status]
        value = f"{predicted} → {true}" if status == "wrong" else true or predicted
        text = f"{mark} {key}: {value}"[:70]
        sureness = scored.confidence_of(key, predicted, default=1.0)
        unsure = sureness < threshold
        lines.append((text + (f"  ? {sureness:.2f}" if unsure else ""), colour, sureness if unsure else None))
    return lines


def draw_predictions(rows: list[ScoredRow], path: str, max_cards: int = 8, columns: int = 2,
                     threshold: float = FALLBACK_THRESHOLD) -> None:
    """A grid of test rows: each image beside its fields, errors first and coloured, fields the
    model was unsure of (confidence below `threshold`) highlighted."""
    font, bold = _font(12), _font(13, bold=True)
    cards = [_draw_card(row, font, bold, threshold) for row in rows[:max_cards]]
    rows_of_cards = (len(cards) + columns - 1) // columns
    legend_height = 28
    sheet = Image.new("RGB", (columns * (CARD_WIDTH + 8) + 8, rows_of_cards * (CARD_HEIGHT + 8) + 8 + legend_height),
                      (225, 225, 225))
    draw = ImageDraw.Draw(sheet)
    x = 10
    for text, colour in [("✓ right", RIGHT), ("✗ wrong: predicted → true", WRONG), ("– missing", MISSING),
                         ("+ extra", EXTRA), (f"? confidence < {shown(threshold)}", (60, 60, 60)),
                         (f"first {len(cards)} of {len(rows)} test rows", (60, 60, 60))]:
        if text.startswith("?"):
            draw.rectangle((x - 2, 6, x + draw.textlength(text, font=bold) + 2, 22), fill=UNSURE)
        draw.text((x, 7), text, fill=colour, font=bold)
        x += draw.textlength(text, font=bold) + 30
    for index, card in enumerate(cards):
        sheet.paste(card, (8 + (index % columns) * (CARD_WIDTH + 8),
                           legend_height + 8 + (index // columns) * (CARD_HEIGHT + 8)))
    replace_atomically(lambda temporary: sheet.save(temporary, format="PNG"), path)


def draw_training_curves(log_history: list[dict], path: str, best_step: int | None = None) -> None:
    """Training and validation loss, and validation field F1 / valid-JSON rate, over steps."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    def series(name):
        points = [(entry["step"], entry[name]) for entry in log_history if name in entry and "step" in entry]
        return [step for step, _ in points], [value for _, value in points]

    figure, (losses, quality) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, label in [("loss", "training loss"), ("eval_loss", "validation loss")]:
        steps, values = series(name)
        losses.plot(steps, values, marker="o" if name == "eval_loss" else None, label=label)
    for name, label in [("eval_field_f1", "validation field F1"), ("eval_json_valid_rate", "validation valid JSON")]:
        steps, values = series(name)
        quality.plot(steps, values, marker="o", label=label)
    losses.set(title="Loss", xlabel="optimizer step", ylabel="loss")
    quality.set(title="Extraction quality on the validation split", xlabel="optimizer step", ylim=(-0.02, 1.02))
    for axis in (losses, quality):
        if best_step is not None:
            axis.axvline(best_step, color="grey", linestyle="--", label=f"best checkpoint (step {best_step})")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    replace_atomically(lambda temporary: figure.savefig(temporary, dpi=100, format="png"), path)
    plt.close(figure)
