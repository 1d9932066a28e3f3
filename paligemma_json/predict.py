"""`--predict` over a backlog: thousands of documents, streamed to disk, resumable, on every process a
launcher starts.

Streamed. Each process appends its rows, batch by batch, to its own part file in
`OUTPUT_DIR/predict.jsonl.partial/` and flushes it, so a kill loses at most the batch in flight. When
every image is done, the first process merges the parts in the folder's order into `predict.jsonl`
(written under a temporary name and renamed over it, so an earlier `predict.jsonl` stays whole until
then) and removes the partial folder.

Resumable. `--predict DIR --resume` keeps the rows already in the partial folder by image identity (its
file name and size), so a folder that has grown gets only its new images predicted, an image that is
gone loses its row, and a different number of processes continues the same way: rows are never tied to
the process that wrote them. A line torn by the kill is cut off. The partial folder's `settings.json`
records what made its rows (the model's weights, the prompt, the token budget, the constraint, beams,
4-bit): a resume with any of them changed is refused in one line naming it.

Memory. Per document the run keeps its entry (file name and prompt), its size, and at the merge where
its row lies (part and offset): no list of the rows or their predictions. `BYTES_PER_DOCUMENT` is the
bound, held by tests/test_predict_backlog.py with tracemalloc.

Unreadable images. A file that cannot be read (empty, truncated, not an image) becomes a row marked
`unreadable` with the reason, counted at the end; the other images are read. Training splits keep their
rule: a bad image stops the run before any model loads (documents.py).

Several processes. Under torchrun or `accelerate launch` each process predicts every N-th image still
to do, on its own GPU; a gloo process group (CPU-only, a few barriers) keeps them in step.
"""

import array
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
from PIL import Image
from tqdm.auto import tqdm

from paligemma_json import FlowError
from paligemma_json.confidence import shown
from paligemma_json.distributed import end_distributed
from paligemma_json.documents import DocumentDataset, DocumentImages, document_row
from paligemma_json.files import read_saved_json, replace_atomically, write_json_atomically
from paligemma_json.plan import Launch

TARGET = "predict.jsonl"
PARTIAL = TARGET + ".partial"  # a folder: settings.json and part-NNNN.jsonl
SETTINGS = "settings.json"
BUDGET_RECORD = "generation.json"  # in final/: the token budget the run trained and evaluated with
FALLBACK_BUDGET = 1024  # a final/ saved before it recorded its budget
FILE_BYTES = "file_bytes"  # in a part's rows only: with `image`, the image's identity
BYTES_PER_DOCUMENT = 1024  # the bound on what the run keeps per document (623 B measured: tests/test_predict_backlog.py)
SAMPLE = 1 << 20  # bytes of a weights file read at its start, middle and end for its fingerprint
DESCRIBED = {"model": "the model (final/'s weights)", "use_qlora": "the 4-bit base (USE_QLORA)",
             "prompt": "the prompt", "max_new_tokens": "the token budget (MAX_NEW_TOKENS)",
             "constraint": "the constraint (CONSTRAINED, final/schema.json)", "num_beams": "the beams (NUM_BEAMS)"}
HASHED = ("model", "constraint")  # named, not quoted: their values are fingerprints


def record_budget(final_path: str, max_new_tokens: int) -> None:
    """Beside the weights: what `--predict` uses when MAX_NEW_TOKENS is 0."""
    write_json_atomically({"max_new_tokens": max_new_tokens}, os.path.join(final_path, BUDGET_RECORD))


def trained_budget(final_dir: str) -> int:
    """The budget `final/` records, printed; 1024 for a run saved before it recorded one."""
    record = read_saved_json(os.path.join(final_dir, BUDGET_RECORD)) or {}
    if "max_new_tokens" in record:
        budget = int(record["max_new_tokens"])
        print(f"token budget: {budget}, as the run trained and evaluated with ({final_dir}/{BUDGET_RECORD}); "
              "--max-new-tokens sets another")
        return budget
    print(f"token budget: {FALLBACK_BUDGET} ({final_dir} records none: saved before it did); "
          "--max-new-tokens sets another")
    return FALLBACK_BUDGET


