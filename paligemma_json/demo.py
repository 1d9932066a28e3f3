"""Offline demo assets: synthetic pallet manifests in Roboflow's JSONL export layout, and a tiny
random PaliGemma 2 with a locally trained tokenizer, saved so that the script loads both through
the very same `from_pretrained` / dataset code it uses for the real thing.

Nothing here reaches the network. `python finetune_paligemma2.py --demo` calls `build_demo`.
"""

import json
import math
import os
import random
import shutil
import uuid

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from paligemma_json.json_text import parse_json

# The flow stays the same; only these constants change for the demo, and the script prints them.
# A random tiny model barely moves under LoRA (frozen random embeddings), so the demo trains fully,
# with the learning rate, batch and step count that were measured to teach it valid JSON and the
# paper's colour.
DEMO_OVERRIDES = {
    "USE_LORA": False,
    "USE_QLORA": False,
    "LEARNING_RATE": 2e-3,
    "BATCH_SIZE": 8,
    "GRAD_ACCUM": 1,
    "WARMUP_STEPS": 10,
    "LR_SCHEDULER": "cosine",
    "WEIGHT_DECAY": 0.0,
    # 400 steps teach valid JSON; the paper colour, the one field read from the page, "clicks" only
    # later, and only while the learning rate is still high: with 400 steps three seeds read it on 17-75%
    # of the test pages (BENCHMARKS.md, "The demo reads the page"). 600 steps were enough on the machine
    # that measured them, but on another 2-core machine at torch's default 2 threads (2026-12-04) seed 42
    # kept step 400 as best and read it on 7 of 24 pages, a guess; with 800, seeds 42, 1 and 2 read it on
    # 24 of 24 there.
    "MAX_STEPS": 800,
    "SAVE_STEPS": 100,  # evaluate and checkpoint every 100 steps rather than per epoch
    "LOGGING_STEPS": 10,
    "PROMPT": "extract data in JSON format",
}

SPLIT_SIZES = {"train": 150, "valid": 16, "test": 24}  # distinct documents, one photo each
EXTRA_TOKENIZER_RECORDS = 300  # more generated labels so BPE merges generalise past train/valid
TOKENIZER_VOCAB_SIZE = 1000  # an upper bound: merges stop at digits and punctuation, ~750 are learnt
IMAGE_SIZE = 64  # 64 px / patch 16 = 16 image tokens: enough to learn the JSON shape, not to read
TINY_MODEL_SIZE = "0.63M"  # build_tiny_model's 634,624 parameters with the demo's tokenizer (tests/test_demo.py)
# The one field 64 px can show: which part of a multi-part form this is, by its paper's colour. It is
# drawn independently of every other field and printed nowhere, so only the image can give it.
IMAGE_ONLY_FIELD = "copy"
PAPER_COLOURS = {"WHITE": (250, 250, 250), "YELLOW": (245, 205, 45), "PINK": (245, 140, 180),
                 "BLUE": (140, 190, 250)}

_CITIES = ["Springfield", "Riverside", "Fairview", "Georgetown", "Madison", "Clinton", "Franklin",
           "Greenville", "Salem", "Bristol", "Oakland", "Ashland", "Dayton", "Milton", "Newport"]
_SALESMEN = ["J. Ortega", "M. Chen", "A. Novak", "R. Patel", "S. Kim", "L. Rossi", "D. Okafor",
             "E. Larsen", "T. Moreau", "K. Singh"]
_PRODUCTS = ["COLA 12OZ CAN 24PK", "DIET COLA 2L", "LEMON SODA 12OZ", "ORANGE SODA 20OZ",
             "SPARKLING WATER 1L", "ICED TEA 16OZ", "ENERGY DRINK 8OZ", "GINGER ALE 12OZ",
             "ROOT BEER 2L", "SPORTS DRINK 28OZ", "COLD BREW 11OZ", "TONIC WATER 1L",
             "GRAPE SODA 12OZ", "CHERRY COLA 20OZ", "CLUB SODA 1L", "LIME SELTZER 12OZ"]


