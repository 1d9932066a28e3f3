# %% [markdown]
# # Fine-tune PaliGemma 2 to read photographed documents into JSON
#
# The flow of Roboflow's guide "How to Fine-tune PaliGemma 2" (pallet load manifests → JSON), with
# its bugs fixed: download the Roboflow JSONL export, load it as `JSONLDataset`, load the model with
# LoRA / QLoRA / a frozen vision tower, batch with `collate_fn`, generate, train with the Hugging Face
# `Trainer`, predict the test set and score the predictions.
#
#     pip install torch==2.13.0 && pip install -r requirements.txt   # or keep the CUDA torch you have
#     python finetune_paligemma2.py --demo          # offline: synthetic manifests, tiny random model
#     ROBOFLOW_API_KEY=... python finetune_paligemma2.py --model-id google/paligemma2-3b-pt-448
#
# What `--demo` proves (README, held by the tests on any machine): the paper's colour, the one field a
# 64 px page shows, right on at least 75% of the test pages, 30 points above guessing the commonest colour.

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
# Every constant below is also a flag (`--help` lists them): `--learning-rate 1e-4`, `--no-use-lora`,
# `--demo`. In Colab, edit the constants here instead, then run the cells in order.

# %%
from paligemma_json import FlowError  # a problem the user can fix: one line, never a traceback
from paligemma_json.plan import plan_run  # which mode, which process writes, what is resumed or replaced
from paligemma_json.settings import report_flow_errors, resolve_settings, settings_line
from paligemma_json.keys import mask_secrets  # trackers' keys are never printed

# Data
ROBOFLOW_WORKSPACE = "roboflow-jvuqo"  # the tutorial's pallet-manifest dataset on Roboflow Universe
ROBOFLOW_PROJECT = "pallet-load-manifest-json"  # the project in that workspace
ROBOFLOW_VERSION = 2  # v2 is the JSONL export with `<JSON>` prefixes
DATASET_DIR = "pallet-load-manifest-json-2"  # a Roboflow JSONL export; downloaded here if absent
PROMPT = "extract data in JSON format"  # replaces each row's prefix (v2's is `<JSON>`); "" keeps it
DATASET_REPORT = True  # sizes, label lengths, fields and leaks between splits, before any model loads
STRICT = False  # a leak between splits (the same photo or label in two) stops the run
SKIP_NON_JSON_LABELS = False  # where most labels are JSON, one that is not stops the run; True leaves such rows out
SCHEMA = ""  # your JSON Schema for the labels; "" infers one from the train and valid labels
CORRECTIONS = []  # review pages' exports (files, or a folder of them): trained on with the train split