def weights_fingerprint(final_dir: str) -> str:
    """The weights files' names, sizes and 1 MB at their start, middle and end: any retraining changes
    it, a copy of the folder does not, and a 6 GB file costs three reads."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(final_dir)):
        if name.endswith(".safetensors"):
            path = os.path.join(final_dir, name)
            size = os.path.getsize(path)
            digest.update(f"{name}:{size}".encode())
            with open(path, "rb") as file:
                for start in (0, size // 2, max(0, size - SAMPLE)):
                    file.seek(start)
                    digest.update(file.read(SAMPLE))
    return digest.hexdigest()[:16]


def prediction_settings(final_dir: str, prompt: str, max_new_tokens: int, schema: dict | None, constrained: bool,
                        num_beams: int, use_qlora: bool) -> dict:
    """What makes a row: a resumed `--predict` must match the rows already written in every one."""
    held = constrained and schema is not None
    return {"model": weights_fingerprint(final_dir), "use_qlora": use_qlora, "prompt": prompt,
            "max_new_tokens": max_new_tokens, "num_beams": num_beams,
            "constraint": hashlib.sha256(json.dumps(schema, sort_keys=True).encode()).hexdigest()[:16]
            if held else "free"}


def read_image(path: str) -> tuple[Image.Image | None, str | None]:
    """The image in RGB, or None and why it cannot be read."""
    if not os.path.isfile(path):
        return None, "missing (removed after the folder was listed)"
    if os.path.getsize(path) == 0:
        return None, "empty file (0 bytes)"
    try:
        with Image.open(path) as image:
            return image.convert("RGB"), None
    except Exception as error:  # PIL's own reason: truncated, not an image, ...
        return None, f"cannot be read as an image ({type(error).__name__}: {error})"


def unreadable_row(entry: dict, path: str, reason: str) -> dict:
    return {"image": entry["image"], "image_path": path, "prefix": entry["prefix"], "prediction": "",
            "truncated": False, "confidence": [], "parsed": False, "unreadable": reason}


class ReadImages(DocumentDataset):
    """A batch's images, already read, in the shape the script's `predict_rows` takes."""

    def __init__(self, pairs: list, image_directory_path: str):
        self.pairs, self.image_directory_path = pairs, image_directory_path
        self.entries = [entry for _, entry in pairs]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int):
        return self.pairs[index]


def complete_lines(path: str):
    """(offset, end, row) for each whole line of a part; a line torn by a kill (no newline, not JSON)
    ends it."""
    offset = 0
    with open(path, "rb") as file:
        for raw in file:
            try:
                row = json.loads(raw) if raw.endswith(b"\n") else None
            except ValueError:
                row = None
            if not isinstance(row, dict):
                return
            yield offset, offset + len(raw), row
            offset += len(raw)


def start_processes(launch: Launch) -> None:
    """Under a launcher: a gloo group for the barriers (CPU-only, whatever the GPUs); a day's timeout,
    for the first process waiting on the others' last batches."""
    if launch.processes > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", timeout=timedelta(hours=24))


def wait_for_all(launch: Launch) -> None:
    if launch.processes > 1:
        torch.distributed.barrier()


@dataclass
class Tally:
    """The closing line's counts, taken as the merge writes each row."""
    threshold: float
    rows: int = 0
    parsed: int = 0
    unsure: int = 0
    truncated: int = 0
    unreadable: int = 0
    new: int = 0
    seconds: float = 0.0
    kept: int = 0
    said: str = ""
    target: str = ""

    def add(self, row: dict) -> None:
        self.rows += 1
        self.parsed += bool(row.get("parsed"))
        self.truncated += bool(row.get("truncated"))
        self.unreadable += "unreadable" in row
        self.unsure += sum(leaf["confidence"] < self.threshold for leaf in row.get("confidence") or [])

    def lines(self) -> list[str]:
        rate = self.new / self.seconds if self.seconds else 0.0
        return [f"predicted {self.new} images in {self.seconds:.1f} s ({rate:.2f} images/s)"
                + (f"; {self.kept} kept from the cut-off run" if self.kept else ""),
                f"predicted: {self.rows} images, {self.parsed} parsed as JSON, {self.unsure} fields below confidence "
                f"{shown(self.threshold)} to check, {self.truncated} cut off at the token budget, {self.unreadable} "
                f"unreadable; {self.said} {self.target}"]


