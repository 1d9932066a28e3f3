"""The model card: `final/README.md` (and `merged/README.md`) in the Hugging Face format, a YAML
header the Hub reads, then what the model extracts, the prompt, the test figures, the training
settings and how to load it. It is written after the test set is scored (the figures are in it), and
it is what `--push-to-hub` uploads with the weights. It replaces the generic card peft writes.

The Hub refuses a commit whose README names a `base_model` or `datasets` entry that is not a Hub id
(a local path is the usual one: axolotl #2134, transformers #33922, autotrain-advanced #648), so a
base it cannot name goes in the text, not the header, and the Roboflow or local dataset goes under
`training_data`, a key the Hub leaves alone."""

import json
import os
import re
import shlex
import shutil

from paligemma_json.files import read_saved_json, replace_atomically, write_json_atomically
from paligemma_json.lora import adapter_base
from paligemma_json.plan import newest_checkpoint

CARD_NAME = "README.md"
ROBOFLOW_SOURCE = "roboflow-source.json"  # written beside a downloaded export: where it came from
USAGE_HEADING = "## How to use"
# (what it measures, its metrics.json key); each with its `free_` twin when decoding was constrained
FIGURES = (("valid JSON", "json_valid_rate"), ("field F1 (Donut's)", "field_f1"), ("exact match", "exact_match"),
           ("tree-edit accuracy (Donut's)", "ted_accuracy"), ("ANLS*", "anls_star"),
           ("fits the labels' schema", "schema_valid_rate"), ("cut off at the token budget", "truncated_rate"))


def hub_model_id(model_id: str | None) -> str | None:
    """`model_id` when it names a model on the Hub; None for a local folder (even one shaped like
    an id, as `from_pretrained` takes the folder first) or a path."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    if not model_id or os.path.exists(model_id):
        return None
    try:
        validate_repo_id(model_id)
    except HFValidationError:
        return None
    return model_id


def card_license(base_model: str | None) -> str | None:
    """Google's PaliGemma 2 weights come under the Gemma terms, and so does what is trained from
    them; for any other base the card cannot know the license, so it names none."""
    return "gemma" if (hub_model_id(base_model) or "").startswith("google/paligemma2-") else None


def record_roboflow_source(dataset_dir: str, workspace: str, project: str, version: int) -> None:
    write_json_atomically({"workspace": workspace, "project": project, "version": version},
                          os.path.join(dataset_dir, ROBOFLOW_SOURCE))


def dataset_source(dataset_dir: str, demo: bool) -> str:
    """`roboflow:WORKSPACE/PROJECT/VERSION` for a downloaded export, `synthetic demo`, or
    `local:FOLDER` for an export the user brought."""
    if demo:
        return "synthetic demo"
    source = read_saved_json(os.path.join(dataset_dir, ROBOFLOW_SOURCE))
    if source is not None:
        return f"roboflow:{source['workspace']}/{source['project']}/{source['version']}"
    return "local:" + os.path.basename(os.path.normpath(dataset_dir))


def card_header(base_model: str | None, library_name: str, method: str, dataset: str | None,
                merged: bool = False) -> dict:
    """The YAML header as a dict, keys the Hub reads first; None values are left out."""
    tags = ["paligemma", "document-extraction", "json-extraction", method] + (["merged"] if merged else [])
    return {key: value for key, value in {
        "base_model": hub_model_id(base_model), "library_name": library_name, "license": card_license(base_model),
        "pipeline_tag": "image-text-to-text", "tags": tags, "training_data": dataset}.items() if value is not None}


def _yaml(header: dict) -> str:
    from huggingface_hub import ModelCardData
    return ModelCardData(**header).to_yaml()


def read_card(path: str) -> tuple[dict, str]:
    """(header, body) of a card; ({}, text) when it has no YAML header."""
    import yaml
    with open(path, encoding="utf-8") as file:
        text = file.read()
    match = re.match(r"---\n(.*?)\n---\n", text, flags=re.DOTALL)
    if not match:
        return {}, text
    return yaml.safe_load(match.group(1)) or {}, text[match.end():]


def _write_card(header: dict, body: str, path: str) -> None:
    def write(temporary):
        with open(temporary, "w", encoding="utf-8") as out:
            out.write(f"---\n{_yaml(header)}\n---\n\n{body.strip()}\n")
    replace_atomically(write, path)


# --- The body's sections -------------------------------------------------------------------------

def _type_of(schema: dict) -> str:
    if "anyOf" in schema:
        return " or ".join(_type_of(branch) for branch in schema["anyOf"])
    kind = schema.get("type", "any value")
    kind = " or ".join(kind) if isinstance(kind, list) else kind
    if kind == "array" and isinstance(schema.get("items"), dict):
        items = schema["items"]
        if items.get("type") == "object" and items.get("properties"):
            return "list of objects (" + ", ".join(f"`{key}`" for key in items["properties"]) + ")"
        return f"list of {_type_of(items)}"
    if kind == "array":
        return "list"
    if kind == "object" and schema.get("properties"):
        return "object (" + ", ".join(f"`{key}`" for key in schema["properties"]) + ")"
    return kind


def schema_summary(schema: dict | None) -> list[str]:
    """The labels' top-level fields, one line each."""
    if schema is None:
        return ["The labels are not JSON, so there is no schema: the model writes free text."]
    if schema.get("type") != "object" or not schema.get("properties"):
        return [f"One JSON value: {_type_of(schema)}. The whole schema is `schema.json`, beside the weights."]
    required = set(schema.get("required", []))
    lines = ["A JSON object with these fields (the whole schema, which `--predict` holds the output to, is "
             "`schema.json` beside the weights):", ""]
    lines += [f"- `{key}`: {_type_of(field)}" + ("" if key in required else " (not in every label)")
              for key, field in schema["properties"].items()]
    return lines