# Model
MODEL_ID = "google/paligemma2-3b-pt-224"  # the tutorial's; for documents 448 px reads far better
USE_LORA = True  # train small adapters, not the 3B weights
USE_QLORA = False  # LoRA on a 4-bit (nf4) base: least memory, needs bitsandbytes
FREEZE_VISION = False  # keep SigLIP and the projector as they are, in every mode
LORA_RANK = 8  # the tutorial's: small adapters on a frozen 3B base (the run prints how many weights they train)
LORA_TARGET_MODULES = ["q_proj", "o_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]  # the tutorial's

# Training: the measured pallet-manifest run (effective batch 8, 20 epochs ≈ 360 steps on 150
# images, lr 2e-5). The tutorial's 3 epochs at an effective batch of 48 give only ~9 steps here.
EPOCHS = 20.0  # passes over the training split; a fraction (2.5) stops part-way through the last
MAX_STEPS = -1  # > 0 stops after this many optimizer steps (short runs, smoke tests)
BATCH_SIZE = 2  # images per device per step; 0: the largest that fits the card, keeping 2 x GRAD_ACCUM a step
GRAD_ACCUM = 4  # batches per optimizer step: BATCH_SIZE × GRAD_ACCUM = effective batch 8
FLEX_ATTENTION = False  # on CUDA, Gemma 2 through flex_attention; off until a GPU shows it faster
COMPILE_TRAINING = False  # torch.compile the step, batches padded to a few lengths; off until a GPU shows it faster
GRADIENT_CHECKPOINTING = False  # recompute activations in the backward: less memory, ~30% slower steps (BENCHMARKS.md)
LEARNING_RATE = 2e-5  # the measured run's; the tutorial's 5e-5 saw ~9 steps
LR_SCHEDULER = "linear"  # any transformers scheduler name
WARMUP_STEPS = 2  # the tutorial's: a short ramp is enough while LoRA's adapters start at zero
WEIGHT_DECAY = 1e-6  # the tutorial's: next to none (the Trainer's default is 0), so runs compare with it
SAVE_STEPS = 0  # 0: evaluate and checkpoint every epoch; N: every N steps
EARLY_STOPPING_PATIENCE = 0  # > 0: stop after this many evaluations without a better validation field F1
LOGGING_STEPS = 5  # frequent enough to see a loss curve on a 150-image run
SEED = 42  # fixed before the adapters are created, so runs repeat
OUTPUT_DIR = "paligemma2_json_extraction"  # checkpoints, final model, predictions, metrics, TensorBoard
REPORT_TO = ["tensorboard"]  # experiment trackers: wandb, mlflow, trackio..., several, or none; keys: environment only
OVERWRITE = False  # replace a finished run in OUTPUT_DIR instead of refusing
RESUME = False  # continue a cut-off run in OUTPUT_DIR: from its newest checkpoint, then missing predictions; or a --predict

# Inference
MAX_NEW_TOKENS = 0  # 0: the longest train/valid label in tokens + 25% (printed); the tutorial's 256 cut manifests off
NUM_BEAMS = 1  # greedy; beams multiply the KV cache over hundreds of image tokens
EVAL_BATCH_SIZE = 8  # test images generated together
FAST_DECODING = True  # on a GPU: static KV cache, compiled decoding step; where that fails, the usual path
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


if __name__ == "__main__":
    sys.excepthook = report_flow_errors
    # Defaults, the demo's, then the flags given (read with their help from this file; a notebook has no
    # __file__, and takes no flags).
    settings = resolve_settings(sys.argv[1:], DEFAULTS, sys.argv[0])
    globals().update(settings)
    run = plan_run(settings)  # which mode, which process writes, what is resumed; clashing flags stop it here
    print(mask_secrets(settings_line(settings, DEFAULTS)))  # what this run changes; --help lists the defaults
    if run.mode == "train":
        print(f"effective batch: {run.effective_batch} (BATCH_SIZE {BATCH_SIZE or '0, counted as 2'} x GRAD_ACCUM "
              f"{GRAD_ACCUM} x {run.processes} process{'es' if run.processes > 1 else ''}); LEARNING_RATE goes with it")
    run.prepare_output_dir()  # refuses to mix with an earlier run, or replaces it whole (--overwrite)

# %% [markdown]
# ## 2. Download the dataset from Roboflow (or build the offline demo's)
# The export has `train/ valid/ test/`, each with its images and `annotations.jsonl` rows `{"image",
# "prefix", "suffix"}`. The key comes from `ROBOFLOW_API_KEY` or a Colab secret of that name, never printed.

# %%
from paligemma_json.keys import find_roboflow_api_key  # the environment, or a Colab secret
from paligemma_json.model_card import record_roboflow_source


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


if __name__ == "__main__" and run.mode == "train":
    if DEMO:
        from paligemma_json.demo import build_demo, new_pages_dir
        build_demo(OUTPUT_DIR, SEED, reuse=RESUME)
        print(f"demo: dataset in {DATASET_DIR}, tiny model in {MODEL_ID}; new pages to try --predict on in "
              f"{new_pages_dir(OUTPUT_DIR)}")
    else:
        download_dataset(DATASET_DIR, ROBOFLOW_WORKSPACE, ROBOFLOW_PROJECT, ROBOFLOW_VERSION)

# %% [markdown]
# ## 3. Load the splits as `JSONLDataset`
# Every row and every image is checked when the dataset is built, so a broken export stops the run
# here, before any model is loaded, with the file and line to fix.

# %%
from PIL import Image
from torch.utils.data import Dataset

from paligemma_json.constrained import compile_schema
from paligemma_json.corrections import add_corrections  # review pages' exports, trained on with train
from paligemma_json.documents import DocumentDataset, read_annotations  # the shape every dataset here has
from paligemma_json.plan import corrections_paths  # CORRECTIONS as a list of files and folders
from paligemma_json.schema import check_json_labels, label_schema

SPLITS = ("train", "valid", "test")


class JSONLDataset(Dataset, DocumentDataset):
    """`dataset[i] -> (image, entry)`: an RGB image and its `{"image", "prefix", "suffix"}` row."""

    def __init__(self, jsonl_file_path: str, image_directory_path: str, prompt: str = ""):
        self.jsonl_file_path = jsonl_file_path
        self.image_directory_path = image_directory_path
        self.entries = read_annotations(jsonl_file_path, image_directory_path, prompt)
        self.left_out = []  # "PATH line N: why" for each row SKIP_NON_JSON_LABELS leaves out

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, idx: int):
        if idx < 0 or idx >= len(self.entries):
            raise IndexError("Index out of range")
        entry = self.entries[idx]
        image = Image.open(os.path.join(self.image_directory_path, entry["image"])).convert("RGB")
        return image, entry


def load_splits(dataset_dir: str, prompt: str) -> dict[str, JSONLDataset]:
    splits = {}
    for split in SPLITS:
        folder = os.path.join(dataset_dir, split)
        if not os.path.isdir(folder):
            raise FlowError(f"{folder}: split '{split}' is missing; a Roboflow export has train, valid and test")
        splits[split] = JSONLDataset(os.path.join(folder, "annotations.jsonl"), folder, prompt)
    return splits


if __name__ == "__main__" and run.mode == "train":
    splits = load_splits(DATASET_DIR, PROMPT)
    # A review's corrections train, never score: a photo also in valid or test stops the run, always.
    corrected = add_corrections(splits, CORRECTIONS, PROMPT) if CORRECTIONS else 0
    train_dataset, valid_dataset, test_dataset = splits["train"], splits["valid"], splits["test"]
    print("dataset: " + ", ".join(f"{split} {len(data)} rows" for split, data in splits.items())
          + (f" ({corrected} of train from {', '.join(corrections_paths(CORRECTIONS))})" if corrected else ""))
    check_json_labels(splits, SKIP_NON_JSON_LABELS)  # one broken label stops the run; captions train as they are
    # What constrained decoding holds generation to and schema_valid_rate checks; saved beside the model.
    schema = label_schema(splits, SCHEMA)
    if schema is not None and CONSTRAINED:
        compile_schema(schema)  # a schema the grammar library cannot use stops the run now

