"""paligemma_json/distributed.py in one process: validation rows shared out and gathered back, and
how an FSDP launch loads. Several processes: tests/test_launchers.py (DDP) and tests/test_fsdp.py (slow)."""

import math

import pytest
import torch

import finetune_paligemma2 as flow
from paligemma_json import FlowError, distributed

FSDP_LAUNCH = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT",
               "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"}


class Rows:
    """A JSONLDataset's shape, without images."""

    def __init__(self, count):
        self.entries = [{"image": f"{index}.jpg"} for index in range(count)]
        self.image_directory_path = "images"

    def __len__(self):
        return len(self.entries)


@pytest.mark.parametrize("rows, processes", [(7, 2), (8, 2), (9, 4), (2, 3)])
def test_each_process_predicts_its_share_and_every_process_gets_all_rows_in_order(monkeypatch, rows, processes):
    """Each process is played in turn; the gather hands back what each one predicted."""
    dataset, predicted, own_rows = Rows(rows), {}, {}

    def play(rank):
        def predict(share):
            predicted[rank] = [entry["image"] for entry in share.entries]
            return ({"image": entry["image"], "by": rank} for entry in share.entries)

        def all_gather_object(shares, rows_here):
            own_rows[rank] = rows_here
            shares[:] = [own_rows.get(other, [None] * rows) for other in range(processes)]  # not played yet
        monkeypatch.setattr(torch.distributed, "all_gather_object", all_gather_object)
        return distributed.predict_across_processes(predict, dataset, rank, processes)

    for rank in range(processes):
        play(rank)
    images = [entry["image"] for entry in dataset.entries]
    for rank in range(processes):  # rows rank, rank + N, ...; every share as long, the padding dropped
        assert predicted[rank][:len(images[rank::processes])] == images[rank::processes]
        assert len(predicted[rank]) == math.ceil(rows / processes)
        assert [row["image"] for row in own_rows[rank]] == images[rank::processes]
    gathered = play(0)
    assert [row["image"] for row in gathered] == images
    assert [row["by"] for row in gathered] == [index % processes for index in range(rows)]


def test_one_process_predicts_everything_itself():
    dataset = Rows(5)
    rows = distributed.predict_across_processes(lambda share: iter(share.entries), dataset, 0, 1)
    assert rows == dataset.entries


def test_under_fsdp_the_process_group_starts_before_the_model_loads_onto_the_cpu(monkeypatch, demo_assets):
    """Process group first (transformers' is_fsdp_enabled() needs it), then no device map: the
    weights load onto the CPU for accelerate to shard. The launch itself: tests/test_fsdp.py."""
    for name, value in FSDP_LAUNCH.items():
        monkeypatch.setenv(name, value)
    calls = []
    monkeypatch.setattr("accelerate.PartialState", lambda **kwargs: calls.append(("process group", kwargs)))
    original = flow.PaliGemmaForConditionalGeneration.from_pretrained

    def from_pretrained(*args, **kwargs):
        calls.append(("load", kwargs["device_map"]))
        return original(*args, **kwargs)
    monkeypatch.setattr(flow.PaliGemmaForConditionalGeneration, "from_pretrained", from_pretrained)
    flow.load_model(demo_assets[1], True, False, False, 8, flow.LORA_TARGET_MODULES, torch.float32)
    assert calls == [("process group", {"cpu": True}), ("load", None)]


def test_without_fsdp_each_process_loads_a_whole_copy_onto_its_device(monkeypatch, demo_assets):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.setattr("accelerate.PartialState", lambda **kwargs: pytest.fail("no process group before loading"))
    seen = {}
    original = flow.PaliGemmaForConditionalGeneration.from_pretrained
    monkeypatch.setattr(flow.PaliGemmaForConditionalGeneration, "from_pretrained",
                        lambda *args, **kwargs: seen.update(kwargs) or original(*args, **kwargs))
    model = flow.load_model(demo_assets[1], False, False, False, 8, flow.LORA_TARGET_MODULES, torch.float32)
    assert seen["device_map"] == flow.model_device_map() == {"": "cpu"}
    assert not distributed.is_sharded(model) and not distributed.synced_generation(model)


@pytest.mark.parametrize("change, use_qlora, message", [
    ({}, True, "QLoRA under FSDP is not supported here"),
    ({"FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT"}, False, "FSDP saves SHARDED_STATE_DICT checkpoints here"),
    ({"FSDP_STATE_DICT_TYPE": ""}, False, "FSDP saves SHARDED_STATE_DICT checkpoints here"),  # FSDP2's default
])
def test_fsdp_refuses_what_could_not_end_well_before_loading(monkeypatch, change, use_qlora, message):
    for name, value in {**FSDP_LAUNCH, **change}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr("accelerate.PartialState", lambda **kwargs: pytest.fail("refused before the process group"))
    with pytest.raises(FlowError, match=message) as error:
        distributed.prepare_fsdp_loading(use_qlora)
    assert "\n" not in str(error.value)