def _number(value) -> str:
    return json.dumps(value)  # exactly as metrics.json holds it


def figures_table(metrics: dict) -> list[str]:
    """Test figures exactly as in metrics.json: constrained and free side by side."""
    constrained = metrics.get("decoding") == "constrained"
    lines = [f"On the {metrics.get('rows', '?')} images of the test split, exactly as in the run's `metrics.json` "
             "(per field and confidence figures are there too):", ""]
    if constrained:
        lines += ["| figure | constrained to `schema.json` | free |", "|---|---|---|"]
    else:
        lines += ["| figure | free decoding |", "|---|---|"]
    for label, key in FIGURES:
        if key in metrics:
            cells = [f"`{key}` {_number(metrics[key])}"]
            if constrained:
                cells.append(f"`free_{key}` {_number(metrics[f'free_{key}'])}" if f"free_{key}" in metrics else "")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def training_method(settings: dict) -> str:
    return "qlora" if settings["USE_QLORA"] else "lora" if settings["USE_LORA"] else "full-fine-tune"


def _trainer_state(output_dir: str) -> dict:
    checkpoint = newest_checkpoint(output_dir)
    return {} if checkpoint is None else read_saved_json(os.path.join(checkpoint, "trainer_state.json"))


def training_lines(settings: dict, base_model: str, processes: int) -> list[str]:
    method = training_method(settings)
    if method == "full-fine-tune":
        how = "full fine-tune: every weight trained"
    else:
        how = (("QLoRA: LoRA on a 4-bit (nf4) base" if method == "qlora" else "LoRA") +
               f", rank {settings['LORA_RANK']}, on " + ", ".join(settings["LORA_TARGET_MODULES"]))
    how += "; the vision tower and projector frozen" if settings["FREEZE_VISION"] else ""
    length = (f"{settings['MAX_STEPS']} optimizer steps" if settings["MAX_STEPS"] > 0
              else f"{settings['EPOCHS']:g} epochs")
    state = _trainer_state(settings["OUTPUT_DIR"])
    decoding = "constrained to `schema.json` (llguidance), and free" if settings["CONSTRAINED"] else "free"
    if state:
        length += f"; {state['global_step']} steps trained"
        if state.get("best_global_step") is not None and state.get("best_metric") is not None:
            length += (f"; these weights are the best checkpoint, step {state['best_global_step']} "
                       f"(validation field F1 {state['best_metric']:.4f})")
    return [
        f"- Base model: `{base_model}`",
        f"- Method: {how}",
        f"- Learning rate: {settings['LEARNING_RATE']:g} ({settings['LR_SCHEDULER']} schedule, "
        f"{settings['WARMUP_STEPS']} warmup steps), weight decay {settings['WEIGHT_DECAY']:g}",
        f"- Effective batch: {settings['BATCH_SIZE'] * settings['GRAD_ACCUM'] * processes} ({settings['BATCH_SIZE']} "
        f"per device × {settings['GRAD_ACCUM']} accumulated × {processes} process{'es' if processes > 1 else ''})",
        f"- Length: {length}",
        f"- Seed: {settings['SEED']}",
        f"- Test decoding: {decoding}; at most {settings['MAX_NEW_TOKENS']} new tokens; "
        + ("greedy" if settings["NUM_BEAMS"] <= 1 else f"{settings['NUM_BEAMS']} beams"),
    ]