# %% [markdown]
# ## 4. Load PaliGemma 2 with LoRA, QLoRA or a frozen vision tower
# bf16 where the GPU has it natively, else fp32 (Gemma 2 overflows in fp16). A 4-bit model is placed by
# loading, never moved with `.to()`. Gemma 2 gets `eager` (its soft-capping has no SDPA path; on CUDA
# `FLEX_ATTENTION` offers flex_attention), SigLIP `sdpa`. Before the model loads: the data checked
# with its tokenizer (label lengths, the generation budget, a `--resume` against the run it continues,
# and the dataset report in `OUTPUT_DIR/dataset_report.json`: image sizes, field fill rates, leaks
# between splits), then on a GPU the estimated peak memory against the card's (docs/gpu-memory.md,
# "Will it fit on my GPU?"); with `BATCH_SIZE = 0`, the largest micro-batch that fits.

# %%
import logging

import torch

# bitsandbytes fetches an optional CPU 4-bit kernel from the Hub and warns on every import without it;
# its own kernel is used instead, and 4-bit on a CPU is for testing anyway.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import (BitsAndBytesConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor,
                          set_seed)

from paligemma_json import import_or_stop  # a library that cannot load: one line, with what to do
from paligemma_json.dataset_report import check_data  # the data's checks that need the tokenizer
from paligemma_json.devices import (attention_implementation, model_device_map, place_whole_copy,
                                    training_dtype)  # bf16 from 8.0, else fp32
from paligemma_json.distributed import loading_device_map, prepare_fsdp_loading
from paligemma_json.hub import cache_only_for, hub_load
from paligemma_json.lora import adapter_base, adapter_base_source, lora_target_modules  # SigLIP's q/k/v too
from paligemma_json.memory import check_fit, largest_fitting_batch, training_setting  # on a GPU: will it fit?
from paligemma_json.training import count_parameters, enable_gradient_checkpointing


def quantization_config(dtype: torch.dtype) -> BitsAndBytesConfig:
    import_or_stop("bitsandbytes", reason="USE_QLORA needs bitsandbytes, which cannot load here ({error}); "
                   "pip install bitsandbytes, or pass --no-use-qlora")
    if not torch.cuda.is_available():
        print("note: 4-bit on CPU works for testing, not for speed")
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    assert config.bnb_4bit_compute_dtype == dtype  # the tutorial's misspelt kwarg was silently ignored
    return config


def freeze_vision_tower(model) -> None:
    for part in (model.model.vision_tower, model.model.multi_modal_projector):
        part.requires_grad_(False)


def keep_4bit_layers_unpacked(model) -> None:
    """On an AVX512-BF16 CPU bitsandbytes repacks 4-bit weights for inference, 32 rows by 64 columns a
    block; SigLIP's 4304-wide MLP is neither, and stopped the first evaluation. The plain kernel takes any width."""
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False) and (
                module.out_features % 32 or module.in_features % module.weight.blocksize):
            module.support_avx512bf16_for_cpu = False


def load_processor(model_id: str, cache_only: bool = False) -> PaliGemmaProcessor:
    processor = hub_load(PaliGemmaProcessor.from_pretrained, model_id, local_files_only=cache_only)
    processor.tokenizer.padding_side = "left"  # generation appends on the right: right padding would put pads
    # between prompt and answer (training takes the same side: a padded position is masked either way)
    return processor


def load_model(model_id: str, use_lora: bool, use_qlora: bool, freeze_vision: bool, lora_rank: int,
               lora_targets: list[str], dtype: torch.dtype, cache_only: bool = False, checkpoint: str | None = None,
               flex_attention: bool = False):
    """`checkpoint`: a full fine-tune resumes from its weights, loaded here (`load_best_checkpoint` says
    why); adapters the Trainer restores."""
    # A full fine-tune keeps fp32 weights (bf16 runs as autocast): AdamW steps of ~1e-5 are below
    # bf16's rounding step for most weights, so bf16 weights would barely move. Adapters are fp32 anyway.
    prepare_fsdp_loading(use_qlora)  # under FSDP: loaded onto the CPU, then sharded (paligemma_json/distributed.py)
    model = hub_load(PaliGemmaForConditionalGeneration.from_pretrained,
                     checkpoint if checkpoint and not use_lora else model_id,
                     dtype=dtype if use_lora or use_qlora else torch.float32, use_safetensors=True,
                     device_map=loading_device_map(model_device_map()), local_files_only=cache_only,
                     quantization_config=quantization_config(dtype) if use_qlora else None,
                     attn_implementation=attention_implementation(flex_attention))
    if use_qlora and not torch.cuda.is_available():
        keep_4bit_layers_unpacked(model)
    if freeze_vision:
        freeze_vision_tower(model)
    if use_lora or use_qlora:
        lora_config = LoraConfig(r=lora_rank, target_modules=lora_target_modules(lora_targets, freeze_vision),
                                 task_type="CAUSAL_LM")
        model = get_peft_model(model, lora_config)
    return model


