"""A model id the Hub cannot give us: one line, quickly, with what to do."""

import httpx2
import pytest
from huggingface_hub import HfApi
from huggingface_hub.errors import GatedRepoError

import finetune_paligemma2 as flow
from paligemma_json import hub

HUB_ID = "google/paligemma2-3b-pt-224"


def gated_error():
    request = httpx2.Request("GET", f"https://huggingface.co/{HUB_ID}/resolve/main/config.json")
    return GatedRepoError("403 Client Error: gated", response=httpx2.Response(403, request=request))


def test_an_unreachable_id_with_hub_offline_is_one_line():
    """conftest sets HF_HUB_OFFLINE=1, so this fails at once rather than after minutes of retries."""
    with pytest.raises(flow.FlowError) as error:
        flow.load_processor(HUB_ID)
    message = str(error.value)
    assert message.startswith(f"cannot load {HUB_ID} (") and "--model-id" in message and "\n" not in message


def test_a_gated_id_says_how_to_get_access(monkeypatch):
    def gated(*args, **kwargs):
        raise OSError("You are trying to access a gated repo.") from gated_error()
    monkeypatch.setattr(flow.PaliGemmaForConditionalGeneration, "from_pretrained", gated)
    with pytest.raises(flow.FlowError) as error:
        flow.load_model(HUB_ID, True, False, False, 8, flow.LORA_TARGET_MODULES, flow.torch.float32)
    assert "accept its license" in str(error.value) and "HF_TOKEN" in str(error.value)


def test_no_network_fails_fast_unless_the_model_is_cached(monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def no_network(self, repo_id, timeout=None):
        raise ConnectionError("Name or service not known")
    monkeypatch.setattr(HfApi, "model_info", no_network)
    with pytest.raises(flow.FlowError, match="cannot reach the Hugging Face Hub .* not cached"):
        hub.cache_only_for(HUB_ID)
    monkeypatch.setattr("huggingface_hub.try_to_load_from_cache", lambda repo, name: "/cache/config.json")
    assert hub.cache_only_for(HUB_ID) is True


def test_a_gated_id_is_caught_before_loading(monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def gated(self, repo_id, timeout=None):
        raise gated_error()
    monkeypatch.setattr(HfApi, "model_info", gated)
    with pytest.raises(flow.FlowError, match="is gated: accept its license"):
        hub.cache_only_for(HUB_ID)


def test_a_local_folder_never_asks_the_hub(demo_assets, monkeypatch):
    monkeypatch.setattr(HfApi, "model_info", lambda *a, **k: pytest.fail("asked the Hub"))
    assert hub.cache_only_for(demo_assets[1]) is False


@pytest.mark.parametrize("model_id", ["./typo/model", "/nonexistent/model"])
def test_a_mistyped_local_path_is_one_line_online_and_offline(monkeypatch, model_id):
    """Offline (as the tests run) the loader names it; online the Hub check would, before any request.
    Without the check, huggingface_hub's HFValidationError came two tracebacks deep by either route."""
    from huggingface_hub import constants
    from huggingface_hub.utils import validate_repo_id
    expected = f"no model folder at {model_id}, and it is not a Hub id (owner/name); check --model-id"
    with pytest.raises(flow.FlowError) as offline:
        flow.load_processor(model_id)
    assert str(offline.value) == expected
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # The real model_info validates the id first.
    monkeypatch.setattr(HfApi, "model_info", lambda self, repo_id, timeout=None: validate_repo_id(repo_id))
    with pytest.raises(flow.FlowError) as online:
        hub.cache_only_for(model_id)
    assert str(online.value) == expected


def test_a_moved_base_model_is_named_where_the_adapter_names_it(tmp_path):
    """--predict, --merge and a finished run's resume read the base from final/adapter_config.json, not
    from --model-id: the line says which file to fix."""
    import json
    final = tmp_path / "final"
    final.mkdir()
    (final / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "./moved/base"}))
    with pytest.raises(flow.FlowError) as error:
        flow.load_trained_model(str(final), flow.torch.float32)
    assert str(error.value) == ("no model folder at ./moved/base, and it is not a Hub id (owner/name); check "
                                f"base_model_name_or_path in {final}/adapter_config.json")
