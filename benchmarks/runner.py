"""One measurement per fresh process, for every benchmark here that measures variants: a new
process cannot warm another's caches or allocator, and its peak memory is its own.

A benchmark runs itself as `script --child ...`; the child prints its result as the last line
of stdout (JSON), and anything else it prints goes before that line or to stderr. Importing this
module also makes the repository importable and keeps the Hub offline (the demo's assets are local),
before a benchmark imports transformers.
"""

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")


class ChildFailed(RuntimeError):
    """A measurement's process exited with an error; `stderr` is what it printed there."""

    def __init__(self, what: str, stderr: str):
        super().__init__(f"{what} failed:\n{stderr[-3000:]}")
        self.stderr = stderr


def run_child(script: str, arguments: list[str], what: str, env: dict | None = None,
              timeout: float | None = None) -> dict:
    """`script --child *arguments` in a fresh process, run from the repository root with `env` added
    to this environment; the JSON of its last stdout line. ChildFailed (naming `what`) when it fails."""
    process = subprocess.run([sys.executable, os.path.abspath(script), "--child", *arguments],
                             capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})},
                             timeout=timeout)
    if process.returncode != 0:
        raise ChildFailed(what, process.stderr)
    return json.loads(process.stdout.strip().splitlines()[-1])


def answer_if_child(args, measure) -> bool:
    """In a child (`--child REQUEST`): print `measure(request)` as the last stdout line, for
    `run_child` to read, and say so; in the parent, False."""
    if not args.child:
        return False
    print(json.dumps(measure(json.loads(args.child))))
    return True


def parent_arguments(doc: str, measure, argv) -> argparse.Namespace | None:
    """A benchmark's flags as `benchmark_parser` reads them; None in a child, which has answered."""
    args = benchmark_parser(doc).parse_args(argv)
    return None if answer_if_child(args, measure) else args


def benchmark_parser(doc: str) -> argparse.ArgumentParser:
    """A benchmark's flags: its docstring's first paragraph as the description, `--work-dir`, and the
    hidden `--child` that `run_child` passes."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--work-dir", default="")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    return parser