def load_trained_model(final_dir: str, dtype: torch.dtype, use_qlora: bool = False, device_map: dict | None = None):
    """A finished run's `final/`: full weights, or its adapter on the base model it was trained on;
    on this process's device unless `device_map` says where."""
    base_id, device_map = adapter_base(final_dir), device_map or model_device_map()
    if base_id is None:
        return PaliGemmaForConditionalGeneration.from_pretrained(final_dir, dtype=dtype, use_safetensors=True,
                                                                 device_map=device_map)
    from peft import PeftModel
    named_by = adapter_base_source(final_dir)  # a moved base is fixed there, not with --model-id
    base = hub_load(PaliGemmaForConditionalGeneration.from_pretrained, base_id, dtype=dtype, use_safetensors=True,
                    device_map=device_map, local_files_only=cache_only_for(base_id, named_by), named_by=named_by,
                    quantization_config=quantization_config(dtype) if use_qlora else None)
    # peft loads the adapter onto "cuda" whenever there is one, wherever the base is: say where.
    return PeftModel.from_pretrained(base, final_dir, torch_device=str(torch.device(device_map[""])))


if __name__ == "__main__" and run.mode == "train":
    set_seed(SEED)  # before the adapters exist: their A matrices are random
    torch_dtype = training_dtype()
    cache_only = cache_only_for(MODEL_ID)
    processor = load_processor(MODEL_ID, cache_only)
    data = check_data(splits, processor.tokenizer, settings, run, schema)  # MAX_NEW_TOKENS 0 resolved here
    if BATCH_SIZE == 0:  # the largest micro-batch that fits this card, at 2 x GRAD_ACCUM images a step
        settings.update(largest_fitting_batch(MODEL_ID, data.settings, torch_dtype, cache_only))
        data.settings.update(BATCH_SIZE=settings["BATCH_SIZE"], GRAD_ACCUM=settings["GRAD_ACCUM"])
    if run.training_done:
        model = load_trained_model(os.path.join(OUTPUT_DIR, "final"), torch_dtype, USE_QLORA)
    else:
        if run.writes:  # before anything big loads; it warns and goes on
            check_fit(MODEL_ID, training_setting(data.settings, torch_dtype), cache_only=cache_only)
        model = load_model(MODEL_ID, USE_LORA, USE_QLORA, FREEZE_VISION, LORA_RANK, LORA_TARGET_MODULES,
                           torch_dtype, cache_only, checkpoint=run.resume_checkpoint, flex_attention=FLEX_ATTENTION)
        if GRADIENT_CHECKPOINTING:  # here, not in TrainingArguments: see enable_gradient_checkpointing
            enable_gradient_checkpointing(model)
    trainable, total = count_parameters(model)
    print(f"model: {MODEL_ID}, {torch_dtype}, trainable {trainable:,} of {total:,} parameters "
          f"({100 * trainable / total:.2f}%)")

# %% [markdown]
# ## 5. `collate_fn`: images and prompts in, CPU tensors out
# `"<image>" + prefix` is the prompt and the suffix the label: the processor masks the prompt in
# `labels` with -100, ends each label with EOS (or generation never stops), and marks prefix and
# suffix in `token_type_ids`, which the model needs for its prefix attention. Tensors stay on the CPU:
# the Trainer moves them, and worker processes cannot touch CUDA.

# %%
from paligemma_json.training import label_only_inputs


def collate_fn(batch, processor, dtype: torch.dtype, with_labels: bool = True, pad_multiple: int = 1):
    """`pad_multiple`: lengths padded to a multiple of it, so a compiled step sees a few shapes, not one a batch."""
    images, entries = zip(*batch)
    inputs = processor(
        text=["<image>" + entry["prefix"] for entry in entries],
        images=list(images),
        suffix=[entry["suffix"] for entry in entries] if with_labels else None,
        return_tensors="pt",
        padding="longest",  # never truncate: a cut label loses its EOS
        pad_to_multiple_of=pad_multiple,
    )
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    if not with_labels:
        inputs.pop("labels", None)  # the processor adds all -100 labels even without a suffix
    else:  # logits and loss on the label positions only: paligemma_json/training.py
        inputs.update(label_only_inputs(inputs["labels"], pad_multiple))
    return inputs


# %% [markdown]
# ## 6. Generate JSON from document images
# The training prompts, batched and left-padded, greedy unless `NUM_BEAMS` > 1. With `CONSTRAINED`,
# llguidance masks every token that would leave the labels' schema. Each field gets a confidence: the
# lowest probability the unmasked model gave a token of its value. Used on the validation split
# (step 7), the test set (step 8) and new documents (step 10).

# %%
from dataclasses import dataclass

from tqdm.auto import tqdm

from paligemma_json.confidence import calibrate_fields, field_confidences
from paligemma_json.constrained import ChosenTokenProbabilities, build_constraint
from paligemma_json.decoding import FastDecoding, cache_tokens, decode_batch, decoding_split, stop_on_recompiles
from paligemma_json.distributed import is_sharded, synced_generation
from paligemma_json.files import append_jsonl, completed_rows


@dataclass(frozen=True)
class GenerationSettings:
    dtype: torch.dtype  # the pixel values', as in training
    max_new_tokens: int
    num_beams: int = 1
    batch_size: int = 8  # images generated together
    fast: FastDecoding | None = None  # FAST_DECODING's path, and whether it failed here; None: today's


