# %% [markdown]
# # Fine-tune PaliGemma 2 to read photographed documents into JSON
#
# The flow of Roboflow's guide "How to Fine-tune PaliGemma 2" (pallet load manifests → JSON), with
# its bugs fixed: download the Roboflow JSONL export, load it as `JSONLDataset`, batch it with
# `collate_fn`, load the model with LoRA / QLoRA / a frozen vision tower, train with the Hugging Face
# `Trainer`, predict the test set and score the predictions.
#
#     pip install torch==2.13.0 && pip install -r requirements.txt   # or keep the CUDA torch you have
#     python finetune_paligemma2.py --demo          # offline: synthetic manifests, tiny random model
#     ROBOFLOW_API_KEY=... python finetune_paligemma2.py --model-id google/paligemma2-3b-pt-448
#
# Last measured (README): `--demo` on a 2-core CPU (torch 2.13.0, transformers 5.24.0), three seeds:
# the paper's colour, the one field a 64 px page shows, right on 23-24 of 24 test pages (guessing: 7-10).
#
# Every constant in step 1 is also a flag (`--help` lists them). In Colab, run the cells in order;
# edit the constants in place of flags.

# %% [markdown]
# ## 0. In Colab: fetch this repository and its requirements
# Nothing happens here outside Colab, nor in the one-file notebook, whose first cell wrote `paligemma_json/`.

# %%
import os
import subprocess
import sys

REPO_URL = "https://github.com/YOUR-NAME/paligemma2-json.git"  # your fork or copy of this repository

if __name__ == "__main__" and "google.colab" in sys.modules and not os.path.exists("paligemma_json"):
    subprocess.run(["git", "clone", "--depth", "1", REPO_URL, "paligemma2-json"], check=True)
    os.chdir("paligemma2-json")
    sys.path.insert(0, os.getcwd())
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-r", "requirements.txt"], check=True)

# %% [markdown]
# ## 1. Settings
# Every constant below can be overridden: `--learning-rate 1e-4`, `--no-use-lora`, `--demo`.

# %%
import functools
import json
import re

import torch
from PIL import Image
from torch.utils.data import Dataset

from paligemma_json import FlowError  # a problem the user can fix: one line, never a traceback
from paligemma_json.confidence import (calibrate_fields, check_confidence_settings, prediction_confidence,
                                       training_threshold)
from paligemma_json.files import adapter_base, completed_rows, newest_checkpoint, prepare_output_dir
from paligemma_json.settings import in_notebook, parse_overrides
from paligemma_json.tracking import check_tracking_settings, mask_secrets  # trackers' keys are never printed

# Data
ROBOFLOW_WORKSPACE = "roboflow-jvuqo"  # the tutorial's pallet-manifest dataset on Roboflow Universe
ROBOFLOW_PROJECT = "pallet-load-manifest-json"  # the project in that workspace
ROBOFLOW_VERSION = 2  # v2 is the JSONL export with `<JSON>` prefixes
DATASET_DIR = "pallet-load-manifest-json-2"  # a Roboflow JSONL export; downloaded here if absent
PROMPT = "extract data in JSON format"  # replaces each row's prefix (v2's is `<JSON>`); "" keeps it
DATASET_REPORT = True  # sizes, label lengths, fields and leaks between splits, before any model loads
STRICT = False  # a leak between splits (the same photo or label in two) stops the run
SCHEMA = ""  # your JSON Schema for the labels; "" infers one from the train and valid labels

