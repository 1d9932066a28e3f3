"""The Hugging Face Hub: one line instead of a traceback when it cannot give us the model, and
quickly: without a network, `from_pretrained` retries every file for minutes before failing; and
the optional upload of a finished model."""

import os
import shlex

from paligemma_json import FlowError
from paligemma_json.keys import masked_in_logs  # the token never reaches a log line


def gated_message(model_id: str) -> str:
    return (f"{model_id} is gated: accept its license on huggingface.co/{model_id} while logged in, "
            "then set HF_TOKEN to an access token of that account")


def check_folder_or_hub_id(model_id: str, named_by: str = "--model-id") -> None:
    """A path that is not there (`./typo/model`) is named as such: huggingface_hub would refuse it as a
    malformed Hub id, two tracebacks deep. `named_by`: where the id came from, for the user to fix."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id
    if os.path.isdir(model_id):
        return
    try:
        validate_repo_id(model_id)
    except HFValidationError:
        raise FlowError(f"no model folder at {model_id}, and it is not a Hub id (owner/name); "
                        f"check {named_by}") from None


def hub_load(load, model_id: str, named_by: str = "--model-id", **kwargs):
    """One line instead of a traceback when the Hub cannot give us the model."""
    from huggingface_hub.errors import GatedRepoError
    check_folder_or_hub_id(model_id, named_by)
    try:
        return load(model_id, **kwargs)
    except OSError as error:  # transformers wraps the Hub's errors in OSError
        if isinstance(error, GatedRepoError) or isinstance(error.__cause__, GatedRepoError):
            raise FlowError(gated_message(model_id)) from None
        reason = " ".join(str(error).split())[:240]
        raise FlowError(f"cannot load {model_id} ({reason}); check the id and the network, or point "
                        "--model-id at a local folder") from None


def cache_only_for(model_id: str, named_by: str = "--model-id") -> bool:
    """Whether to load from the local cache alone. Asked once, quickly: otherwise an unreachable
    Hub costs minutes of retries for every file before the first error."""
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    check_folder_or_hub_id(model_id, named_by)
    if os.path.isdir(model_id) or constants.HF_HUB_OFFLINE:
        return False
    try:
        HfApi().model_info(model_id, timeout=10)
        return False
    except GatedRepoError:
        raise FlowError(gated_message(model_id)) from None
    except RepositoryNotFoundError:
        raise FlowError(f"{model_id} is neither a local folder nor a model on the Hub (a private one needs "
                        "HF_TOKEN); check --model-id") from None
    except Exception as error:  # no network: DNS, proxy, timeout
        if isinstance(try_to_load_from_cache(model_id, "config.json"), str):
            print(f"note: the Hub cannot be reached; loading {model_id} from the local cache")
            return True
        raise FlowError(f"cannot reach the Hugging Face Hub for {model_id} ({type(error).__name__}) and it is "
                        "not cached: check the network, or point --model-id at a local folder") from None


def push_to_hub(final_dir: str, repo_id: str) -> None:
    """Uploads `final/` to a private Hub repo. `huggingface_hub` reads HF_TOKEN from the
    environment itself: a token passed to TrainingArguments would be pickled into every checkpoint."""
    from huggingface_hub import HfApi, get_token
    try:
        with masked_in_logs(get_token()):
            HfApi().create_repo(repo_id, private=True, exist_ok=True)
            HfApi().upload_folder(folder_path=final_dir, repo_id=repo_id, commit_message="Fine-tuned PaliGemma 2")
    except Exception as error:  # the run's results are all written by now: only the upload is missing
        raise FlowError(f"pushing {final_dir} to {repo_id} failed ({type(error).__name__}); the run's results are all "
                        f"written. Check HF_TOKEN and that it may write to {repo_id}, then upload again: "
                        f"{shlex.join(['hf', 'upload', repo_id, final_dir, '--private'])}") from None
    print(f"pushed: {final_dir} to huggingface.co/{repo_id}")
