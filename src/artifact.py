"""The weights archive that train() returns and predict.py loads: written and read here only.

A plain tar (no compression: safetensors do not compress) holding, at its top level:
  adapter_config.json         PEFT LoRA configuration
  adapter_model.safetensors   the LoRA weights
  training_metadata.json      inputs, base model identity, prompt format, results (METADATA_*)
  loss_curve.png              training and validation loss per optimizer step

Reading also takes what Replicate's own trainer for this model returned: a zip with
adapter_config.json and a pickled adapter_model.bin, and no metadata.
"""

import hashlib
import json
import pickle
import tarfile
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from src.archive import safe_extract
from src.errors import UserInputError
from src.log import log
from src.prompt_format import TrainedSystemPrompt

ARCHIVE_NAME = "training_output.tar"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
METADATA = "training_metadata.json"
LOSS_CURVE = "loss_curve.png"
FORMAT_VERSION = "llama2-cog-adapter/1"
MAX_ARCHIVE_BYTES = 4 * 2**30
# The config.json fields an adapter depends on: it loads onto a base only if they all match.
ARCHITECTURE_KEYS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)
# The keys peft 0.10's LoraConfig takes (tests/fixtures/peft_0.10.0_lora_config_fields.json):
# serving images with peft 0.10 to 0.13 refuse any other key in adapter_config.json.
OLDEST_PEFT_FIELDS = frozenset(
    (
        "alpha_pattern",
        "auto_mapping",
        "base_model_name_or_path",
        "bias",
        "fan_in_fan_out",
        "inference_mode",
        "init_lora_weights",
        "layer_replication",
        "layers_pattern",
        "layers_to_transform",
        "loftq_config",
        "lora_alpha",
        "lora_dropout",
        "megatron_config",
        "megatron_core",
        "modules_to_save",
        "peft_type",
        "r",
        "rank_pattern",
        "revision",
        "target_modules",
        "task_type",
        "use_dora",
        "use_rslora",
    )
)
ADAPTER_PICKLE = "adapter_model.bin"  # peft < 0.6, as Replicate's trainer saved it
ARCHIVE_MEMBERS = {ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_PICKLE, METADATA, LOSS_CURVE}


@dataclass(frozen=True)
class AdapterFiles:
    """An unpacked archive: the PEFT adapter folder and its metadata (None for an adapter
    trained elsewhere, such as Replicate's own trainer, which wrote none)."""

    folder: Path
    metadata: dict[str, Any] | None

    @property
    def peft_method(self) -> str:
        return self.metadata.get("peft_method", "lora") if self.metadata else "lora"

    @property
    def trained_system_prompt(self) -> TrainedSystemPrompt | None:
        """The system prompt its training rows used (None: not recorded, an older archive)."""
        prompt_format = (self.metadata or {}).get("prompt_format")
        if not isinstance(prompt_format, dict):
            return None
        return TrainedSystemPrompt.from_json(prompt_format.get("system_prompt"))


def base_model_fingerprint(model_dir: Path) -> dict[str, Any]:
    """What identifies a base model: its architecture and a hash of its config.json."""
    raw = (model_dir / "config.json").read_bytes()
    config = json.loads(raw)
    return {
        "config_sha256": hashlib.sha256(raw).hexdigest(),
        **{k: config.get(k) for k in ARCHITECTURE_KEYS},
    }


def portable_adapter_config(values: dict[str, Any], base_model: str) -> dict[str, Any]:
    """adapter_config.json as every peft since 0.10 reads it (and vLLM, llama.cpp's
    converter): the base named as the user named it, target_modules sorted (peft keeps a
    set: the order changed from run to run), and the keys older peft does not know left out
    where they hold this peft's default, so they mean nothing (peft_version too: the
    metadata records the versions). A key at another value stays: an older peft refuses it
    rather than compute something else."""
    from peft import LoraConfig

    defaults = {f.name: _default(f) for f in fields(LoraConfig)}
    portable = {"base_model_name_or_path": base_model}
    for key, value in values.items():
        if key in OLDEST_PEFT_FIELDS or (key != "peft_version" and value != defaults.get(key)):
            portable.setdefault(key, value)
    if isinstance(portable.get("target_modules"), list):
        portable["target_modules"] = sorted(portable["target_modules"])
    return portable


def _default(field: Any) -> Any:
    if field.default_factory is not MISSING:
        return field.default_factory()
    return None if field.default is MISSING else field.default


def write_archive(adapter_dir: Path, metadata: dict[str, Any], loss_curve: Path, out: Path) -> Path:
    """Pack the saved adapter, the metadata and the loss curve into one tar at `out`."""
    metadata = {"format": FORMAT_VERSION, **metadata}
    metadata_path = adapter_dir / METADATA
    metadata_path.write_text(json.dumps(metadata, indent=2, sort_keys=True))
    with tarfile.open(out, "w") as tar:
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            tar.add(adapter_dir / name, arcname=name)
        tar.add(metadata_path, arcname=METADATA)
        tar.add(loss_curve, arcname=LOSS_CURVE)
    return out


