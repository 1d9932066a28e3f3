"""Keys are never printed. The trackers read their keys from the environment themselves, as
huggingface_hub reads HF_TOKEN, and the Roboflow key comes from the environment or a Colab secret:
no key is ever a setting, so none reaches `TrainingArguments` (pickled into every checkpoint) or the
settings line. `mask_secrets` is the guard for what the script prints itself: the settings line and
its one-line errors show any of these keys as *** should one turn up there anyway (a key pasted
into a flag, an error that quotes a URL); `masked_in_logs` does the same for log records."""

import contextlib
import logging
import os
import sys

# The keys of the runs' services and of the trackers transformers supports (trackio uses HF_TOKEN).
SECRET_ENV_VARS = (
    "ROBOFLOW_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
    "WANDB_API_KEY", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "COMET_API_KEY",
    "NEPTUNE_API_TOKEN", "CLEARML_API_SECRET_KEY", "SWANLAB_API_KEY", "DAGSHUB_USER_TOKEN",
    "DVC_STUDIO_TOKEN", "AZURE_CLIENT_SECRET",
)
SHORTEST_SECRET = 8  # a shorter value is no real key, and masking it would garble ordinary words


def mask_secrets(text: str) -> str:
    """`text` with the value of every secret set in the environment replaced by ***."""
    for name in SECRET_ENV_VARS:
        value = os.environ.get(name, "")
        if len(value) >= SHORTEST_SECRET:
            text = text.replace(value, "***")
    return text


@contextlib.contextmanager
def masked_in_logs(secret: str | None):
    """`secret` as *** in every log record made meanwhile: huggingface_hub logs the error of each
    request it retries, and an error can quote the request, token included."""
    make_record = logging.getLogRecordFactory()

    def masked(*args, **kwargs):
        record = make_record(*args, **kwargs)
        message = record.getMessage()
        if secret and secret in message:
            record.msg, record.args = message.replace(secret, "***"), ()
        return record
    logging.setLogRecordFactory(masked)
    try:
        yield
    finally:
        logging.setLogRecordFactory(make_record)


def find_roboflow_api_key() -> str | None:
    """From the environment, or a Colab secret of that name; never printed."""
    key = os.environ.get("ROBOFLOW_API_KEY")
    if not key and "google.colab" in sys.modules:
        try:
            from google.colab import userdata
            key = userdata.get("ROBOFLOW_API_KEY")
        except Exception:  # no such secret, or access not granted
            key = None
    return key or None