def generate_batch(model, processor, batch, generation: GenerationSettings, constraint=None,
                   with_confidence: bool = True) -> list[dict]:
    """`prediction` per image; `truncated`: the budget ran out before EOS, so the text is cut off;
    `confidence`: per field of the prediction, from the raw logits."""
    images, eos = len(batch), processor.tokenizer.eos_token_id
    inputs = collate_fn(batch, processor, generation.dtype, with_labels=False).to(model.device)
    prompt_length = inputs["input_ids"].shape[-1]
    tokens = cache_tokens(generation.fast, model, prompt_length, generation.max_new_tokens)  # the split's longest prompt
    fast = generation.fast is not None and generation.fast.use_fast(
        model, generation.num_beams, generation.batch_size, tokens, model.dtype, sharded=is_sharded(model))
    if fast and images < generation.batch_size:  # one compiled shape: filled up with its last image, then dropped
        inputs = collate_fn(list(batch) + [batch[-1]] * (generation.batch_size - images), processor,
                            generation.dtype, with_labels=False).to(model.device)

    def decode(fast: bool):
        recorder = ChosenTokenProbabilities(generation.num_beams, eos) if with_confidence else None
        processors = [recorder] if recorder else []  # first: it must see the scores before the schema's mask
        schema = constraint.logits_processor() if constraint else None
        processors += [schema] if schema else []
        # Greedy: each next mask is filled in a thread while the model computes the step it is for.
        ahead = schema.masks_ahead() if schema and generation.num_beams == 1 else None
        with torch.inference_mode(), stop_on_recompiles(fast):
            return recorder, model.generate(
                **inputs, max_new_tokens=generation.max_new_tokens, do_sample=False, num_beams=generation.num_beams,
                logits_processor=processors, stopping_criteria=ahead, return_dict_in_generate=True,
                synced_gpus=synced_generation(model),  # FSDP: every process steps together
                **(generation.fast.generate_kwargs(model, generation.batch_size, tokens) if fast else {}))
    # Timed and counted for decoding.jsonl; where the fast path fails, today's path decodes, said once.
    recorder, output = decode_batch(generation.fast, decode, fast, images, prompt_length,
                                    "free" if constraint is None else "constrained", eos)
    probabilities = recorder.probabilities(output.sequences).tolist() if with_confidence else None
    rows = []
    for index, answer in enumerate(output.sequences[:images, prompt_length:].tolist()):
        ended = eos in answer
        answer = answer[:answer.index(eos)] if ended else answer
        text = processor.tokenizer.decode(answer, skip_special_tokens=True)
        rows.append({"prediction": text, "truncated": not ended})
        if with_confidence:
            rows[-1]["confidence"] = field_confidences(answer, probabilities[index], processor.tokenizer, text)
    return rows


def predict_rows(model, processor, dataset: JSONLDataset, generation: GenerationSettings, start: int = 0,
                 constraint=None, also_free: bool = False, with_confidence: bool = True,
                 temperature: float | None = None):
    """One row per dataset entry from `start` on, as soon as its batch is generated: everything
    needed to score it again later without the model. `also_free`: the same batch decoded without
    the constraint too, as `free_prediction`, so the raw model's figures are never hidden.
    `temperature`: the confidences' calibration, fitted on validation (paligemma_json/confidence.py)."""
    was_training = model.training
    model.eval()
    for first in tqdm(range(start, len(dataset), generation.batch_size), desc="generating", unit="batch", leave=False,
                      disable=len(dataset) - start <= generation.batch_size):  # --predict's bar counts images
        batch = [dataset[i] for i in range(first, min(first + generation.batch_size, len(dataset)))]
        outputs = generate_batch(model, processor, batch, generation, constraint, with_confidence)
        for output in outputs:
            calibrate_fields(output.get("confidence"), temperature)
        if constraint is not None and also_free:
            for row, free in zip(outputs, generate_batch(model, processor, batch, generation, with_confidence=False)):
                row.update(free_prediction=free["prediction"], free_truncated=free["truncated"])
        for (_, entry), output in zip(batch, outputs):
            yield {"image": entry["image"], "image_path": os.path.join(dataset.image_directory_path, entry["image"]),
                   "prefix": entry["prefix"], "suffix": entry["suffix"], **output}
    model.train(was_training)


def predict_to_file(model, processor, dataset: JSONLDataset, path: str, generation: GenerationSettings,
                    resume: bool = False, split: str = "", **decoding) -> list[dict]:
    """`predict_rows` into `path`, each row appended and flushed as it is generated; with `resume`, keeps
    the rows already there and predicts only the rest. Each pass's path and cost: a line printed, and one in
    decoding.jsonl beside `path` (`split`: the dataset's folder name)."""
    kept = completed_rows(path, dataset.entries) if resume else []
    if kept:
        print(f"predictions: {len(kept)} of {len(dataset)} already in {path}; predicting the rest")
    with decoding_split(generation.fast, split or os.path.basename(dataset.image_directory_path), dataset, processor,
                        os.path.dirname(os.path.abspath(path))):
        rows = predict_rows(model, processor, dataset, generation, start=len(kept), **decoding)
        written = append_jsonl(path, kept, rows)
    return written


# %% [markdown]
# ## 7. Train with the Hugging Face `Trainer`
# At every epoch (or every `SAVE_STEPS`), the loss and then generation on `valid`: its field F1 and
# valid-JSON rate go to TensorBoard and choose the best checkpoint (the earlier on a tie), which is saved
# with its processor as safetensors in `OUTPUT_DIR/final`; `OUTPUT_DIR/training_curves.png` shows the run.

# %%
import functools

from transformers import Trainer, TrainingArguments

from paligemma_json.devices import OneGPUPerProcessArguments
from paligemma_json.distributed import end_distributed, release_training_memory, save_whole_weights
from paligemma_json.files import replace_atomically, write_json_atomically
from paligemma_json.pictures import draw_training_curves
from paligemma_json.plan import RunPlan
from paligemma_json.predict import record_budget
from paligemma_json.speed import mfu_report
from paligemma_json.tracking import trackers
from paligemma_json.training import STEADY_MULTIPLE, ExtractionTrainer, early_stopping  # scored by what it extracts


