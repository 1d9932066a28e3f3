"""Scores for predicted JSON. Kept apart from the flow so `--evaluate` and tests can use it alone."""

import json


def parse_json(text: str):
    """The parsed object or array, or None: no repair, so a truncated list counts as invalid."""
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return None
    return value if isinstance(value, (dict, list)) else None


def compute_metrics(rows: list[dict]) -> dict:
    """Flat figures over prediction rows (each with `prediction` and `suffix`)."""
    if not rows:
        return {"rows": 0, "json_valid_rate": 0.0}
    valid = sum(parse_json(row["prediction"]) is not None for row in rows)
    return {"rows": len(rows), "json_valid_rate": valid / len(rows)}
