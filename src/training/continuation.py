"""Continuing an earlier training (init_weights): its adapter is fetched and checked as
predict.py checks weights, and training starts from its LoRA matrices (weights only, no
optimizer state), with its rank, alpha and target modules.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from src.adapters import WeightsStore, check_adapter_fits
from src.artifact import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterFiles,
    open_adapter,
    read_adapter_config,
)
from src.base_model import BaseModel
from src.errors import UserInputError
from src.fetch import describe_source
from src.log import log
from src.modeling import LORA_TARGET_MODULES
from src.training.config import TrainConfig

PEFT_DEFAULT_ALPHA = 8  # what peft assumes when an adapter_config.json has no lora_alpha
# LoRA variants whose weights alone do not say how they compute: refused, not approximated
UNSUPPORTED_LORA_KEYS = ("use_dora", "alpha_pattern", "rank_pattern", "layers_to_transform")


@dataclass(frozen=True)
class LoraSettings:
    """The LoRA a training adds: from the inputs, or from the adapter it continues."""

    rank: int
    alpha: int
    dropout: float
    target_modules: tuple[str, ...] = tuple(LORA_TARGET_MODULES)
    use_rslora: bool = False  # scale alpha / sqrt(rank): kept from a continued adapter

    def as_json(self) -> dict:
        return {
            "rank": self.rank,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "target_modules": list(self.target_modules),
            "use_rslora": self.use_rslora,
        }


@dataclass(frozen=True)
class StartingAdapter:
    """The unpacked adapter a training continues from."""

    source: str  # as logs and metadata name it: no credentials, a data: URI by its size
    folder: Path
    metadata: dict | None  # None for an adapter trained elsewhere

    @property
    def config(self) -> dict:
        return read_adapter_config(self.folder / ADAPTER_CONFIG)

    def lineage(self) -> list[dict]:
        """What this training started from, then what that started from, and so on."""
        entry: dict = {"weights": self.source}
        if self.metadata is None:
            return [{**entry, "trained_elsewhere": True}]
        results = self.metadata.get("results", {})
        entry |= {
            "train_data": self.metadata.get("inputs", {}).get("train_data"),
            "peft_method": self.metadata.get("peft_method"),
            "lora": self.metadata.get("lora"),
            "optimizer_steps": results.get("optimizer_steps"),
            "final_train_loss": results.get("final_train_loss"),
        }
        return [entry, *self.metadata.get("lineage", [])]

    def describe(self) -> dict:
        return {"source": self.source, "folder": str(self.folder)}

    @classmethod
    def open(cls, described: dict) -> "StartingAdapter":
        """What `describe` wrote, in a data-parallel worker."""
        adapter = open_adapter(Path(described["folder"]))
        return cls(described["source"], adapter.folder, adapter.metadata)


def fetch_starting_adapter(source: str, base: BaseModel, folder: Path) -> StartingAdapter:
    """Unpack init_weights into `folder` and refuse, before any data is read, an adapter that
    does not fit this base (checked on a module tree without weights)."""
    described = describe_source(source)
    adapter: AdapterFiles = WeightsStore(folder).unpack(source, "init_weights")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base.path))
    check_adapter_fits(adapter, base, model, f"init_weights {described}")
    return StartingAdapter(described, adapter.folder, adapter.metadata)


def lora_settings(
    config: TrainConfig, start: StartingAdapter | None, announce: bool = True
) -> LoraSettings:
    """The inputs' LoRA, or the continued adapter's rank, alpha and target modules (the
    dropout is the input's: it is how this training trains, not what the adapter is)."""
    asked = LoraSettings(config.lora_rank, config.lora_alpha, config.lora_dropout)
    if start is None:
        return asked
    values = start.config
    unsupported = [key for key in UNSUPPORTED_LORA_KEYS if values.get(key)]
    if unsupported:
        raise UserInputError(
            f"init_weights {start.source}: an adapter with {', '.join(unsupported)} cannot be "
            f"continued here (plain LoRA, or rsLoRA, on whole layers only)"
        )
    rank, alpha = int(values["r"]), int(values.get("lora_alpha", PEFT_DEFAULT_ALPHA))
    targets = values.get("target_modules") or LORA_TARGET_MODULES
    targets = tuple(sorted([targets] if isinstance(targets, str) else targets))
    rslora = bool(values.get("use_rslora", False))
    continued = LoraSettings(rank, alpha, config.lora_dropout, targets, rslora)
    if announce and (rank, alpha) != (asked.rank, asked.alpha):
        log(
            f"init_weights: continuing its adapter of rank {rank} and alpha {alpha} (lora_rank "
            f"{asked.rank} and lora_alpha {asked.alpha} are not used)"
        )
    if announce and set(targets) != set(LORA_TARGET_MODULES):
        log(f"init_weights: its adapter adapts {', '.join(targets)}; those are trained")
    return continued


def load_starting_weights(model: PeftModel, start: StartingAdapter) -> None:
    """Put the continued adapter's LoRA matrices into the freshly added ones, every one."""
    tensors = load_file(start.folder / ADAPTER_WEIGHTS)
    result = set_peft_model_state_dict(model, tensors)
    missing = [key for key in result.missing_keys if "lora_" in key]
    if missing or result.unexpected_keys:
        raise UserInputError(
            f"init_weights {start.source}: its tensors do not match the adapter it describes "
            f"({len(missing)} missing, {len(result.unexpected_keys)} unexpected)"
        )
    log(f"init_weights: starting from {start.source} ({len(tensors)} LoRA tensors)")