def training_arguments(output_dir: str, generation: GenerationSettings, settings: dict) -> TrainingArguments:
    """The tutorial's arguments, fixed where they misled; `settings`: step 1's, by their UPPER_CASE names."""
    save_steps = settings["SAVE_STEPS"]
    every = "steps" if save_steps > 0 else "epoch"
    return OneGPUPerProcessArguments(  # plain `python` on several GPUs: one GPU, never DataParallel
        output_dir=output_dir,
        num_train_epochs=settings["EPOCHS"],
        max_steps=settings["MAX_STEPS"],
        per_device_train_batch_size=settings["BATCH_SIZE"],
        per_device_eval_batch_size=generation.batch_size,
        gradient_accumulation_steps=settings["GRAD_ACCUM"],
        learning_rate=settings["LEARNING_RATE"],
        lr_scheduler_type=settings["LR_SCHEDULER"],
        warmup_steps=settings["WARMUP_STEPS"],
        weight_decay=settings["WEIGHT_DECAY"],
        # The paged 8-bit optimizers are CUDA-only and have failed on resume: not a default.
        optim="adamw_torch_fused" if torch.cuda.is_available() else "adamw_torch",
        eval_strategy=every,
        save_strategy=every,  # must match eval_strategy for the best checkpoint to be kept
        eval_steps=save_steps or None,
        save_steps=save_steps or None,
        save_total_limit=2,  # the best and the latest; the Trainer never deletes the best
        metric_for_best_model="eval_field_f1",  # reloaded by load_best_checkpoint, not load_best_model_at_end
        greater_is_better=True,
        logging_steps=settings["LOGGING_STEPS"],
        include_num_input_tokens_seen="non_padding",  # for the tokens/s the run reports
        report_to=trackers(settings["REPORT_TO"]),
        bf16=generation.dtype == torch.bfloat16,
        remove_unused_columns=False,  # the collate needs the image, which is not a model input
        ddp_find_unused_parameters=False,  # every trained weight gets a gradient: skip DDP's search
        use_cpu=not torch.cuda.is_available(),  # else torchrun on CPUs runs N separate, unsynced trainings
        dataloader_pin_memory=torch.cuda.is_available(),
        torch_compile=settings["COMPILE_TRAINING"],
        seed=settings["SEED"],
    )


def build_trainer(model, processor, train_dataset, valid_dataset, generation: GenerationSettings,
                  arguments: TrainingArguments, early_stopping_patience: int = 0) -> ExtractionTrainer:
    """The tutorial's Trainer, whose evaluation also generates on the validation split and scores the
    JSON, so the best checkpoint is the one that extracts best, not the one with the lowest loss."""
    return ExtractionTrainer(
        model=model,
        args=arguments,
        train_dataset=train_dataset,
        eval_dataset=valid_dataset,
        processing_class=processor,  # saved into every checkpoint, so each one loads on its own
        # Compiled, each batch padded to a multiple of STEADY_MULTIPLE tokens: a few shapes, a few compilations.
        data_collator=functools.partial(collate_fn, processor=processor, dtype=generation.dtype,
                                        pad_multiple=STEADY_MULTIPLE if arguments.torch_compile else 1),
        # Free decoding: the raw model's learning signal, which a constraint would hide.
        predict_rows=functools.partial(predict_rows, generation=generation, with_confidence=False),
        decoding=generation.fast,  # each validation's decoding recorded in decoding.jsonl
        callbacks=early_stopping(early_stopping_patience),  # on validation field F1
    )


def load_best_checkpoint(trainer: Trainer, dtype: torch.dtype):
    """The best checkpoint's weights, loaded the way that works for each mode. For a full
    fine-tune the Trainer's own loaders (its resume and load_best_model_at_end) silently load
    nothing in transformers 5.24 (PaliGemma's checkpoints keep their original key names), so it is
    reloaded through `from_pretrained`, and a resume loads it in `load_model`. Adapters load as they are."""
    model, best = trainer.model, trainer.state.best_model_checkpoint
    if best is None:
        return model
    print(f"best checkpoint: {best} (step {trainer.state.best_global_step}, "
          f"validation field_f1 {trainer.state.best_metric:.4f})")
    if hasattr(model, "peft_config"):
        model.load_adapter(best, adapter_name=model.active_adapter)
        return model
    release_training_memory(trainer)  # the gradients and AdamW's state (3x the fp32 weights) before a second copy
    return PaliGemmaForConditionalGeneration.from_pretrained(best, dtype=dtype, use_safetensors=True,
                                                             device_map=model_device_map())


def save_final_model(model, processor, final_dir: str, schema: dict | None = None,
                     state_dict: dict | None = None) -> None:
    """Adapters alone under LoRA, full weights otherwise; the processor either way, or the adapter
    cannot be used later; and the labels' schema, which its outputs should fit. `state_dict`: the
    weights to write when the model's own are sharded (FSDP)."""
    def write(path):
        model.save_pretrained(path, safe_serialization=True, state_dict=state_dict)
        processor.save_pretrained(path)
        if schema is not None:
            write_json_atomically(schema, os.path.join(path, "schema.json"))
    replace_atomically(write, final_dir)