def usage_section(model: str, base_model: str | None, prompt: str, max_new_tokens: int, quantized: bool,
                  predict_lines: list[str]) -> str:
    """Loading with plain transformers (and peft for an adapter: `base_model` given), then `--predict`."""
    imports = ["import torch", "from PIL import Image"]
    imports += ["from peft import PeftModel"] if base_model else []
    imports += ["from transformers import " + ("BitsAndBytesConfig, " if quantized else "")
                + "PaliGemmaForConditionalGeneration, PaliGemmaProcessor"]
    code = imports + ["", "# bf16 where the GPU has it natively (compute capability 8.0+), else fp32: Gemma 2 "
                          "overflows in fp16",
                      "dtype = torch.bfloat16 if torch.cuda.is_available() and "
                      "torch.cuda.get_device_capability()[0] >= 8 else torch.float32"]
    if base_model:
        quantization = (', quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", '
                        'bnb_4bit_compute_dtype=dtype)') if quantized else ""
        code += [f"base = PaliGemmaForConditionalGeneration.from_pretrained({base_model!r}, dtype=dtype, "
                 f'device_map="auto"{quantization})',
                 f"model = PeftModel.from_pretrained(base, {model!r}).eval()"]
    else:
        code += [f"model = PaliGemmaForConditionalGeneration.from_pretrained({model!r}, dtype=dtype, "
                 'device_map="auto").eval()']
    code += [f"processor = PaliGemmaProcessor.from_pretrained({model!r})  # saved with the weights", "",
             'image = Image.open("document.jpg").convert("RGB")',
             f'inputs = processor(text={"<image>" + prompt!r}, images=image, return_tensors="pt")'
             ".to(model.device, dtype)",
             "with torch.inference_mode():",
             f"    output = model.generate(**inputs, max_new_tokens={max_new_tokens}, do_sample=False)",
             'print(processor.decode(output[0, inputs["input_ids"].shape[-1]:], skip_special_tokens=True))']
    return "\n".join([USAGE_HEADING, "",
                      "With transformers" + (" and peft" if base_model else "") + " (this decodes free; `--predict` "
                      "below holds the output to `schema.json` and gives every field a confidence):", "",
                      "```python", *code, "```", "", *predict_lines])


def predict_lines(run_dir: str, settings: dict, repo_id: str = "") -> list[str]:
    command = ["python", "finetune_paligemma2.py", "--output-dir", run_dir, "--predict", "photos/",
               "--prompt", settings["PROMPT"], "--max-new-tokens", str(settings["MAX_NEW_TOKENS"])]
    command += ["--use-qlora"] if settings["USE_QLORA"] else []
    lines = ["With this project's script, which reads `OUTPUT_DIR/final` and writes `OUTPUT_DIR/predict.jsonl` "
             "(one line per image: the JSON, whether it parses, each field's confidence):", ""]
    if repo_id:
        lines += ["```bash", f"hf download {repo_id} --local-dir my-run/final",
                  shlex.join([*command[:2], "--output-dir", "my-run", *command[4:]]), "```"]
    else:
        lines += ["```bash", shlex.join(command), "```"]
    return lines


# --- The cards -----------------------------------------------------------------------------------

def _dataset_words(dataset: str) -> str:
    kind, _, name = dataset.partition(":")
    if kind == "roboflow":
        workspace, project, version = name.rsplit("/", 2)
        return (f"the Roboflow dataset [{workspace}/{project}, version {version}]"
                f"(https://universe.roboflow.com/{workspace}/{project}/dataset/{version})")
    return f"a local export (`{name}`)" if kind == "local" else "synthetic demo manifests"