# Model
MODEL_ID = "google/paligemma2-3b-pt-224"  # the tutorial's; for documents 448 px reads far better
USE_LORA = True  # train small adapters, not the 3B weights
USE_QLORA = False  # LoRA on a 4-bit (nf4) base: least memory, needs bitsandbytes
FREEZE_VISION = False  # keep SigLIP and the projector as they are, in every mode
LORA_RANK = 8  # the tutorial's
LORA_TARGET_MODULES = ["q_proj", "o_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]  # the tutorial's

# Training: the measured pallet-manifest run (effective batch 8, 20 epochs ≈ 360 steps on 150
# images, lr 2e-5). The tutorial's 3 epochs at an effective batch of 48 give only ~9 steps here.
EPOCHS = 20.0  # passes over the training split; a fraction (2.5) stops part-way through the last
MAX_STEPS = -1  # > 0 stops after this many optimizer steps (short runs, smoke tests)
BATCH_SIZE = 2  # images per device per step
GRAD_ACCUM = 4  # batches per optimizer step: BATCH_SIZE × GRAD_ACCUM = effective batch 8
GRADIENT_CHECKPOINTING = False  # recompute activations in the backward: less memory, ~30% slower steps (BENCHMARKS.md)
LEARNING_RATE = 2e-5  # the measured run's; the tutorial's 5e-5 saw ~9 steps
LR_SCHEDULER = "linear"  # any transformers scheduler name
WARMUP_STEPS = 2  # the tutorial's
WEIGHT_DECAY = 1e-6  # the tutorial's
SAVE_STEPS = 0  # 0: evaluate and checkpoint every epoch; N: every N steps
EARLY_STOPPING_PATIENCE = 0  # > 0: stop after this many evaluations without a better validation field F1
LOGGING_STEPS = 5  # frequent enough to see a loss curve on a 150-image run
SEED = 42  # fixed before the adapters are created, so runs repeat
OUTPUT_DIR = "paligemma2_json_extraction"  # checkpoints, final model, predictions, metrics, TensorBoard
REPORT_TO = ["tensorboard"]  # experiment trackers: wandb, mlflow, trackio..., several, or none; keys: environment only
OVERWRITE = False  # replace a finished run in OUTPUT_DIR instead of refusing
RESUME = False  # continue a cut-off run in OUTPUT_DIR: from its newest checkpoint, then missing predictions

# Inference
MAX_NEW_TOKENS = 0  # 0: the longest train/valid label in tokens + 25% (printed); the tutorial's 256 cut manifests off
NUM_BEAMS = 1  # greedy; beams multiply the KV cache over hundreds of image tokens
EVAL_BATCH_SIZE = 8  # test images generated together
CONSTRAINED = True  # hold test and --predict generation to the labels' schema (llguidance); the test set is also decoded free once, for comparison
CONFIDENCE_THRESHOLD = 0.0  # a field whose confidence is below this is flagged for a check; 0: picked on validation
FLAG_WRONG_SHARE = 0.9  # the picked threshold's flags catch this share of the wrong validation fields

DEMO = False  # offline: synthetic manifests and a tiny random PaliGemma 2, then the same flow
PUSH_TO_HUB = ""  # a Hub repo id: upload final/ with its model card there, after scoring (reads HF_TOKEN; tested on a stand-in Hub only)

# Modes that use a finished run instead of training one; each writes beside it
EVALUATE = ""  # a predictions.jsonl to score again, with no model: metrics.json and pictures beside it
PREDICT = ""  # an image or a folder of images to read with OUTPUT_DIR/final: OUTPUT_DIR/predict.jsonl
MERGE = False  # merge final/'s LoRA adapter into its base: OUTPUT_DIR/merged, which loads without peft

# Every UPPER_CASE name above is a setting (REPO_URL only serves Colab's step 0).
DEFAULTS = {name: value for name, value in dict(globals()).items() if name.isupper() and name != "REPO_URL"}
SPLITS = ("train", "valid", "test")


def report_flow_errors(kind, error, traceback):
    if issubclass(kind, FlowError):
        print("error: " + mask_secrets(" ".join(str(error).split())), file=sys.stderr)  # one line, whatever it quotes
        sys.exit(2)
    sys.__excepthook__(kind, error, traceback)


def resolve_settings(argv: list[str]) -> dict:
    """Defaults, then the demo's overrides, then the flags given: the later wins."""
    given = {} if in_notebook() else parse_overrides(argv, DEFAULTS, __file__)
    settings = dict(DEFAULTS)
    if given.get("DEMO", DEMO):
        from paligemma_json.demo import DEMO_OVERRIDES
        print("demo: overriding " + ", ".join(f"{k}={v}" for k, v in DEMO_OVERRIDES.items() if k not in given))
        settings.update(DEMO_OVERRIDES)
    settings.update(given)
    if settings["USE_QLORA"]:
        settings["USE_LORA"] = True  # QLoRA is LoRA on a quantized base
    return settings


if __name__ == "__main__":
    sys.excepthook = report_flow_errors
    globals().update(resolve_settings(sys.argv[1:]))
    FLOW = not (EVALUATE or PREDICT or MERGE)  # steps 2-8 train and test; the modes skip to 8 or 9
    # Under torchrun or `accelerate launch` every process runs this file; the first one alone writes.
    IS_MAIN_PROCESS = int(os.environ.get("RANK", "0")) == 0
    if RESUME and OVERWRITE:
        raise FlowError("--resume continues the run in OUTPUT_DIR and --overwrite replaces it: pass one")
    check_confidence_settings(CONFIDENCE_THRESHOLD, FLAG_WRONG_SHARE)
    if FLOW:  # a tracker that is not installed stops the run now, not after the model has loaded
        check_tracking_settings(globals())
    if DEMO and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise FlowError("--demo builds its data in one process: run it once without a launcher, then launch "
                        "with --dataset-dir OUTPUT_DIR/demo-dataset --model-id OUTPUT_DIR/demo-model")
    if FLOW and IS_MAIN_PROCESS:
        prepare_output_dir(OUTPUT_DIR, OVERWRITE, RESUME, DEMO)
        os.makedirs(OUTPUT_DIR, exist_ok=True)
    TRAINING_DONE = RESUME and os.path.isdir(os.path.join(OUTPUT_DIR, "final"))
    RESUME_CHECKPOINT = newest_checkpoint(OUTPUT_DIR) if RESUME and not TRAINING_DONE else None
    if RESUME:
        print("resume: " + ("training finished; predicting what is missing" if TRAINING_DONE else
                            f"training from {RESUME_CHECKPOINT}" if RESUME_CHECKPOINT else
                            "no checkpoint yet; training from the start"))
    print(mask_secrets("settings: " + ", ".join(f"{name}={globals()[name]}" for name in DEFAULTS)))

# %% [markdown]
# ## 2. Download the dataset from Roboflow (or build the offline demo's)
# The export has `train/ valid/ test/`, each with its images and `annotations.jsonl` rows
# `{"image", "prefix", "suffix"}`. The API key comes from `ROBOFLOW_API_KEY` or a Colab secret of
# that name, and is never printed.

# %%
from paligemma_json.model_card import record_roboflow_source


def find_roboflow_api_key() -> str | None:
    key = os.environ.get("ROBOFLOW_API_KEY")
    if not key and "google.colab" in sys.modules:
        try:
            from google.colab import userdata
            key = userdata.get("ROBOFLOW_API_KEY")
        except Exception:  # no such secret, or access not granted
            key = None
    return key or None


def download_dataset(dataset_dir: str, workspace: str, project: str, version: int) -> str:
    """Uses `dataset_dir` as it is when it holds anything; downloads the JSONL export otherwise."""
    if os.path.isdir(dataset_dir) and os.listdir(dataset_dir):
        print(f"dataset: using {dataset_dir}")
        return dataset_dir
    key = find_roboflow_api_key()
    if not key:
        raise FlowError(f"no dataset in {dataset_dir} and no ROBOFLOW_API_KEY: set ROBOFLOW_API_KEY (or a "
                        "Colab secret of that name) to download it, or point --dataset-dir at a JSONL export")
    from roboflow import Roboflow
    if os.path.isdir(dataset_dir):
        os.rmdir(dataset_dir)  # empty; roboflow skips the download into an existing folder
    try:
        rf = Roboflow(api_key=key)
        rf.workspace(workspace).project(project).version(version).download("jsonl", location=dataset_dir)
    except Exception as error:  # roboflow's own messages can carry the key in a URL: mask it
        raise FlowError(f"Roboflow download of {workspace}/{project}/{version} failed "
                        f"({type(error).__name__}: {str(error).replace(key, '***')[:300]})") from None
    record_roboflow_source(dataset_dir, workspace, project, version)  # the model card names it
    return dataset_dir


if __name__ == "__main__" and FLOW:
    if DEMO:
        from paligemma_json.demo import build_demo
        DATASET_DIR, MODEL_ID = build_demo(OUTPUT_DIR, SEED, reuse=RESUME)
        print(f"demo: dataset in {DATASET_DIR}, tiny model in {MODEL_ID}")
    else:
        DATASET_DIR = download_dataset(DATASET_DIR, ROBOFLOW_WORKSPACE, ROBOFLOW_PROJECT, ROBOFLOW_VERSION)

# %% [markdown]
# ## 3. Load the splits as `JSONLDataset`
# Every row and every image is checked when the dataset is built, so a broken export stops the run
# here, before any model is loaded, with the file and line to fix.

# %%
from paligemma_json.constrained import compile_schema, with_layout
from paligemma_json.files import write_json_atomically
from paligemma_json.metrics import parse_json
from paligemma_json.run_record import check_run_settings  # a --resume never mixes two runs' settings
from paligemma_json.schema import load_schema, schema_from_labels


class JSONLDataset(Dataset):
    """`dataset[i] -> (image, entry)`: an RGB image and its `{"image", "prefix", "suffix"}` row."""

    def __init__(self, jsonl_file_path: str, image_directory_path: str, prompt: str = ""):
        self.jsonl_file_path = jsonl_file_path
        self.image_directory_path = image_directory_path
        self.entries = self._load_entries(prompt)

    def _load_entries(self, prompt: str) -> list[dict]:
        if not os.path.isfile(self.jsonl_file_path):
            raise FlowError(f"{self.jsonl_file_path}: missing; each split needs its annotations.jsonl")
        entries = []
        with open(self.jsonl_file_path, "rb") as file:  # decoded line by line, to name the bad line
            for line_number, raw_line in enumerate(file, start=1):
                where = f"{self.jsonl_file_path} line {line_number}"
                try:
                    line = raw_line.decode("utf-8")
                except UnicodeDecodeError:
                    raise FlowError(f"{where}: not UTF-8 text; save the file as UTF-8") from None
                if line.strip():
                    entry = self._check_row(line, where)
                    entries.append({**entry, "prefix": prompt or entry["prefix"]})
        if not entries:
            raise FlowError(f"{self.jsonl_file_path}: no rows; the split must hold at least one labelled image")
        return entries

    def _check_row(self, line: str, where: str) -> dict:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise FlowError(f"{where}: not valid JSON ({error.msg}); fix or remove the line") from None
        if not isinstance(entry, dict):
            raise FlowError(f"{where}: expected an object with image, prefix and suffix")
        for key in ("image", "prefix", "suffix"):
            if not isinstance(entry.get(key), str):
                problem = "missing" if key not in entry else f"not a string ({type(entry[key]).__name__})"
                raise FlowError(f"{where}: '{key}' is {problem}; every row needs string image, prefix and suffix")
        check_image(os.path.join(self.image_directory_path, entry["image"]), where)
        return entry

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, idx: int):
        if idx < 0 or idx >= len(self.entries):
            raise IndexError("Index out of range")
        entry = self.entries[idx]
        image = Image.open(os.path.join(self.image_directory_path, entry["image"])).convert("RGB")
        return image, entry