def read_archive(archive: Path, destination: Path) -> AdapterFiles:
    """Unpack a weights archive (tar or zip) safely into `destination` and check it.

    Only the adapter, its config, the metadata and the loss curve are extracted, from the top
    level; anything else is listed in the logs. A pickled `adapter_model.bin` (what
    Replicate's own trainer wrote, with peft 0.4) is read as tensors only and converted to
    safetensors: no code in it can run.
    """
    skipped = safe_extract(archive, destination, MAX_ARCHIVE_BYTES, "weights", ARCHIVE_MEMBERS)
    if skipped:
        log(f"weights: not read from the archive: {', '.join(sorted(skipped))}")
    pickled = destination / ADAPTER_PICKLE
    if pickled.is_file():
        if not (destination / ADAPTER_WEIGHTS).is_file():
            _convert_to_safetensors(pickled, destination / ADAPTER_WEIGHTS)
        pickled.unlink()
    if (destination / ADAPTER_CONFIG).is_file():
        _drop_retired_config_keys(destination / ADAPTER_CONFIG)
    return open_adapter(destination)


def _drop_retired_config_keys(config: Path) -> None:
    """peft 0.4's adapter_config.json has keys that later peft no longer reads."""
    from peft import LoraConfig

    values = read_adapter_config(config)
    known = {field.name for field in fields(LoraConfig)}
    retired = sorted(key for key in values if key not in known)
    if retired:
        log(f"weights: {ADAPTER_CONFIG} from an older peft; not used: {', '.join(retired)}")
        config.write_text(json.dumps({k: v for k, v in values.items() if k in known}))


def read_adapter_config(config: Path) -> dict[str, Any]:
    try:
        values = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserInputError(f"weights: {ADAPTER_CONFIG} is not valid JSON ({error})") from error
    if not isinstance(values, dict):
        raise UserInputError(f"weights: {ADAPTER_CONFIG} is not a JSON object")
    return values


def _convert_to_safetensors(pickled: Path, out: Path) -> None:
    try:
        tensors = torch.load(pickled, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        raise UserInputError(
            f"weights: {ADAPTER_PICKLE} is not a plain dictionary of tensors ({error}); "
            f"nothing else is read from a pickle"
        ) from error
    if not isinstance(tensors, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
    ):
        raise UserInputError(f"weights: {ADAPTER_PICKLE} is not a dictionary of tensors")
    save_file({k: v.contiguous().clone() for k, v in tensors.items()}, out)  # no shared memory


def open_adapter(folder: Path) -> AdapterFiles:
    """Check an unpacked archive: a PEFT adapter, and this project's metadata if it has any."""
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (folder / name).is_file():
            raise UserInputError(
                f"weights: the archive has no {name}; expected a training output of this model "
                f"({ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} or {ADAPTER_PICKLE}, at its top level)"
            )
    if not (folder / METADATA).is_file():
        return AdapterFiles(folder, None)
    try:
        metadata = json.loads((folder / METADATA).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserInputError(f"weights: {METADATA} is not valid JSON ({error})") from error
    if not isinstance(metadata, dict):
        raise UserInputError(
            f"weights: {METADATA} is a JSON {type(metadata).__name__}, not an object"
        )
    if metadata.get("format") != FORMAT_VERSION:
        raise UserInputError(
            f"weights: archive format {metadata.get('format')!r}, expected {FORMAT_VERSION!r}"
        )
    return AdapterFiles(folder, metadata)


def plot_losses(
    train_losses: list[tuple[int, float]], validation_losses: list[tuple[int, float]], out: Path
) -> Path:
    from matplotlib import pyplot as plt

    figure = loss_figure(train_losses, validation_losses)
    figure.savefig(out)
    plt.close(figure)
    return out


def loss_figure(
    train_losses: list[tuple[int, float]], validation_losses: list[tuple[int, float]]
) -> Any:
    """Training and validation loss per optimizer step, on a log scale: a loss falls from
    about 10 to 0.01 and below, which a linear axis flattens into a line at zero."""
    import matplotlib  # here, not at the top: inference never draws, and the Agg backend

    matplotlib.use("Agg")  # must be chosen before pyplot loads
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.5), dpi=80)
    if train_losses:
        axes.plot(*zip(*train_losses, strict=True), label="train", linewidth=1)
    if validation_losses:
        axes.plot(*zip(*validation_losses, strict=True), "o-", label="validation")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (nats per supervised token)")
    if any(v > 0 for _, v in (*train_losses, *validation_losses)):  # else nothing to draw
        axes.set_yscale("log")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    return figure
