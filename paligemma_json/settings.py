"""The script's configurator: every UPPER_CASE constant becomes a `--lower-case` flag, typed by
its default, with its trailing comment as help. Unknown and misspelt flags are errors."""

import argparse
import re
import sys


def setting_help(script_path: str) -> dict:
    """Each constant's trailing comment, read from the script, so the why is written once."""
    with open(script_path, encoding="utf-8") as source:
        pairs = re.findall(r"^([A-Z_]+) = .*?#\s*(.+)$", source.read(), flags=re.MULTILINE)
    return dict(pairs)


def parse_overrides(argv: list[str], defaults: dict, script_path: str) -> dict:
    """`--some-name value` for every constant SOME_NAME; returns only the flags given."""
    parser = argparse.ArgumentParser(description="Fine-tune PaliGemma 2 to extract JSON from document photos.",
                                     allow_abbrev=False)  # a misspelt flag is an error, not a guess
    notes = setting_help(script_path)
    for name, default in defaults.items():
        flag = "--" + name.lower().replace("_", "-")
        text = f"{notes.get(name, '')} (default: {default})".replace("%", "%%")  # argparse formats help
        if isinstance(default, bool):
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, help=text,
                                default=argparse.SUPPRESS)
        elif isinstance(default, list):
            parser.add_argument(flag, dest=name, nargs="+", help=text, default=argparse.SUPPRESS)
        else:
            parser.add_argument(flag, dest=name, type=type(default), help=text, default=argparse.SUPPRESS)
    return vars(parser.parse_args(argv))


def in_notebook() -> bool:
    """Colab and Jupyter pass their own kernel arguments (`-f ...json`): those are not ours."""
    return "ipykernel" in sys.modules