def check_image(path: str, where: str) -> None:
    """Decodes the whole file (JPEGs at 1/8 scale, which is fast) so truncation is caught now."""
    if not os.path.isfile(path):
        raise FlowError(f"{where}: image {path} is missing; restore it or remove the row")
    if os.path.getsize(path) == 0:
        raise FlowError(f"{where}: image {path} is empty; re-export it or remove the row")
    try:
        with Image.open(path) as image:
            image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
    except Exception as error:
        raise FlowError(f"{where}: image {path} cannot be read ({error}); re-export it or remove the row") from None


def load_splits(dataset_dir: str, prompt: str) -> dict[str, JSONLDataset]:
    splits = {}
    for split in SPLITS:
        folder = os.path.join(dataset_dir, split)
        if not os.path.isdir(folder):
            raise FlowError(f"{folder}: split '{split}' is missing; a Roboflow export has train, valid and test")
        splits[split] = JSONLDataset(os.path.join(folder, "annotations.jsonl"), folder, prompt)
    return splits


def label_schema(splits: dict[str, JSONLDataset], schema_path: str = "") -> dict | None:
    """The structure predictions should have: the user's schema, or one inferred from the train and
    valid labels (None when they are not JSON), with the labels' separators for the grammar."""
    suffixes = [entry["suffix"] for split in ("train", "valid") for entry in splits[split].entries]
    schema = load_schema(schema_path) if schema_path else schema_from_labels(suffixes)
    return None if schema is None else with_layout(schema, suffixes)


def count_non_json_labels(dataset: JSONLDataset) -> int:
    return sum(parse_json(entry["suffix"]) is None for entry in dataset.entries)


if __name__ == "__main__" and FLOW:
    splits = load_splits(DATASET_DIR, PROMPT)
    train_dataset, valid_dataset, test_dataset = splits["train"], splits["valid"], splits["test"]
    print("dataset: " + ", ".join(f"{split} {len(data)} rows" for split, data in splits.items()))
    non_json = sum(count_non_json_labels(data) for data in splits.values())
    if non_json:
        print(f"warning: {non_json} labels are not JSON objects or arrays; the JSON metrics leave them out")
    # What constrained decoding holds generation to and schema_valid_rate checks; saved beside the model.
    LABEL_SCHEMA = label_schema(splits, SCHEMA)
    check_run_settings(globals(), LABEL_SCHEMA, splits)  # all but a MAX_NEW_TOKENS of 0, resolved in step 4
    if LABEL_SCHEMA is not None:
        if CONSTRAINED:
            compile_schema(LABEL_SCHEMA)  # a schema the grammar library cannot use stops the run now
        if IS_MAIN_PROCESS:
            write_json_atomically(LABEL_SCHEMA, os.path.join(OUTPUT_DIR, "schema.json"))

# %% [markdown]
# ## 4. Load PaliGemma 2 with LoRA, QLoRA or a frozen vision tower
# bf16 where the GPU has it natively; fp32 on a T4 (Gemma 2 overflows in fp16) and on CPU. A 4-bit model is
# placed by loading, never moved with `.to()`. Attention: no argument gives Gemma 2 `eager` (its
# logit soft-capping has no SDPA path in transformers) and SigLIP `sdpa`. Between the processor and
# the model, the dataset report looks at the data (`OUTPUT_DIR/dataset_report.json`): image sizes,
# label lengths in the model's tokens against `MAX_NEW_TOKENS`, how often each field is filled, and
# leaks between splits (the same photo by perceptual hash, or the same label). On a GPU, the
# estimated peak memory of these settings is then printed against the card's free memory, with the
# cheapest change that fits when they do not (README, "Will it fit on my GPU?").