def make_manifest(rng: random.Random) -> dict:
    """One manifest with the real pallet dataset's fields, in its key order."""
    products = []
    for description in rng.sample(_PRODUCTS, rng.randint(2, 4)):
        cases = rng.randint(1, 60)
        products.append({"description": description, "cases": cases,
                         "sales_units": cases * rng.choice([1, 4, 6, 12, 24]),
                         "layers": rng.randint(1, 5)})
    date = f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    return {
        "copy": rng.choice(sorted(PAPER_COLOURS)),
        "route": f"R{rng.randint(100, 999)}",
        "pallet_number": rng.randint(1, 30),
        "delivery_date": date,
        "load": f"L{rng.randint(1000, 9999)}",
        "dock": f"D{rng.randint(1, 20):02d}",
        "shipment_id": f"SH{rng.randint(100000, 999999)}",
        "destination": f"{rng.choice(_CITIES)} DC",
        "asn_number": f"ASN{rng.randint(10000, 99999)}",
        "salesman": rng.choice(_SALESMEN),
        "products": products,
        "total_cases": sum(p["cases"] for p in products),
        "total_units": sum(p["sales_units"] for p in products),
        "total_layers": sum(p["layers"] for p in products),
        "printed_date": date,
        "page_number": 1,
    }


def render_manifest(record: dict, rng: random.Random) -> Image.Image:
    """A manifest printed on its copy's paper, then photographed: tilt, uneven light, blur and sensor
    noise."""
    page = Image.new("RGB", (420, 560), PAPER_COLOURS[record["copy"]])
    draw = ImageDraw.Draw(page)
    title, small = ImageFont.load_default(size=22), ImageFont.load_default(size=14)
    draw.text((20, 16), "PALLET LOAD MANIFEST", font=title, fill=20)
    y = 56
    for key in ["route", "pallet_number", "delivery_date", "load", "dock", "shipment_id",
                "destination", "asn_number", "salesman"]:
        draw.text((20, y), f"{key.replace('_', ' ').upper()}: {record[key]}", font=small, fill=30)
        y += 20
    y += 8
    draw.line((20, y, 400, y), fill=40, width=2)
    for x, head in [(20, "DESCRIPTION"), (250, "CS"), (300, "UNITS"), (360, "LYR")]:
        draw.text((x, y + 4), head, font=small, fill=30)
    y += 26
    for product in record["products"]:
        for x, key in [(20, "description"), (250, "cases"), (300, "sales_units"), (360, "layers")]:
            draw.text((x, y), str(product[key]), font=small, fill=30)
        y += 20
    draw.line((20, y + 4, 400, y + 4), fill=40, width=1)
    draw.text((20, y + 10), f"TOTAL {record['total_cases']} CS  {record['total_units']} UNITS  "
              f"{record['total_layers']} LYR", font=small, fill=30)
    draw.text((20, 530), f"PRINTED {record['printed_date']}   PAGE {record['page_number']}",
              font=small, fill=60)

    photo = Image.new("RGB", (520, 660), (rng.randint(60, 140),) * 3)  # the table the page lies on
    photo.paste(page.rotate(rng.uniform(-7, 7), expand=True, fillcolor=PAPER_COLOURS[record["copy"]]),
                (rng.randint(10, 60), rng.randint(10, 60)))
    pixels = np.asarray(photo, dtype=np.float32)
    height, width, _ = pixels.shape
    angle = rng.uniform(0, 2 * math.pi)  # light falls off across the page in a random direction
    ramp = (np.cos(angle) * np.linspace(-1, 1, width)[None, :]
            + np.sin(angle) * np.linspace(-1, 1, height)[:, None])
    pixels = pixels * (1 - rng.uniform(0.1, 0.35) * (ramp + 1) / 2)[:, :, None]
    pixels = pixels * np.array([rng.uniform(0.9, 1.0) for _ in range(3)])  # warm or cool light
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, rng.uniform(3, 10), (height, width, 1))
    photo = Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8))
    return photo.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))


