"""The weights archive that train() returns and predict.py loads: written and read here only.

A plain tar (no compression: safetensors do not compress) holding, at its top level:
  adapter_config.json         PEFT LoRA configuration
  adapter_model.safetensors   the LoRA weights
  training_metadata.json      inputs, base model identity, prompt format, results (METADATA_*)
  loss_curve.png              training and validation loss per optimizer step
"""

import hashlib
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from src.archive import safe_extract
from src.errors import UserInputError

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
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}


@dataclass(frozen=True)
class AdapterFiles:
    """An unpacked archive: the PEFT adapter folder and its metadata."""

    folder: Path
    metadata: dict[str, Any]


def base_model_fingerprint(model_dir: Path) -> dict[str, Any]:
    """What identifies a base model: its architecture and a hash of its config.json."""
    raw = (model_dir / "config.json").read_bytes()
    config = json.loads(raw)
    return {
        "config_sha256": hashlib.sha256(raw).hexdigest(),
        **{k: config.get(k) for k in ARCHITECTURE_KEYS},
    }


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
    """Unpack safely into `destination` and check that it is an adapter archive of this format."""
    safe_extract(archive, destination, MAX_ARCHIVE_BYTES, what="weights")
    return open_adapter(destination)


def open_adapter(folder: Path) -> AdapterFiles:
    """Check an unpacked archive: the expected files, safetensors only, this format version."""
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, METADATA):
        if not (folder / name).is_file():
            raise UserInputError(
                f"weights: the archive has no {name}; expected a training output of this model "
                f"({ADAPTER_CONFIG}, {ADAPTER_WEIGHTS}, {METADATA})"
            )
    pickles = sorted(p.name for p in folder.rglob("*") if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UserInputError(
            f"weights: refusing pickle files {', '.join(pickles)}: only safetensors are loaded"
        )
    metadata = json.loads((folder / METADATA).read_text())
    if metadata.get("format") != FORMAT_VERSION:
        raise UserInputError(
            f"weights: archive format {metadata.get('format')!r}, expected {FORMAT_VERSION!r}"
        )
    return AdapterFiles(folder, metadata)


def plot_losses(
    train_losses: list[tuple[int, float]], validation_losses: list[tuple[int, float]], out: Path
) -> Path:
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
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(out)
    plt.close(figure)
    return out