def finish_training(trainer: Trainer, run: RunPlan, processor, final_dir: str, schema: dict | None,
                    dtype: torch.dtype, use_qlora: bool):
    """After `trainer.train()`, in every process: the model to predict with, the best checkpoint's, saved
    whole in `final_dir`. Under a launcher the processes first put an FSDP run's whole weights on disk
    together; then all but the first, which alone saves, predicts and scores, end here."""
    save = functools.partial(save_final_model, processor=processor, final_dir=final_dir, schema=schema)
    sharded = is_sharded(trainer.model)
    if sharded:
        whole_weights = save_whole_weights(trainer.model, trainer.state.best_model_checkpoint, final_dir, save,
                                           run.writes)
    end_distributed()  # what follows needs no other process
    if not run.writes:
        sys.exit(0)
    if sharded:  # on with a whole copy of what was saved, as a finished run reloads final/
        release_training_memory(trainer)
        model = load_trained_model(whole_weights, dtype, use_qlora, device_map=place_whole_copy(
            trainer.model.config, dtype, prefer_gpu=True, purpose="test predictions", remedy=f"{final_dir} is "
            "saved: run the same command again with --resume, without the launcher, to predict on one GPU"))
    else:
        model = load_best_checkpoint(trainer, dtype)
    save(model)
    return model


if __name__ == "__main__" and run.mode == "train":
    generation = GenerationSettings(torch_dtype, data.max_new_tokens, NUM_BEAMS, EVAL_BATCH_SIZE,
                                    FastDecoding(FAST_DECODING))
    final_dir = os.path.join(OUTPUT_DIR, "final")
    if not run.training_done:
        trainer = build_trainer(model, processor, train_dataset, valid_dataset, generation,
                                training_arguments(OUTPUT_DIR, generation, settings), EARLY_STOPPING_PATIENCE)
        train_result = trainer.train(resume_from_checkpoint=run.resume_checkpoint)
        model = finish_training(trainer, run, processor, final_dir, schema, torch_dtype, USE_QLORA)
        report, samples_per_second, tokens_per_second = trainer.speed(train_result, resumed=bool(run.resume_checkpoint))
        print(report)
        if torch.cuda.is_available():  # model FLOPs per second over this card's peak: paligemma_json/speed.py
            print(mfu_report(model.config, tokens_per_second, samples_per_second, USE_LORA, FREEZE_VISION,
                             run.processes, torch.cuda.get_device_name(), torch_dtype,
                             sum(data.label_tokens["train"]) / len(train_dataset),  # where the LM head runs
                             LORA_RANK, LORA_TARGET_MODULES))
        draw_training_curves(trainer.state.log_history, os.path.join(OUTPUT_DIR, "training_curves.png"),
                             trainer.state.best_global_step)
        print(f"saved: {final_dir}, {os.path.join(OUTPUT_DIR, 'training_curves.png')}")
    elif not run.writes:  # a finished run resumed under a launcher: the first process alone predicts
        sys.exit(0)
    record_budget(final_dir, generation.max_new_tokens)  # --predict's budget when MAX_NEW_TOKENS is 0

# %% [markdown]
# ## 8. Predict the test set
# Each row is appended to `OUTPUT_DIR/predictions.jsonl` as soon as it is generated. First, with
# `CONFIDENCE_THRESHOLD = 0`, the validation split is decoded the same way once, to fit the confidences'
# temperature and pick the threshold (saved in `final/confidence.json`) that the test rows are flagged by.

# %%
from paligemma_json.confidence import training_threshold

if __name__ == "__main__" and run.mode == "train":
    constraint = build_constraint(schema, processor, CONSTRAINED)
    flagging = training_threshold(CONFIDENCE_THRESHOLD, FLAG_WRONG_SHARE, final_dir,
                                   lambda path: predict_to_file(model, processor, valid_dataset, path, generation,
                                                                RESUME, constraint=constraint))
    predictions = predict_to_file(model, processor, test_dataset, os.path.join(OUTPUT_DIR, "predictions.jsonl"),
                                  generation, RESUME, constraint=constraint, also_free=constraint is not None,
                                  temperature=flagging["temperature"])
    print(f"example prediction for {predictions[0]['image']}:\n{predictions[0]['prediction'][:400]}")

# %% [markdown]
# ## 9. Evaluate
# JSON judged as JSON, not with BLEU: valid JSON, exact match, Donut's field F1 and tree-edit accuracy,
# ANLS*, accuracy per field (under the constraint, the free decoding's too, as `free_...`), and whether
# low confidence flags the wrong fields: `OUTPUT_DIR/metrics.json`, `predictions.png` (test images with
# their right, wrong and unsure fields) and `report.html`. `--evaluate OUTPUT_DIR/predictions.jsonl`
# does this again with no model. Then the model card, `final/README.md`; `--push-to-hub` comes last.

# %%
from paligemma_json.evaluation import evaluate_file, evaluate_predictions
from paligemma_json.hub import push_to_hub
from paligemma_json.model_card import write_model_card

if __name__ == "__main__" and run.mode == "train":
    metrics = evaluate_predictions(predictions, OUTPUT_DIR, schema, flagging["threshold"], flagging["source"])
    if DEMO:  # its figures are low by design: said beside them, before they are read as a failure
        from paligemma_json.demo import demo_figures_meaning
        print(demo_figures_meaning(metrics))
    # The card holds the test figures, so it is written now, and pushed with the weights.
    print("model card: " + write_model_card(final_dir, metrics, schema, predictions[0]["prefix"], data.settings,
                                            run.processes, PUSH_TO_HUB))
    if PUSH_TO_HUB:  # last: a failed upload loses nothing else (one line, exit code 2)
        push_to_hub(final_dir, PUSH_TO_HUB)