def image_field_accuracy(rows: list[dict], key: str = "prediction") -> tuple[float, float]:
    """(accuracy on the paper-colour field, the share of its commonest value): a model that does not
    see the page can do no better than the second, by always guessing the commonest colour."""
    truth = [json.loads(row["suffix"])[IMAGE_ONLY_FIELD] for row in rows]
    parsed = [parse_json(row[key]) for row in rows]
    guesses = [value.get(IMAGE_ONLY_FIELD) if isinstance(value, dict) else None for value in parsed]
    majority = max(truth.count(value) for value in set(truth)) / len(truth)
    return sum(value == guess for value, guess in zip(truth, guesses)) / len(truth), majority


def roboflow_file_name(rng: random.Random) -> str:
    """Roboflow's export naming: `IMG_0123_jpg.rf.<32 hex>.jpg`."""
    return f"IMG_{rng.randint(0, 9999):04d}_jpg.rf.{uuid.UUID(int=rng.getrandbits(128)).hex}.jpg"


def write_demo_dataset(location: str, seed: int = 0) -> dict:
    """Writes `{train,valid,test}/annotations.jsonl` plus images; returns the labels per split."""
    rng = random.Random(seed)
    labels = {}
    for split, size in SPLIT_SIZES.items():
        folder = os.path.join(location, split)
        os.makedirs(folder, exist_ok=True)
        labels[split] = []
        with open(os.path.join(folder, "annotations.jsonl"), "w") as annotations:
            for _ in range(size):
                record = make_manifest(rng)
                name = roboflow_file_name(rng)
                render_manifest(record, rng).save(os.path.join(folder, name), quality=85)
                suffix = json.dumps(record)
                # The real pallet export carries the placeholder prefix `<JSON>`, not a prompt.
                annotations.write(json.dumps({"image": name, "prefix": "<JSON>", "suffix": suffix}) + "\n")
                labels[split].append(suffix)
    return labels


