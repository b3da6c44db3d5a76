"""Training configuration: one frozen dataclass built from the Cog inputs of train.py.

The defaults, bounds and descriptions of the inputs are declared once, in train.py, because
Cog reads them from there (statically, at `cog build`) to make the API schema. This module
coerces the values and checks what one input's bounds cannot express, reporting every
problem in one error before any expensive work starts.
"""

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from src.errors import raise_all
from src.fetch import describe_source
from src.inputs import as_float, as_int
from src.local_files import special_file_problem
from src.seeds import SEED_MAX, SEED_MIN

PEFT_METHODS = ("lora", "qlora")


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs; field names are the Cog input names."""

    train_data: Path
    num_train_epochs: int
    train_batch_size: int
    micro_batch_size: int
    num_validation_samples: int
    validation_data: Path | None
    validation_batch_size: int
    run_validation: bool
    validation_prompt: str | None
    learning_rate: float
    pack_sequences: bool
    wrap_packed_sequences: bool
    chunk_size: int
    peft_method: str
    seed: int
    lora_rank: int
    lora_alpha: int
    lora_dropout: float
    init_weights: str | None = None
    keep_best_epoch: bool = False
    early_stopping_patience: int = 0
    wandb_project: str | None = None
    wandb_run_name: str | None = None

    @property
    def chooses_epochs(self) -> bool:
        """keep_best_epoch or early stopping: decisions taken on the validation loss."""
        return self.keep_best_epoch or self.early_stopping_patience > 0

    @property
    def quantize_4bit(self) -> bool:
        return self.peft_method == "qlora"

    def as_json(self) -> dict[str, Any]:
        """The inputs as JSON-ready values, for the metadata of the output (a URL without
        credentials or query, a data: URI by its size)."""
        values = asdict(self)
        for key, value in values.items():
            if isinstance(value, Path):
                values[key] = value.name
        if self.init_weights is not None:
            values["init_weights"] = describe_source(self.init_weights)
        return values


_INT_FIELDS = {f.name for f in fields(TrainConfig) if f.type is int}
_FLOAT_FIELDS = {f.name for f in fields(TrainConfig) if f.type is float}
_BOOL_FIELDS = {f.name for f in fields(TrainConfig) if f.type is bool}


SECRET_INPUTS = {"wandb_api_key"}  # passed apart: never in the config, the job folder or metadata


def build_train_config(**inputs: Any) -> TrainConfig:
    """Coerce and cross-check the Cog inputs; raise one UserInputError naming every problem."""
    inputs = {name: value for name, value in inputs.items() if name not in SECRET_INPUTS}
    problems: list[str] = []
    unknown = set(inputs) - {f.name for f in fields(TrainConfig)}
    missing = {f.name for f in fields(TrainConfig)} - set(inputs)
    problems += [f"unknown input {name!r}" for name in sorted(unknown)]
    problems += [f"missing input {name!r}" for name in sorted(missing)]
    raise_all(problems, "Invalid training inputs:")

    values = dict(inputs)
    for name in _INT_FIELDS:
        values[name] = as_int(name, values[name], problems)
    for name in _FLOAT_FIELDS:
        values[name] = as_float(name, values[name], problems)
    for name in _BOOL_FIELDS:
        if not isinstance(values[name], bool):
            problems.append(f"{name} must be true or false, got {values[name]!r}")
    values["train_data"] = _as_path("train_data", values["train_data"], problems)
    if values["validation_data"] is not None:
        values["validation_data"] = _as_path("validation_data", values["validation_data"], problems)
    for name in ("validation_prompt", "init_weights", "wandb_project", "wandb_run_name"):
        if values[name] is not None and not str(values[name]).strip():
            values[name] = None
    raise_all(problems, "Invalid training inputs:")

    problems += _cross_checks(values)
    raise_all(problems, "Invalid training inputs:")
    return TrainConfig(**values)


def _cross_checks(v: dict[str, Any]) -> list[str]:
    problems = []
    for name in (
        "num_train_epochs",
        "train_batch_size",
        "micro_batch_size",
        "chunk_size",
        "validation_batch_size",
        "num_validation_samples",
        "lora_rank",
        "lora_alpha",
    ):
        if v[name] < 1:
            problems.append(f"{name} must be at least 1, got {v[name]}")
    if v["micro_batch_size"] > v["train_batch_size"]:
        problems.append(
            f"micro_batch_size ({v['micro_batch_size']}) is larger than train_batch_size "
            f"({v['train_batch_size']}): the on-device batch cannot exceed the global batch"
        )
    if not v["learning_rate"] > 0:
        problems.append(f"learning_rate must be positive, got {v['learning_rate']}")
    if not 0 <= v["lora_dropout"] < 1:
        problems.append(f"lora_dropout must be in [0, 1), got {v['lora_dropout']}")
    if v["peft_method"] not in PEFT_METHODS:
        problems.append(
            f"peft_method must be one of {', '.join(PEFT_METHODS)}, got {v['peft_method']!r}"
        )
    if not SEED_MIN <= v["seed"] <= SEED_MAX:
        problems.append(f"seed must be a signed 64-bit integer, got {v['seed']}")
    if v["wrap_packed_sequences"] and not v["pack_sequences"]:
        problems.append("wrap_packed_sequences=true needs pack_sequences=true")
    if v["early_stopping_patience"] < 0:
        problems.append(
            f"early_stopping_patience must be 0 (off) or more, got {v['early_stopping_patience']}"
        )
    for name in ("keep_best_epoch", "early_stopping_patience"):
        if v[name] and not v["run_validation"]:
            problems.append(f"{name} decides on the validation loss: it needs run_validation=true")
    return problems


def _as_path(name: str, value: Any, problems: list[str]) -> Path | None:
    # Cog hands a downloaded URL over as a Path and a plain local path as a str.
    if not isinstance(value, str | Path) or not str(value):
        problems.append(f"{name} must be a file path or URL, got {value!r}")
        return None
    path = Path(value)
    special = special_file_problem(path, name)
    if special:
        problems.append(f"{special}: give a JSONL file")
    elif not path.is_file():
        problems.append(f"{name}: no such file: {value}")
    return path