if __name__ == "__main__" and run.mode == "evaluate":
    metrics = evaluate_file(EVALUATE, CONFIDENCE_THRESHOLD)

# %% [markdown]
# ## 10. Use the trained model: read new documents, export a merged model
# `--predict PATH` reads an image, or every image in a folder, with `OUTPUT_DIR/final/` into
# `OUTPUT_DIR/predict.jsonl`: each prediction (held to `final/schema.json` unless `--no-constrained`),
# whether it parses, and each field's value with its confidence. Rows are written batch by batch, so a
# cut-off run continues with `--resume`; under torchrun each process reads its share. `--merge` folds a
# LoRA adapter into its base in fp32 (never 4-bit or bf16, which change or drop the adapter's small
# changes): `OUTPUT_DIR/merged/` is a standalone model with its processor that `from_pretrained` loads
# without peft.

# %%
from paligemma_json.confidence import prediction_confidence
from paligemma_json.dataset_report import held_out_marker  # the run's valid and test photos, by their hashes
from paligemma_json.documents import DocumentImages
from paligemma_json.model_card import write_merged_card
from paligemma_json.plan import Launch, trained_run  # a finished run's final/, or a one-line reason
from paligemma_json.predict import Backlog, prediction_settings, trained_budget  # streamed, resumable
from paligemma_json.review import write_review  # pages of flagged fields, edited, exported
from paligemma_json.schema import read_saved_schema


def predict_documents(output_dir: str, path: str, prompt: str, generation: GenerationSettings, use_qlora: bool = False,
                      constrained: bool = True, threshold: float = 0.0, resume: bool = False,
                      launch: Launch = Launch()) -> str | None:
    """`output_dir/predict.jsonl`'s path (None in a launched process other than the first)."""
    final_dir = trained_run(output_dir)
    threshold, temperature = prediction_confidence(threshold, final_dir)  # 0: the one saved with the model
    documents, schema = DocumentImages(path, prompt), read_saved_schema(final_dir)  # images listed, read per batch
    backlog = Backlog(output_dir, documents, prediction_settings(final_dir, prompt, generation.max_new_tokens, schema,
                      constrained, generation.num_beams, use_qlora), resume, launch)  # a changed setting stops here
    processor, model = load_processor(final_dir), load_trained_model(final_dir, generation.dtype, use_qlora)
    constraint = build_constraint(schema, processor, constrained)

    held_out = held_out_marker(output_dir)  # a document that is one of the run's valid or test photos

    def decode(batch):  # where --predict decodes: one batch of readable images at a time
        rows = predict_rows(model, processor, batch, generation, constraint=constraint, temperature=temperature)
        return held_out(rows)
    with decoding_split(generation.fast, "predict", documents, processor, output_dir, launch.rank, launch.processes):
        tally = backlog.finish(decode, generation.batch_size, threshold)  # appended per batch, then merged in order
    if tally is None:
        return None
    # The review loop: check the flagged fields in a browser, export corrections, train on them.
    print(write_review(tally.target, output_dir, threshold=threshold, schema=schema,
                       source_dir=documents.image_directory_path))
    return tally.target


def merge_adapter(output_dir: str) -> str:
    final_dir = trained_run(output_dir)
    base_id = adapter_base(final_dir)
    if base_id is None:
        raise FlowError(f"{final_dir} holds full weights, not a LoRA adapter: it already loads on its own")
    # fp32, and saved so: peft adds the adapter's change in the base's dtype, and bf16, in the merge or
    # in the saved file, rounds away every part of it below half a bf16 step of the weight.
    named_by = adapter_base_source(final_dir)
    config = hub_load(PaliGemmaConfig.from_pretrained, base_id, local_files_only=cache_only_for(base_id, named_by),
                      named_by=named_by)
    device_map = place_whole_copy(config, torch.float32, prefer_gpu=False, purpose="merge",  # RAM first: no GPU needed
                                  remedy="run --merge where RAM (or a GPU) has that much free; it needs no GPU")
    merged = load_trained_model(final_dir, torch.float32, device_map=device_map).merge_and_unload()
    processor, target = load_processor(final_dir), os.path.join(output_dir, "merged")

    def write(temporary):
        merged.save_pretrained(temporary, safe_serialization=True)
        processor.save_pretrained(temporary)
        write_merged_card(final_dir, temporary, base_id, os.path.abspath(target))  # final/'s card, for full weights
    print(f"merged: {final_dir} into {base_id}; {replace_atomically(write, target)} {target}")
    return target


if __name__ == "__main__" and run.mode == "predict":  # MAX_NEW_TOKENS 0: the budget final/ records
    generation = GenerationSettings(training_dtype(), MAX_NEW_TOKENS or trained_budget(trained_run(OUTPUT_DIR)),
                                    NUM_BEAMS, EVAL_BATCH_SIZE, FastDecoding(FAST_DECODING))
    predict_file = predict_documents(OUTPUT_DIR, PREDICT, PROMPT, generation, USE_QLORA, CONSTRAINED,
                                     CONFIDENCE_THRESHOLD, RESUME, run.launch)  # --resume: a cut-off --predict

if __name__ == "__main__" and run.mode == "merge":
    merged_dir = merge_adapter(OUTPUT_DIR)