def train_demo_tokenizer(texts: list[str], vocab_size: int = TOKENIZER_VOCAB_SIZE):
    """A small BPE in Gemma's format. Merges spanning whole values keep a manifest to ~100 tokens,
    which a tiny model can learn in seconds; character-level tokens (~750 per manifest) could not."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import GemmaTokenizer

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"] + [f"<0x{i:02X}>" for i in range(256)]
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    bpe.normalizer = normalizers.Replace(" ", "▁")  # as GemmaTokenizer does, so merges match
    # Merges stop at digits and JSON punctuation: keys become whole tokens, numbers stay digits.
    # Merges across a whole `value, key` stretch made every label a few rare tokens that a tiny
    # model memorised (valid loss rose from step 200 on, 0/24 valid JSON).
    bpe.pre_tokenizer = pre_tokenizers.Split(Regex(r"\d|[{}\[\],]"), behavior="isolated")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=sorted(set("".join(texts)) | {"▁"}),
                                  show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(merge) if isinstance(merge, list) else tuple(merge.split(" "))
              for merge in model["merges"]]
    return GemmaTokenizer(vocab=model["vocab"], merges=merges)


def build_tiny_model(tokenizer, save_dir: str, seed: int = 0):
    """A 0.63M-parameter (634,624) PaliGemma 2 (Gemma 2 text, SigLIP vision) saved like a Hub checkpoint."""
    import torch
    from transformers import (Gemma2Config, PaliGemmaConfig, PaliGemmaForConditionalGeneration,
                              PaliGemmaProcessor, SiglipImageProcessorPil, SiglipVisionConfig)

    patch_size = 16
    image_tokens = (IMAGE_SIZE // patch_size) ** 2
    image_processor = SiglipImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_seq_length=image_tokens,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    # The processor adds <image>, <locNNNN> and <segNNN>: size the vocabulary after it has.
    vocab_size = len(processor.tokenizer)
    text_config = Gemma2Config(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=2048,
        sliding_window=1024,  # longer than any demo sequence
        attn_logit_softcapping=None, final_logit_softcapping=None,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id)
    vision_config = SiglipVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=1,
        image_size=IMAGE_SIZE, patch_size=patch_size, projection_dim=128,
        vision_use_head=False)  # as every PaliGemma config: the pooling head never gets a gradient
    config = PaliGemmaConfig(text_config=text_config, vision_config=vision_config,
                             image_token_index=processor.image_token_id, projection_dim=128,
                             hidden_size=128, vocab_size=vocab_size)
    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(save_dir)
    processor.save_pretrained(save_dir)
    return model, processor


def demo_figures_meaning(metrics: dict) -> str:
    """One line after the demo's figures, for a reader who takes a field F1 near 0.15 for a failure:
    what a tiny random model on 64 px pages can and cannot do, and where real figures come from."""
    fields = metrics.get("per_field", {})
    never_right = sum(field["correct"] == 0 for field in fields.values())
    colour = fields.get(IMAGE_ONLY_FIELD)
    colour_score = f", right on {colour['correct']} of {colour['support']} pages" if colour else ""
    return (f"demo: a field F1 of {metrics['field_f1']:.3f}, with {never_right} of {len(fields)} fields never right, "
            f"is what a {TINY_MODEL_SIZE}-parameter model trained from random weights gives on {IMAGE_SIZE} px pages: "
            "it cannot read the printed values; the one field it can see is the paper's colour "
            f"(`{IMAGE_ONLY_FIELD}`{colour_score}). The demo shows that the flow runs end to end; real figures come "
            "from a real model on real data (docs/demo.md)")


def demo_paths(output_dir: str) -> tuple[str, str]:
    """Where the demo's dataset and tiny model go: inside the run, which a later demo replaces."""
    return os.path.join(output_dir, "demo-dataset"), os.path.join(output_dir, "demo-model")


NEW_PAGES = 6  # unlabelled pages the demo leaves to try --predict and the review page on


def write_new_pages(folder: str, seed: int = 0, count: int = NEW_PAGES) -> None:
    """Pages in no split, made as the others but from their own random stream, so the demo's dataset and
    figures are the same with or without them: `new-page-1.jpg` ..."""
    rng = random.Random(seed + 2)  # seed: the dataset's; seed + 1: the tokenizer's extra records
    os.makedirs(folder, exist_ok=True)
    for number in range(1, count + 1):
        render_manifest(make_manifest(rng), rng).save(os.path.join(folder, f"new-page-{number}.jpg"), quality=85)


def build_demo(output_dir: str, seed: int = 0, reuse: bool = False) -> tuple[str, str]:
    """Writes the demo dataset and tiny model under `output_dir` (or, with `reuse`, keeps those an
    earlier demo left there, as a resumed run needs); returns their paths."""
    dataset_dir, model_dir = demo_paths(output_dir)
    if not (reuse and os.path.isdir(dataset_dir) and os.path.isdir(model_dir)):
        for path in (dataset_dir, model_dir):
            shutil.rmtree(path, ignore_errors=True)  # demo output is disposable
        labels = write_demo_dataset(dataset_dir, seed)
        extra_rng = random.Random(seed + 1)
        extra = [json.dumps(make_manifest(extra_rng)) for _ in range(EXTRA_TOKENIZER_RECORDS)]
        # Never the test labels: merges fitted to them would inflate the demo's score.
        build_tiny_model(train_demo_tokenizer(labels["train"] + labels["valid"] + extra), model_dir, seed)
    if not (reuse and os.path.isdir(new_pages_dir(output_dir))):
        write_new_pages(new_pages_dir(output_dir), seed)
    return dataset_dir, model_dir


def new_pages_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "demo-new-pages")