# %%
import logging

# bitsandbytes fetches an optional CPU 4-bit kernel from the Hub and warns on every import without it;
# its own kernel is used instead, and 4-bit on a CPU is for testing anyway.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import BitsAndBytesConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor, set_seed

from paligemma_json.dataset_report import label_lengths, report_dataset, token_budget
from paligemma_json.devices import training_dtype  # bf16 from compute capability 8.0, else fp32; never fp16
from paligemma_json.distributed import loading_device_map, prepare_fsdp_loading
from paligemma_json.hub import cache_only_for, hub_load, push_to_hub
from paligemma_json.memory import check_fit  # on a GPU: will this setting fit? (a CPU-derived estimate)
from paligemma_json.training import enable_gradient_checkpointing


def model_device_map() -> dict:
    """One whole copy on this process's device: never split a model across GPUs behind DDP's back."""
    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", 0))}
    return {"": "cpu"}


def quantization_config(dtype: torch.dtype) -> BitsAndBytesConfig:
    try:
        import bitsandbytes  # noqa: F401
    except Exception as error:
        raise FlowError(f"USE_QLORA needs bitsandbytes, which cannot load here ({error}); "
                        "pip install bitsandbytes, or pass --no-use-qlora") from None
    if not torch.cuda.is_available():
        print("note: 4-bit on CPU works for testing, not for speed")
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    assert config.bnb_4bit_compute_dtype == dtype  # the tutorial's misspelt kwarg was silently ignored
    return config


def lora_target_modules(names: list[str], freeze_vision: bool) -> list[str] | str:
    """q/k/v_proj also name SigLIP's attention: with vision frozen, adapt the language model only."""
    if freeze_vision:
        return r".*language_model.*\.(" + "|".join(map(re.escape, names)) + r")"
    return list(names)


def freeze_vision_tower(model) -> None:
    for part in (model.model.vision_tower, model.model.multi_modal_projector):
        part.requires_grad_(False)


def load_processor(model_id: str, cache_only: bool = False) -> PaliGemmaProcessor:
    processor = hub_load(PaliGemmaProcessor.from_pretrained, model_id, local_files_only=cache_only)
    processor.tokenizer.padding_side = "left"  # generation appends on the right
    return processor


def load_model(model_id: str, use_lora: bool, use_qlora: bool, freeze_vision: bool, lora_rank: int,
               lora_targets: list[str], dtype: torch.dtype, cache_only: bool = False, checkpoint: str | None = None):
    """`checkpoint`: a full fine-tune resumes from its weights, loaded here, because the Trainer's
    own resume loads none of them for PaliGemma in transformers 5.24. Adapters the Trainer restores."""
    # A full fine-tune keeps fp32 weights (bf16 runs as autocast): AdamW steps of ~1e-5 are below
    # bf16's rounding step for most weights, so bf16 weights would barely move. Adapters are fp32 anyway.
    prepare_fsdp_loading(use_qlora)  # under FSDP: loaded onto the CPU, then sharded (paligemma_json/distributed.py)
    model = hub_load(PaliGemmaForConditionalGeneration.from_pretrained,
                     checkpoint if checkpoint and not use_lora else model_id,
                     dtype=dtype if use_lora or use_qlora else torch.float32, use_safetensors=True,
                     device_map=loading_device_map(model_device_map()), local_files_only=cache_only,
                     quantization_config=quantization_config(dtype) if use_qlora else None)
    if freeze_vision:
        freeze_vision_tower(model)
    if use_lora or use_qlora:
        lora_config = LoraConfig(r=lora_rank, target_modules=lora_target_modules(lora_targets, freeze_vision),
                                 task_type="CAUSAL_LM")
        model = get_peft_model(model, lora_config)
    return model


def load_trained_model(final_dir: str, use_qlora: bool, dtype: torch.dtype, cache_only: bool = False):
    """A finished run's `final/`: full weights, or its adapter on the base model it was trained on."""
    base_id = adapter_base(final_dir)
    if base_id is None:
        return PaliGemmaForConditionalGeneration.from_pretrained(final_dir, dtype=dtype, use_safetensors=True,
                                                                 device_map=model_device_map())
    from peft import PeftModel
    base = hub_load(PaliGemmaForConditionalGeneration.from_pretrained, base_id, dtype=dtype, use_safetensors=True,
                    device_map=model_device_map(), local_files_only=cache_only,
                    quantization_config=quantization_config(dtype) if use_qlora else None)
    return PeftModel.from_pretrained(base, final_dir)


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


if __name__ == "__main__" and FLOW:
    set_seed(SEED)  # before the adapters exist: their A matrices are random
    TORCH_DTYPE = training_dtype()
    cache_only = cache_only_for(MODEL_ID)
    processor = load_processor(MODEL_ID, cache_only)
    if MAX_NEW_TOKENS <= 0:
        MAX_NEW_TOKENS = token_budget([splits["train"], splits["valid"]], processor.tokenizer)
        print(f"MAX_NEW_TOKENS={MAX_NEW_TOKENS}: the longest train/valid label in tokens, + 25%")
    check_run_settings(globals(), LABEL_SCHEMA, splits, resolved=True)  # then OUTPUT_DIR/run_settings.json
    if DATASET_REPORT and IS_MAIN_PROCESS:  # it needs the tokenizer, so it runs here, before the model loads
        report_dataset(splits, processor.tokenizer, MAX_NEW_TOKENS, OUTPUT_DIR, STRICT)
    if TRAINING_DONE:
        model = load_trained_model(os.path.join(OUTPUT_DIR, "final"), USE_QLORA, TORCH_DTYPE, cache_only)
    else:
        if IS_MAIN_PROCESS:  # before anything big loads; it warns and goes on
            check_fit(MODEL_ID, globals(), TORCH_DTYPE, MAX_NEW_TOKENS, cache_only)
        model = load_model(MODEL_ID, USE_LORA, USE_QLORA, FREEZE_VISION, LORA_RANK, LORA_TARGET_MODULES,
                           TORCH_DTYPE, cache_only, checkpoint=RESUME_CHECKPOINT)
        if GRADIENT_CHECKPOINTING:  # here, not in TrainingArguments: see enable_gradient_checkpointing
            enable_gradient_checkpointing(model)
    trainable, total = count_parameters(model)
    print(f"model: {MODEL_ID}, {TORCH_DTYPE}, trainable {trainable:,} of {total:,} parameters "
          f"({100 * trainable / total:.2f}%)")