def _intro(kind: str, base_model: str, dataset: str | None) -> str:
    what = {"adapter": "A LoRA adapter for", "full": "A fine-tune of", "merged": "A LoRA adapter merged into"}[kind]
    lines = [f"{what} `{base_model}` that reads photographed documents into JSON, trained with "
             "`finetune_paligemma2.py`" + (f" on {_dataset_words(dataset)}." if dataset else ".")]
    if hub_model_id(base_model) is None:
        lines.append(f"The base, `{base_model}`, is not a Hub id, so the header names no `base_model` (the Hub "
                     "refuses a path there) and no license.")
    if dataset == "synthetic demo":
        lines.append("This is the offline demo: a tiny random model trained on synthetic manifests. It shows the "
                     "flow, not a model to use.")
    return "\n\n".join(["# PaliGemma 2 for document JSON extraction", *lines])


def write_model_card(final_dir: str, metrics: dict, schema: dict | None, prompt: str, settings: dict,
                     processes: int, repo_id: str = "") -> str:
    """`final_dir/README.md`, replacing peft's generic card; written after scoring, whole or not at all.
    `processes`: how many trained together (the effective batch)."""
    base_model = adapter_base(final_dir)
    kind = "adapter" if base_model else "full"
    base_model = base_model or settings["MODEL_ID"]
    dataset = dataset_source(settings["DATASET_DIR"], settings["DEMO"])
    header = card_header(base_model, "peft" if kind == "adapter" else "transformers", training_method(settings),
                         dataset)
    model = repo_id or os.path.abspath(final_dir)
    body = "\n".join([
        _intro(kind, base_model, dataset), "",
        "## What it extracts", "", *schema_summary(schema), "",
        "## Prompt", "",
        f"`<image>` then `{prompt}`: the processor puts the image tokens where `<image>` is. The model was trained "
        "on this exact prompt.", "",
        "## Test figures", "", *figures_table(metrics), "",
        "## Training", "", *training_lines(settings, base_model, processes), "",
        usage_section(model, base_model if kind == "adapter" else None, prompt, settings["MAX_NEW_TOKENS"],
                      settings["USE_QLORA"], predict_lines(os.path.dirname(os.path.abspath(final_dir)), settings,
                                                           repo_id)),
    ])
    path = os.path.join(final_dir, CARD_NAME)
    _write_card(header, body, path)
    return path


def _recorded_use(body: str) -> tuple[str, int]:
    """The prompt and token budget in the usage code a card of ours holds (defaults without one)."""
    import ast
    prompt = re.search(r"processor\(text=('.*'|\".*\"), images=image", body)
    budget = re.search(r"max_new_tokens=(\d+)", body)
    return (ast.literal_eval(prompt.group(1)).removeprefix("<image>") if prompt else "extract data in JSON format",
            int(budget.group(1)) if budget else 1024)


def write_merged_card(final_dir: str, merged_dir: str, base_model: str, loaded_from: str) -> None:
    """`merged_dir/README.md`: final/'s card for full weights (library transformers, the intro and
    the loading code changed; the figures and settings hold for the merged weights too), or a short
    one when final/ has no card of ours (a run that was never scored); and final/'s `schema.json`."""
    final_card = os.path.join(final_dir, CARD_NAME)
    header, body = read_card(final_card) if os.path.isfile(final_card) else ({}, "")
    ours = USAGE_HEADING in body and "training_data" in header
    dataset = header["training_data"] if ours else None
    method = next((tag for tag in header.get("tags", []) if tag in ("lora", "qlora")), "lora")
    prompt, max_new_tokens = _recorded_use(body)
    usage = usage_section(loaded_from, None, prompt, max_new_tokens, False,
                          ["`--predict` reads the run's `final/`: the adapter these weights were merged from, with "
                           "its `schema.json`."])
    if ours:
        sections = body[body.index("\n## "):body.index(USAGE_HEADING)].strip()
    else:
        sections = "The run's `final/README.md` holds no test figures: the run was not scored."
    merged_header = card_header(base_model, "transformers", method, dataset, merged=True)
    _write_card(merged_header, "\n\n".join([_intro("merged", base_model, dataset), sections, usage]),
                os.path.join(merged_dir, CARD_NAME))
    if os.path.isfile(os.path.join(final_dir, "schema.json")):  # the card points to it beside the weights
        shutil.copy(os.path.join(final_dir, "schema.json"), merged_dir)