class Backlog:
    """The documents of one `--predict`: what is already done in the partial folder, what this process
    predicts, and the merge. Built by every process; only the first (`launch.writes`) prints and merges."""

    def __init__(self, output_dir: str, documents: DocumentImages, settings: dict, resume: bool, launch: Launch):
        self.documents, self.launch, self.settings = documents, launch, settings
        self.partial, self.target = os.path.join(output_dir, PARTIAL), os.path.join(output_dir, TARGET)
        folder = documents.image_directory_path
        sizes = (os.path.getsize(path) if os.path.isfile(path) else -1
                 for path in (os.path.join(folder, entry["image"]) for entry in documents.entries))
        self.sizes = array.array("q", sizes)  # 8 bytes a document
        start_processes(launch)
        recorded = read_saved_json(os.path.join(self.partial, SETTINGS)) if os.path.isdir(self.partial) else None
        self.continuing = resume and recorded is not None
        if self.continuing:
            changed = [DESCRIBED.get(name, name) + ("" if name in HASHED else f" ({recorded.get(name)!r}, now "
                                                    f"{settings.get(name)!r})")
                       for name in sorted(set(settings) | set(recorded)) if settings.get(name) != recorded.get(name)]
            if changed:
                raise FlowError(f"--resume: {self.partial} was predicted with other settings; changed: "
                                f"{', '.join(changed)}. Pass the settings it was made with, or run without --resume "
                                "to predict every image again")
        self.parts = sorted(name for name in os.listdir(self.partial) if name.startswith("part-")) \
            if self.continuing else []
        done, self.torn = set(), []
        for name in self.parts:
            path, end = os.path.join(self.partial, name), 0
            for _, end, row in complete_lines(path):
                done.add((row.get("image"), row.get(FILE_BYTES)))
            if end < os.path.getsize(path):
                self.torn.append((path, end))
        here = {self.identity(index) for index in range(len(documents))}
        self.todo = [index for index in range(len(documents)) if self.identity(index) not in done]
        self.kept, self.gone = len(documents) - len(self.todo), len(done - here)
        if launch.writes:
            self.say(resume, recorded is not None)
        wait_for_all(launch)  # every process has read the partial folder before the first changes it
        if launch.writes:
            self.prepare()
        wait_for_all(launch)

    def identity(self, index: int) -> tuple:
        return self.documents.entries[index]["image"], self.sizes[index]

    def say(self, resume: bool, cut_off: bool) -> None:
        if self.continuing:
            torn = f"; a torn last line dropped ({len(self.torn)} part{'s' * (len(self.torn) > 1)})" if self.torn else ""
            gone = f"; {self.gone} rows of images gone or changed dropped" if self.gone else ""
            print(f"resume: kept {self.kept} rows, predicting {len(self.todo)} ({self.partial}{torn}{gone})")
        elif resume:
            print(f"resume: nothing to continue in {self.partial}; predicting every image from the beginning")
        elif cut_off:
            print(f"predict: starting over; the cut-off {self.partial} is discarded (--resume continues one)")

    def prepare(self) -> None:
        """The first process: a fresh partial folder with its settings, or torn lines cut off the kept one."""
        if not self.continuing:
            shutil.rmtree(self.partial, ignore_errors=True)
            os.makedirs(self.partial)
            write_json_atomically(self.settings, os.path.join(self.partial, SETTINGS))
        for path, end in self.torn:
            os.truncate(path, end)

    def finish(self, decode, batch_size: int, threshold: float) -> "Tally | None":
        """This process's share predicted; then, in the first process, the merge and the closing lines
        (its tally returned; None in the others)."""
        self.predict(decode, batch_size)
        if not self.launch.writes:
            end_distributed()
            return None
        tally = self.merge(threshold)
        end_distributed()
        for line in tally.lines():
            print(line)
        return tally

    def predict(self, decode, batch_size: int) -> None:
        """This process's share of what is left (every N-th image), appended to its own part a batch at a
        time. `decode(dataset)`: the prediction rows of a batch's readable images, in order."""
        rank, processes = self.launch.rank, self.launch.processes
        share = self.todo[rank::processes]
        started = time.perf_counter()
        folder = self.documents.image_directory_path
        part = os.path.join(self.partial, f"part-{len(self.parts) + rank:04d}.jsonl")
        description = "predicting" + (f" (process 1 of {processes}: its share)" if processes > 1 else "")
        with open(part, "a", encoding="utf-8") as out, tqdm(total=len(share), unit="image", desc=description,
                                                             disable=not self.launch.writes) as bar:
            for first in range(0, len(share), batch_size):
                rows, readable = {}, []
                for index in share[first:first + batch_size]:
                    entry = self.documents.entries[index]
                    path = os.path.join(folder, entry["image"])
                    image, reason = read_image(path)
                    if image is None:
                        rows[index] = unreadable_row(entry, path, reason)
                    else:
                        readable.append((index, (image, entry)))
                if readable:
                    predicted = decode(ReadImages([pair for _, pair in readable], folder))
                    rows.update((index, document_row(row)) for (index, _), row in zip(readable, predicted))
                out.writelines(json.dumps({**rows[index], FILE_BYTES: self.sizes[index]}) + "\n"
                               for index in sorted(rows))
                out.flush()  # a kill from here on loses none of this batch
                bar.update(len(rows))
        wait_for_all(self.launch)
        self.seconds = time.perf_counter() - started

    def merge(self, threshold: float) -> Tally:
        """The first process: every part's rows in the folder's order into `predict.jsonl`, renamed into
        place, then the partial folder removed. The rows are read back one at a time from where they lie."""
        tally = Tally(threshold, new=len(self.todo), seconds=self.seconds, kept=self.kept, target=self.target)
        parts = [os.path.join(self.partial, name) for name in sorted(os.listdir(self.partial))
                 if name.startswith("part-")]
        where = {}
        for number, path in enumerate(parts):
            for offset, _, row in complete_lines(path):
                where.setdefault((row.get("image"), row.get(FILE_BYTES)), (number, offset))

        def write(temporary):
            files = [open(path, "rb") for path in parts]
            try:
                with open(temporary, "w", encoding="utf-8") as out:
                    for index in range(len(self.documents)):
                        number, offset = where[self.identity(index)]
                        files[number].seek(offset)
                        row = json.loads(files[number].readline())
                        del row[FILE_BYTES]
                        tally.add(row)
                        out.write(json.dumps(row) + "\n")
            finally:
                for file in files:
                    file.close()
        tally.said = replace_atomically(write, self.target)
        shutil.rmtree(self.partial)
        return tally


def predicted_rows(path: str):
    """The rows of a `predict.jsonl`, one at a time."""
    with open(path, encoding="utf-8") as file:
        for line in file:
            yield json.loads(line)