# %% [markdown]
# ## 5. `collate_fn`: images and prompts in, CPU tensors out
# `"<image>" + prefix` is the prompt and the suffix the label: the processor masks the prompt in
# `labels` with -100, ends each label with EOS (or generation never stops), and marks prefix and
# suffix in `token_type_ids`, which the model needs for its prefix attention. Tensors stay on the CPU:
# the Trainer moves them, and worker processes cannot touch CUDA. Generation uses the same prompts:
# batched, left-padded, greedy unless `NUM_BEAMS` > 1, the prompt sliced off before decoding. With
# `CONSTRAINED`, llguidance masks every token that would leave the labels' schema, and each field
# gets a confidence: the lowest probability the unmasked model gave a token of its value.

# %%
from tqdm.auto import tqdm

from paligemma_json.constrained import ChosenTokenProbabilities, JsonSchemaConstraint, field_confidences
from paligemma_json.distributed import synced_generation
from paligemma_json.training import label_only_inputs


def collate_fn(batch, processor, dtype: torch.dtype, with_labels: bool = True):
    images, entries = zip(*batch)
    inputs = processor(
        text=["<image>" + entry["prefix"] for entry in entries],
        images=list(images),
        suffix=[entry["suffix"] for entry in entries] if with_labels else None,
        return_tensors="pt",
        padding="longest",  # never truncate: a cut label loses its EOS
    )
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    if not with_labels:
        inputs.pop("labels", None)  # the processor adds all -100 labels even without a suffix
    else:  # logits and loss on the label positions only: paligemma_json/training.py
        inputs.update(label_only_inputs(inputs["labels"]))
    return inputs


def build_constraint(schema: dict | None, processor, model, constrained: bool) -> JsonSchemaConstraint | None:
    """The labels' schema as a grammar, or None (free decoding): turned off, labels that are not JSON."""
    if not constrained or schema is None:
        print("decoding: free" + ("" if constrained else " (--no-constrained)") + ("" if schema else ", no schema"))
        return None
    constraint = JsonSchemaConstraint(schema, processor.tokenizer)
    print("decoding: constrained to the labels' schema (llguidance)")
    return constraint


def generate_batch(model, processor, batch, dtype: torch.dtype, max_new_tokens: int, num_beams: int,
                   constraint: JsonSchemaConstraint | None = None, with_confidence: bool = True) -> list[dict]:
    """`prediction` per image; `truncated`: the budget ran out before EOS, so the text is cut off;
    `confidence`: per field of the prediction, from the raw logits."""
    processor.tokenizer.padding_side = "left"  # right padding would put pads between prompt and answer
    inputs = collate_fn(batch, processor, dtype, with_labels=False).to(model.device)
    prompt_length, eos = inputs["input_ids"].shape[-1], processor.tokenizer.eos_token_id
    recorder = ChosenTokenProbabilities(num_beams, eos) if with_confidence else None
    processors = [recorder] if recorder else []  # first: it must see the scores before the schema's mask
    processors += [constraint.logits_processor()] if constraint else []
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=num_beams,
                                logits_processor=processors, return_dict_in_generate=True,
                                synced_gpus=synced_generation(model))  # FSDP: every process steps together
    probabilities = recorder.probabilities(output.sequences).tolist() if with_confidence else None
    rows = []
    for index, answer in enumerate(output.sequences[:, prompt_length:].tolist()):
        ended = eos in answer
        answer = answer[:answer.index(eos)] if ended else answer
        text = processor.tokenizer.decode(answer, skip_special_tokens=True)
        rows.append({"prediction": text, "truncated": not ended})
        if with_confidence:
            rows[-1]["confidence"] = field_confidences(answer, probabilities[index], processor.tokenizer, text)
    return rows


def predict_rows(model, processor, dataset: JSONLDataset, dtype: torch.dtype, batch_size: int,
                 max_new_tokens: int, num_beams: int, start: int = 0, constraint=None, also_free: bool = False,
                 with_confidence: bool = True, temperature: float | None = None):
    """One row per dataset entry from `start` on, as soon as its batch is generated: everything
    needed to score it again later without the model. `also_free`: the same batch decoded without
    the constraint too, as `free_prediction`, so the raw model's figures are never hidden.
    `temperature`: the confidences' calibration, fitted on validation (paligemma_json/confidence.py)."""
    was_training = model.training
    model.eval()
    for first in tqdm(range(start, len(dataset), batch_size), desc="generating", unit="batch", leave=False):
        batch = [dataset[i] for i in range(first, min(first + batch_size, len(dataset)))]
        outputs = generate_batch(model, processor, batch, dtype, max_new_tokens, num_beams, constraint, with_confidence)
        for output in outputs:
            calibrate_fields(output.get("confidence"), temperature)
        if constraint is not None and also_free:
            for output, free in zip(outputs, generate_batch(model, processor, batch, dtype, max_new_tokens, num_beams,
                                                            with_confidence=False)):
                output.update(free_prediction=free["prediction"], free_truncated=free["truncated"])
        for (_, entry), output in zip(batch, outputs):
            yield {"image": entry["image"], "image_path": os.path.join(dataset.image_directory_path, entry["image"]),
                   "prefix": entry["prefix"], "suffix": entry["suffix"], **output}
    model.train(was_training)


# %% [markdown]
# ## 6. Train with the Hugging Face `Trainer`
# At every epoch (or every `SAVE_STEPS`): the loss on `valid`, then generation on `valid`, whose
# field F1 and valid-JSON rate go to TensorBoard beside the loss and choose the best checkpoint (on a
# tie, the earlier one). The best is used afterwards and saved, with its processor, as safetensors in
# `OUTPUT_DIR/final`; `OUTPUT_DIR/training_curves.png` shows the run.

# %%
import time

from transformers import Trainer, TrainingArguments

