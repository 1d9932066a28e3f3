"""The script's configurator: every UPPER_CASE constant becomes a `--lower-case` flag, typed by
its default, with its trailing comment as help. Unknown and misspelt flags are errors, in one line,
with the closest flag named."""

import argparse
import difflib
import os
import re
import sys

from paligemma_json import FlowError
from paligemma_json.keys import mask_secrets


def setting_help(script_path: str) -> dict:
    """Each constant's trailing comment, read from the script, so the why is written once."""
    with open(script_path, encoding="utf-8") as source:
        pairs = re.findall(r"^([A-Z_]+) = .*?#\s*(.+)$", source.read(), flags=re.MULTILINE)
    return dict(pairs)


# The README's commands, one run of each kind, in the order a newcomer meets them.
EXAMPLES = """examples:
  python {script} --demo
      offline, no GPU: synthetic manifests and a tiny random model, through the whole flow
  python {script} --model-id google/paligemma2-3b-pt-448 --output-dir runs/pallet-448
      your run: the Roboflow export (ROBOFLOW_API_KEY from the environment), or --dataset-dir
  python {script} --output-dir runs/pallet-448 --predict path/to/photos/
      read new photos with the trained model: runs/pallet-448/predict.jsonl
  python {script} --output-dir runs/pallet-448 --merge
      LoRA runs: the adapter folded into its base, runs/pallet-448/merged/, which loads without peft
  python {script} --evaluate runs/pallet-448/predictions.jsonl
      score a predictions file again, with no model"""


class FlagParser(argparse.ArgumentParser):
    """argparse with its errors in one line, first and alone: its own way prints the whole usage
    (every flag, dozens of lines) above the error, which then goes unseen."""

    def error(self, message: str):
        one_line = " ".join(mask_secrets(message).split())  # a value pasted by mistake may be a key
        print(f"error: {one_line} (python {self.prog} --help lists every flag)", file=sys.stderr)
        sys.exit(2)


def flag_name(name: str) -> str:
    return "--" + name.lower().replace("_", "-")


def unknown_flag_error(extra: str, flags: list[str]) -> str:
    """What is wrong with the first argument no flag took, with the closest flag to a misspelt one."""
    if not extra.startswith("-"):
        return (f"unexpected value {extra!r}: a flag is --name value, and a yes/no one takes none: "
                "--use-lora or --no-use-lora")
    flag = extra.split("=", 1)[0]  # --name=value: name the flag, never quote the value
    closest = difflib.get_close_matches(flag.replace("_", "-"), flags, n=1)
    return f"unknown flag {flag}" + (f"; did you mean {closest[0]}?" if closest else "")


def parse_overrides(argv: list[str], defaults: dict, script_path: str) -> dict:
    """`--some-name value` for every constant SOME_NAME; returns only the flags given."""
    script = os.path.basename(script_path)
    parser = FlagParser(prog=script, epilog=EXAMPLES.format(script=script),
                        description="Fine-tune PaliGemma 2 to extract JSON from document photos. Every flag sets "
                                    "the constant of that name at the top of the script.",
                        formatter_class=argparse.RawDescriptionHelpFormatter,  # the examples keep their lines
                        allow_abbrev=False)  # a misspelt flag is an error, not a guess
    notes, flags = setting_help(script_path), []
    for name, default in defaults.items():
        flag = flag_name(name)
        flags.append(flag)
        text = f"{notes.get(name, '')} (default: {default})".replace("%", "%%")  # argparse formats help
        if isinstance(default, bool):
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, help=text,
                                default=argparse.SUPPRESS)
            flags.append("--no-" + flag[2:])
        elif isinstance(default, list):
            parser.add_argument(flag, dest=name, nargs="+", help=text, default=argparse.SUPPRESS)
        else:
            parser.add_argument(flag, dest=name, type=type(default), help=text, default=argparse.SUPPRESS)
    given, extras = parser.parse_known_args(argv)  # known first: a misspelt flag is then named on its own
    if extras:
        parser.error(unknown_flag_error(extras[0], flags))
    return vars(given)


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


def settings_line(settings: dict, defaults: dict) -> str:
    """Step 1's line: only the settings that differ from the script's defaults (the demo's and the
    flags given), so that what this run changes is read at a glance; --help lists the rest."""
    changed = [f"{name}={value}" for name, value in settings.items() if name not in defaults or value != defaults[name]]
    if not changed:
        return "settings: the defaults (--help lists them)"
    return "settings: " + ", ".join(changed) + ", and the defaults for the rest (--help lists them)"


def report_flow_errors(kind, error, traceback):
    """The script's excepthook: a FlowError is one line and exit code 2, never a traceback."""
    if issubclass(kind, FlowError):
        print("error: " + mask_secrets(" ".join(str(error).split())), file=sys.stderr)  # one line, whatever it quotes
        sys.exit(2)
    sys.__excepthook__(kind, error, traceback)
