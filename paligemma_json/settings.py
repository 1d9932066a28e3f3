"""The script's configurator: every UPPER_CASE constant becomes a `--lower-case` flag, typed by
its default, with its trailing comment as help. Unknown and misspelt flags are errors."""

import argparse
import re
import sys

from paligemma_json import FlowError
from paligemma_json.tracking import mask_secrets


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


def resolve_settings(argv: list[str], defaults: dict, script_path: str) -> dict:
    """Defaults, then the demo's overrides, then the flags given: the later wins."""
    given = {} if in_notebook() else parse_overrides(argv, defaults, script_path)
    settings, demo = dict(defaults), given.get("DEMO", defaults["DEMO"])
    if demo:
        from paligemma_json.demo import DEMO_OVERRIDES, demo_paths  # the demo's own imports, only for a demo
        print("demo: overriding " + ", ".join(f"{k}={v}" for k, v in DEMO_OVERRIDES.items() if k not in given))
        settings.update(DEMO_OVERRIDES)
    settings.update(given)
    if demo:  # built in step 2, inside OUTPUT_DIR
        settings["DATASET_DIR"], settings["MODEL_ID"] = demo_paths(settings["OUTPUT_DIR"])
    if settings["USE_QLORA"]:
        settings["USE_LORA"] = True  # QLoRA is LoRA on a quantized base
    return settings


def report_flow_errors(kind, error, traceback):
    """The script's excepthook: a FlowError is one line and exit code 2, never a traceback."""
    if issubclass(kind, FlowError):
        print("error: " + mask_secrets(" ".join(str(error).split())), file=sys.stderr)  # one line, whatever it quotes
        sys.exit(2)
    sys.__excepthook__(kind, error, traceback)