from paligemma_json.devices import OneGPUPerProcessArguments
from paligemma_json.distributed import is_sharded, predict_across_processes, release_training_memory, save_whole_weights
from paligemma_json.files import replace_atomically
from paligemma_json.metrics import compute_metrics
from paligemma_json.pictures import draw_training_curves
from paligemma_json.speed import SessionStart, mfu_report, training_rates
from paligemma_json.tracking import trackers
from paligemma_json.training import early_stopping


class ExtractionTrainer(Trainer):
    """A Trainer whose evaluation also generates on the validation split and scores the JSON, so
    the best checkpoint is the one that extracts best, not the one with the lowest loss."""

    def __init__(self, *args, generation: dict, **kwargs):
        super().__init__(*args, **kwargs)
        self.generation = generation  # predict_rows' settings: dtype, batch_size, max_new_tokens, num_beams
        self.evaluation_seconds = 0.0  # kept out of the training throughput
        self.session_start = SessionStart()  # after --resume, throughput counts this session's tokens only
        self.add_callback(self.session_start)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        started = time.perf_counter()
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        # Free decoding: the raw model's learning signal, which a constraint would hide. Each process
        # generates its share of the rows; every one scores them all.
        scores = compute_metrics(predict_across_processes(functools.partial(
            predict_rows, self.model, self.processing_class, **self.generation, with_confidence=False), dataset))
        extraction = {f"{metric_key_prefix}_{name}": scores[name] for name in ("field_f1", "json_valid_rate")}
        self.log(extraction)
        metrics.update(extraction)
        self.evaluation_seconds += time.perf_counter() - started
        return metrics

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Full weights were loaded by `load_model(checkpoint=...)`; the Trainer's own loader would
        load none of them and warn about every key. Adapters it restores correctly."""
        if hasattr(self.model, "peft_config"):
            super()._load_from_checkpoint(resume_from_checkpoint, model)


def training_throughput(trainer: ExtractionTrainer, train_result) -> tuple[float, float]:
    """(samples/s, tokens/s) of this session's training steps alone: the Trainer's own rates also
    count the validation loss and generation, which would understate speed and MFU."""
    runtime = train_result.metrics["train_runtime"]  # this session's; so are its samples/s
    samples = train_result.metrics["train_samples_per_second"] * runtime
    tokens = trainer.state.num_input_tokens_seen - trainer.session_start.tokens_seen
    return training_rates(samples, tokens, runtime, trainer.evaluation_seconds)


def training_arguments(output_dir: str, dtype: torch.dtype, **settings) -> TrainingArguments:
    every = "steps" if settings["SAVE_STEPS"] > 0 else "epoch"
    return OneGPUPerProcessArguments(  # plain `python` on several GPUs: one GPU, never DataParallel
        output_dir=output_dir,
        num_train_epochs=settings["EPOCHS"],
        max_steps=settings["MAX_STEPS"],
        per_device_train_batch_size=settings["BATCH_SIZE"],
        per_device_eval_batch_size=settings["EVAL_BATCH_SIZE"],
        gradient_accumulation_steps=settings["GRAD_ACCUM"],
        learning_rate=settings["LEARNING_RATE"],
        lr_scheduler_type=settings["LR_SCHEDULER"],
        warmup_steps=settings["WARMUP_STEPS"],
        weight_decay=settings["WEIGHT_DECAY"],
        adam_beta2=0.999,
        # The paged 8-bit optimizers are CUDA-only and have failed on resume: not a default.
        optim="adamw_torch_fused" if torch.cuda.is_available() else "adamw_torch",
        eval_strategy=every,
        save_strategy=every,  # must match eval_strategy for the best checkpoint to be kept
        eval_steps=settings["SAVE_STEPS"] or None,
        save_steps=settings["SAVE_STEPS"] or None,
        save_total_limit=2,  # the best and the latest; the Trainer never deletes the best
        # The best checkpoint is tracked by this metric and reloaded by `load_best_checkpoint`:
        # the Trainer's own load_best_model_at_end silently loads nothing for a full fine-tune.
        metric_for_best_model="eval_field_f1",
        greater_is_better=True,
        logging_steps=settings["LOGGING_STEPS"],
        include_num_input_tokens_seen="non_padding",  # for the tokens/s the run reports
        report_to=trackers(settings["REPORT_TO"]),
        bf16=dtype == torch.bfloat16,
        remove_unused_columns=False,  # the collate needs the image, which is not a model input
        ddp_find_unused_parameters=False,  # every trained weight gets a gradient: skip DDP's search
        use_cpu=not torch.cuda.is_available(),  # else torchrun on CPUs runs N separate, unsynced trainings
        dataloader_pin_memory=torch.cuda.is_available(),
        seed=settings["SEED"],
    )


def build_trainer(model, processor, train_dataset, valid_dataset, generation: dict, **settings) -> ExtractionTrainer:
    return ExtractionTrainer(
        model=model,
        args=training_arguments(settings["OUTPUT_DIR"], generation["dtype"], **settings),
        train_dataset=train_dataset,
        eval_dataset=valid_dataset,
        processing_class=processor,  # saved into every checkpoint, so each one loads on its own
        data_collator=functools.partial(collate_fn, processor=processor, dtype=generation["dtype"]),
        generation=generation,
        callbacks=early_stopping(settings["EARLY_STOPPING_PATIENCE"]),  # on validation field F1
    )


def load_best_checkpoint(trainer: Trainer, model, dtype: torch.dtype):
    """The best checkpoint's weights, loaded the way that works for each mode. For a full
    fine-tune the Trainer's own loader silently loads nothing in transformers 5.24 (PaliGemma's
    checkpoints keep their original key names), so reload through `from_pretrained`."""
    best = trainer.state.best_model_checkpoint
    if best is None:
        return model
    print(f"best checkpoint: {best} (step {trainer.state.best_global_step}, "
          f"validation field_f1 {trainer.state.best_metric:.4f})")
    if hasattr(model, "peft_config"):
        model.load_adapter(best, adapter_name=model.active_adapter)
        return model
    return PaliGemmaForConditionalGeneration.from_pretrained(best, dtype=dtype, use_safetensors=True,
                                                             device_map=model_device_map())


def end_distributed() -> None:
    """Under DDP: without this, about 1 run in 8 aborted at exit here."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def save_final_model(model, processor, final_dir: str, schema: dict | None = None,
                     state_dict: dict | None = None) -> None:
    """Adapters alone under LoRA, full weights otherwise; the processor either way, or the adapter
    cannot be used later; and the labels' schema, which its outputs should fit. `state_dict`: the
    weights to write when the model's own are sharded (FSDP)."""
    def write(path):
        model.save_pretrained(path, safe_serialization=True, state_dict=state_dict)
        processor.save_pretrained(path)
        if schema is not None:
            with open(os.path.join(path, "schema.json"), "w", encoding="utf-8") as out:
                json.dump(schema, out, indent=2)
    replace_atomically(write, final_dir)


if __name__ == "__main__" and FLOW:
    generation = {"dtype": TORCH_DTYPE, "batch_size": EVAL_BATCH_SIZE, "max_new_tokens": MAX_NEW_TOKENS,
                  "num_beams": NUM_BEAMS}
    if not TRAINING_DONE:
        trainer = build_trainer(model, processor, train_dataset, valid_dataset, generation,
                                **{name: globals()[name] for name in DEFAULTS})
        train_result = trainer.train(resume_from_checkpoint=RESUME_CHECKPOINT)
        if is_sharded(trainer.model):  # FSDP: every process helps put the whole weights on disk first
            final_dir = os.path.join(OUTPUT_DIR, "final")
            whole_weights = save_whole_weights(trainer.model, trainer.state.best_model_checkpoint, final_dir,
                                               functools.partial(save_final_model, processor=processor,
                                                                 final_dir=final_dir, schema=LABEL_SCHEMA))
        if not trainer.is_world_process_zero():  # the first process alone saves, predicts and scores
            end_distributed()
            sys.exit(0)
        samples_per_second, tokens_per_second = training_throughput(trainer, train_result)
        print(f"training: {train_result.global_step} steps in {train_result.metrics['train_runtime']:.0f} s "
              f"({trainer.evaluation_seconds:.0f} s of it validation); the steps alone: {samples_per_second:.2f} "
              f"samples/s, {tokens_per_second:.0f} tokens/s (image and text, no padding); final loss "
              f"{train_result.metrics['train_loss']:.4f}" + (" (time and rates: this session's steps alone)"
                                                             if RESUME_CHECKPOINT else ""))
        if torch.cuda.is_available():  # model FLOPs per second over this card's peak: paligemma_json/speed.py
            label_positions = sum(label_lengths(train_dataset, processor.tokenizer)) / len(train_dataset)  # where the LM head runs
            print(mfu_report(model.config, tokens_per_second, samples_per_second, USE_LORA, FREEZE_VISION,
                             trainer.args.world_size, torch.cuda.get_device_name(), TORCH_DTYPE, label_positions))
        if is_sharded(trainer.model):  # on with a whole copy of what was saved, as a finished run reloads final/
            release_training_memory(trainer)
            model = load_trained_model(whole_weights, USE_QLORA, TORCH_DTYPE, cache_only)
        else:
            model = load_best_checkpoint(trainer, trainer.model, TORCH_DTYPE)
        save_final_model(model, processor, os.path.join(OUTPUT_DIR, "final"), LABEL_SCHEMA)
        draw_training_curves(trainer.state.log_history, os.path.join(OUTPUT_DIR, "training_curves.png"),
                             trainer.state.best_global_step)
        print(f"saved: {os.path.join(OUTPUT_DIR, 'final')}, {os.path.join(OUTPUT_DIR, 'training_curves.png')}")
    elif not IS_MAIN_PROCESS:  # a finished run resumed under a launcher: the first process alone predicts
        sys.exit(0)

# %% [markdown]
# ## 7. Predict the test set
# Each row is appended to `OUTPUT_DIR/predictions.jsonl` and flushed as soon as it is generated.
# First, with `CONFIDENCE_THRESHOLD = 0`, the validation split is decoded the same way, once
# (`validation_predictions.jsonl`), to fit the confidences' temperature and pick the threshold,
# saved in `final/confidence.json`; the test rows are calibrated with that temperature.

# %%


def predict_to_file(model, processor, dataset: JSONLDataset, predictions_path: str, resume: bool = False,
                    **generation) -> list[dict]:
    """Appends and flushes each row as it is generated; with `resume`, keeps the rows already there
    and predicts only the rest."""
    rows = completed_rows(predictions_path, dataset.entries) if resume else []
    if rows:
        print(f"predictions: {len(rows)} of {len(dataset)} already in {predictions_path}; predicting the rest")
    def keep_completed(temporary):
        with open(temporary, "w", encoding="utf-8") as out:
            out.writelines(json.dumps(row) + "\n" for row in rows)
    replace_atomically(keep_completed, predictions_path)  # drops a line torn by the crash
    with open(predictions_path, "a", encoding="utf-8") as out:
        for row in predict_rows(model, processor, dataset, start=len(rows), **generation):
            out.write(json.dumps(row) + "\n")
            out.flush()
            rows.append(row)
    return rows


if __name__ == "__main__" and FLOW:
    constraint = build_constraint(LABEL_SCHEMA, processor, model, CONSTRAINED)
    THRESHOLD = training_threshold(CONFIDENCE_THRESHOLD, FLAG_WRONG_SHARE, os.path.join(OUTPUT_DIR, "final"),
                                   lambda path: predict_to_file(model, processor, valid_dataset, path, RESUME,
                                                                **generation, constraint=constraint))
    predictions = predict_to_file(model, processor, test_dataset, os.path.join(OUTPUT_DIR, "predictions.jsonl"),
                                  RESUME, **generation, constraint=constraint, also_free=constraint is not None,
                                  temperature=THRESHOLD["temperature"])
    print(f"example prediction for {predictions[0]['image']}:\n{predictions[0]['prediction'][:400]}")

# %% [markdown]
# ## 8. Evaluate
# JSON is judged as JSON, not with BLEU: valid JSON, exact match, Donut's field F1 and tree-edit
# accuracy, ANLS*, and accuracy per field, worst first; under the constraint, the same figures for
# the free decoding as `free_...`, and whether low confidence does flag the wrong fields.
# `OUTPUT_DIR/metrics.json` holds the numbers, `OUTPUT_DIR/predictions.png` shows test images with
# their right, wrong and unsure fields. `--evaluate OUTPUT_DIR/predictions.jsonl` does this again,
# with no model. Then the model card, `final/README.md`, with these figures; `--push-to-hub` comes last.

# %%
from paligemma_json.evaluation import evaluate_file, evaluate_predictions
from paligemma_json.model_card import write_merged_card, write_model_card

if __name__ == "__main__" and FLOW:
    metrics = evaluate_predictions(predictions, OUTPUT_DIR, LABEL_SCHEMA, THRESHOLD["threshold"], THRESHOLD["source"])
    end_distributed()
    # The card holds the test figures, so it is written now, and pushed with the weights.
    print("model card: " + write_model_card(os.path.join(OUTPUT_DIR, "final"), metrics, LABEL_SCHEMA,
                                            predictions[0]["prefix"], {name: globals()[name] for name in DEFAULTS},
                                            PUSH_TO_HUB))
    if PUSH_TO_HUB:  # last: a failed upload loses nothing else (one line, exit code 2)
        push_to_hub(os.path.join(OUTPUT_DIR, "final"), PUSH_TO_HUB)

if __name__ == "__main__" and EVALUATE:
    metrics = evaluate_file(EVALUATE, CONFIDENCE_THRESHOLD)

# %% [markdown]
# ## 9. Use the trained model: read new documents, export a merged model
# `--predict PATH` reads an image, or every image in a folder, with `OUTPUT_DIR/final/` and writes one
# line per image to `OUTPUT_DIR/predict.jsonl`: the image, the prediction (held to `final/schema.json`
# unless `--no-constrained`), whether it parses, and each field's value with its confidence.
# `--merge` folds a LoRA adapter into its base, reloaded in fp32 (never 4-bit: merging into a
# quantized base changes the generations; bf16 drops small changes), and saves `OUTPUT_DIR/merged/`
# in fp32, a standalone model with its processor that `from_pretrained` loads without peft.

# %%
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


class DocumentImages(JSONLDataset):
    """New documents, in JSONLDataset's shape: an image file, or every image in a folder."""

    def __init__(self, path: str, prompt: str):
        if os.path.isdir(path):
            self.image_directory_path = path
            names = sorted(name for name in os.listdir(path) if name.lower().endswith(IMAGE_SUFFIXES))
        elif os.path.isfile(path):
            self.image_directory_path, names = os.path.dirname(path) or ".", [os.path.basename(path)]
        else:
            raise FlowError(f"{path}: no such image or folder; pass --predict an image or a folder of images")
        if not names:
            raise FlowError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        if not prompt:
            raise FlowError("--predict needs the prompt the model was trained with: pass --prompt")
        for name in names:
            check_image(os.path.join(self.image_directory_path, name), path)
        self.entries = [{"image": name, "prefix": prompt, "suffix": ""} for name in names]


def trained_run(output_dir: str) -> str:
    final_dir = os.path.join(output_dir, "final")
    if not os.path.isdir(final_dir):
        raise FlowError(f"{final_dir}: no trained model; point --output-dir at a finished run")
    return final_dir


def predict_documents(output_dir: str, path: str, prompt: str, use_qlora: bool, batch_size: int,
                      max_new_tokens: int, num_beams: int, constrained: bool, threshold: float) -> list[dict]:
    final_dir, dtype = trained_run(output_dir), training_dtype()
    threshold, temperature = prediction_confidence(threshold, final_dir)  # 0: the one saved with the model
    documents = DocumentImages(path, prompt)
    cache_only = cache_only_for(adapter_base(final_dir) or final_dir)
    processor, model = load_processor(final_dir), load_trained_model(final_dir, use_qlora, dtype, cache_only)
    schema_path = os.path.join(final_dir, "schema.json")
    constraint = build_constraint(load_schema(schema_path) if os.path.isfile(schema_path) else None,
                                  processor, model, constrained)
    rows = []

    def write(temporary):  # appended as it goes; renamed into place once complete
        with open(temporary, "w", encoding="utf-8") as out:
            for row in predict_rows(model, processor, documents, dtype, batch_size, max_new_tokens, num_beams,
                                    constraint=constraint, temperature=temperature):
                row = {key: row[key] for key in ("image", "image_path", "prefix", "prediction", "truncated", "confidence")}
                row["parsed"] = parse_json(row["prediction"]) is not None
                out.write(json.dumps(row) + "\n")
                out.flush()
                rows.append(row)
    target = os.path.join(output_dir, "predict.jsonl")
    replaced = os.path.exists(target)
    replace_atomically(write, target)
    unsure = sum(field["confidence"] < threshold for row in rows for field in row["confidence"])
    print(f"predicted: {len(rows)} images, {sum(row['parsed'] for row in rows)} parsed as JSON, {unsure} fields "
          f"below confidence {threshold} to check; {'replaced' if replaced else 'wrote'} {target}")
    return rows


def merge_adapter(output_dir: str) -> str:
    from peft import PeftModel
    final_dir = trained_run(output_dir)
    base_id = adapter_base(final_dir)
    if base_id is None:
        raise FlowError(f"{final_dir} holds full weights, not a LoRA adapter: it already loads on its own")
    # fp32, and saved so: peft adds the adapter's change in the base's dtype, and bf16, in the merge or
    # in the saved file, rounds away every part of it below half a bf16 step of the weight.
    base = hub_load(PaliGemmaForConditionalGeneration.from_pretrained, base_id, dtype=torch.float32,
                    use_safetensors=True, device_map=model_device_map(), local_files_only=cache_only_for(base_id))
    merged = PeftModel.from_pretrained(base, final_dir).merge_and_unload()
    processor, target = load_processor(final_dir), os.path.join(output_dir, "merged")
    replaced = os.path.exists(target)

    def write(temporary):
        merged.save_pretrained(temporary, safe_serialization=True)
        processor.save_pretrained(temporary)
        write_merged_card(final_dir, temporary, base_id, os.path.abspath(target))  # final/'s card, for full weights
    replace_atomically(write, target)
    print(f"merged: {final_dir} into {base_id}; {'replaced' if replaced else 'wrote'} {target}")
    return target


if __name__ == "__main__" and PREDICT:
    new_predictions = predict_documents(OUTPUT_DIR, PREDICT, PROMPT, USE_QLORA, EVAL_BATCH_SIZE,
                                        MAX_NEW_TOKENS or 1024, NUM_BEAMS,  # no labels here to size it by
                                        CONSTRAINED, CONFIDENCE_THRESHOLD)

if __name__ == "__main__" and MERGE:
    merged_dir = merge_adapter(OUTPUT_DIR)
