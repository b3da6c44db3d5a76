"""Trained adapters, shared by serving (predict.py's weights) and training (init_weights):
fetched and unpacked once per source, and checked against the base model, so that both
accept and refuse the same adapters with the same words.

Cog hands COG_WEIGHTS (and this model's `replicate_weights` input) over as a plain string:
a local path, an http(s) URL or a data: URI (what train() returns when the server has no
upload URL). Each source is unpacked once into its own folder, named by a hash of the source.
"""

import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Any

import psutil
import torch
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key
from safetensors import SafetensorError, safe_open

from src.artifact import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    ARCHITECTURE_KEYS,
    METADATA,
    AdapterFiles,
    base_model_fingerprint,
    open_adapter,
    read_adapter_config,
    read_archive,
)
from src.base_model import BaseModel
from src.errors import Problems, UserInputError, quoted, raise_all
from src.fetch import describe_source, fetch_to_file
from src.log import log

# peft's saved names: base_model.model.<module path>.lora_A.weight (and lora_B)
LORA_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight")


class WeightsStore:
    """Unpacked adapters under one root folder, one per distinct source."""

    def __init__(self, root: Path | None = None) -> None:
        if root is None:
            _remove_stores_of_gone_processes()
            root = Path(tempfile.mkdtemp(prefix=f"{STORE_PREFIX}{os.getpid()}-"))
        self.root = root

    def unpack(
        self, source: str, what: str = "weights", identity: str | None = None
    ) -> AdapterFiles:
        """The adapter from `source`, unpacked once per identity (see `identity`; pass the
        one already taken, so that a file replaced meanwhile is not mistaken for it)."""
        key = _key(identity or self.identity(source))
        folder = self.root / key
        if not (folder / ".complete").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            try:
                with tempfile.TemporaryDirectory(dir=self.root) as tmp:
                    archive = fetch_to_file(source, Path(tmp) / "weights.archive", what)
                    read_archive(archive, folder / "adapter")
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)  # nothing half-unpacked stays behind
                raise
            (folder / ".complete").touch()
            log(f"{what}: unpacked {describe_source(source)}")
        return open_adapter(folder / "adapter")

    def forget(self, identity: str) -> None:
        shutil.rmtree(self.root / _key(identity), ignore_errors=True)

    @staticmethod
    def identity(source: str) -> str:
        """What tells sources apart: a URL or data: URI by itself, a local file by its path,
        size and modification time (a file replaced at the same path is another adapter)."""
        path = Path(source.removeprefix("file://"))
        if not source.startswith(("http://", "https://", "data:")) and path.is_file():
            stat = path.stat()
            return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        return source


STORE_PREFIX = "llama2-weights-"


def _remove_stores_of_gone_processes() -> None:
    """A predictor's unpacked adapters outlive it only if it was killed: the next one
    removes them (the folder names its process)."""
    for folder in Path(tempfile.gettempdir()).glob(f"{STORE_PREFIX}*"):
        pid = folder.name.removeprefix(STORE_PREFIX).partition("-")[0]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _key(identity: str) -> str:
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


MAX_ADAPTER_MAGNITUDE = 1e4  # a trained LoRA entry is well under 1; beyond this, broken
ADAPTER_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_adapter_fits(
    adapter: AdapterFiles, base: BaseModel, model: torch.nn.Module, what: str
) -> None:
    """Refuse an adapter that does not fit this base, before anything touches a model:
    its training base (from the metadata), its config, and every tensor (name, shape,
    dtype, finite values of sane magnitude) against the layer it adapts, so that loading
    cannot fail half-way. `model` is the base's module tree (its weights may be on the meta
    device); `what` names the adapter in messages."""
    if adapter.metadata is None:
        log(
            f"{what}: no {METADATA} (trained elsewhere, such as by Replicate's trainer): taken "
            f"as LoRA; its training facts are unknown"
        )
    else:
        _check_training_base(adapter.metadata, base, what)
    config = read_adapter_config(adapter.folder / ADAPTER_CONFIG)
    problems: list[str] | Problems = adapter_config_problems(config)
    if not problems:
        problems = adapter_tensor_problems(adapter.folder / ADAPTER_WEIGHTS, model, config)
    raise_all(problems, f"{what} do not fit this server's base model:")


def _check_training_base(metadata: dict, base: BaseModel, what: str) -> None:
    trained_on = metadata.get("base_model")
    trained_on = trained_on if isinstance(trained_on, dict) else {}
    here = base_model_fingerprint(base.path)
    different = [k for k in ARCHITECTURE_KEYS if trained_on.get(k) != here.get(k)]
    if different:
        raise UserInputError(
            f"{what} were trained on base {trained_on.get('source')!r}, which differs from "
            f"this server's base {base.public_name!r} in {', '.join(different)}"
        )
    if trained_on.get("config_sha256") != here["config_sha256"]:
        log(
            f"note: {what} were trained on {trained_on.get('source')!r}; same architecture as "
            f"{base.public_name!r} but a different config.json"
        )


def adapter_config_problems(config: dict) -> list[str]:
    """adapter_config.json's fields that say how the adapter computes, each of a usable type,
    and none that would change the base when peft loads the adapter."""
    if config.get("peft_type", "LORA") != "LORA":
        return [
            f"{ADAPTER_CONFIG}: a {quoted(config.get('peft_type'))} adapter: only LoRA is served"
        ]
    problems = []
    rank = config.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        problems.append(f"{ADAPTER_CONFIG}: r must be a positive whole number, got {quoted(rank)}")
    alpha = config.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 < alpha < 1e6:
        problems.append(
            f"{ADAPTER_CONFIG}: lora_alpha must be a positive number, got {quoted(alpha)}"
        )
    targets = config.get("target_modules")
    names = [targets] if isinstance(targets, str) else targets
    if not names or not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        problems.append(
            f"{ADAPTER_CONFIG}: target_modules must be a module name, or a list of them, "
            f"got {quoted(targets)}"
        )
    init = config.get("init_lora_weights", True)
    if not (init is True or init is False or init == "gaussian"):
        problems.append(
            f"{ADAPTER_CONFIG}: init_lora_weights {quoted(init)} rewrites the base model's "
            f'weights when the adapter loads: only true, false or "gaussian" are taken'
        )
    if config.get("loftq_config"):
        problems.append(f"{ADAPTER_CONFIG}: loftq_config rewrites the base model's weights")
    if problems:
        return problems
    try:
        _lora_config(config)
    except (TypeError, ValueError, re.error) as error:
        problems.append(f"{ADAPTER_CONFIG}: peft does not take it ({quoted(str(error))})")
    return problems


def _lora_config(config: dict) -> Any:
    """peft's LoraConfig of the fields it knows (older peft wrote others)."""
    from peft import LoraConfig

    known = {field.name for field in fields(LoraConfig)}
    lora = LoraConfig(**{k: v for k, v in config.items() if k in known})
    if isinstance(lora.target_modules, str):
        re.compile(lora.target_modules)
    return lora


def adapter_tensor_problems(weights: Path, base: torch.nn.Module, config: dict) -> Problems:
    """Every tensor of a LoRA adapter against the layer it adapts (lora_A is (rank, in),
    lora_B (out, rank)), in a floating dtype, finite and under MAX_ADAPTER_MAGNITUDE; every
    layer the config targets has both; the config targets some layer of this base."""
    linears = {
        name.removesuffix(".base_layer"): module
        for name, module in base.named_modules()
        if (isinstance(module, torch.nn.Linear) or hasattr(module, "in_features"))
        and ".lora_" not in name  # a served base's own adapters are not layers to adapt
    }
    lora = _lora_config(config)
    # peft's own rule: target_modules (names or one regular expression), exclude_modules,
    # layers_to_transform and layers_pattern
    targeted = {name for name in linears if check_target_module_exists(lora, name)}
    problems, seen = Problems(), set()
    if not targeted:
        problems.append(
            f"{ADAPTER_CONFIG}: target_modules {quoted(config['target_modules'])} name no linear "
            f"layer of this base (its layers end in "
            f"{', '.join(sorted({n.rsplit('.', 1)[-1] for n in linears}))})"
        )
        return problems
    try:
        with safe_open(weights, framework="pt") as tensors:
            for key in tensors.keys():  # noqa: SIM118 - safe_open is not a mapping
                problem = _tensor_problem(tensors, key, linears, targeted, lora)
                if problem:
                    problems.append(f"{key}: {problem}")
                else:
                    seen.add(key)
    except SafetensorError as error:
        problems.append(f"{ADAPTER_WEIGHTS} is not a readable safetensors file ({error})")
        return problems
    missing = [
        f"base_model.model.{module}.lora_{part}.weight"
        for module in sorted(targeted)
        for part in "AB"
        if f"base_model.model.{module}.lora_{part}.weight" not in seen
    ]
    if missing and not problems:
        problems.append(
            f"the config targets {len(targeted)} layers, but {len(missing)} of their LoRA "
            f"tensors are missing, such as {missing[0]}"
        )
    return problems


def _tensor_problem(
    tensors: Any, key: str, linears: dict, targeted: set[str], lora: Any
) -> str | None:
    match = LORA_KEY.fullmatch(key)
    if match is None:
        return "not a LoRA weight of a linear layer"
    module = linears.get(match["module"])
    if module is None:
        return f"this base has no layer {match['module']}"
    if match["module"] not in targeted:
        return "adapts a layer the config's target_modules leave out"
    rank = lora.rank_pattern.get(get_pattern_key(lora.rank_pattern, match["module"]), lora.r)
    shape = tuple(tensors.get_slice(key).get_shape())
    if match["part"] == "A" and shape != (rank, module.in_features):
        return f"shape {shape}, expected {(rank, module.in_features)} (r, the layer's inputs)"
    if match["part"] == "B" and shape != (module.out_features, rank):
        return f"shape {shape}, expected {(module.out_features, rank)} (the layer's outputs, r)"
    tensor = tensors.get_tensor(key)
    if tensor.dtype not in ADAPTER_DTYPES:
        return f"dtype {str(tensor.dtype).removeprefix('torch.')}, not a floating-point one"
    finite = torch.isfinite(tensor)
    if not finite.all():
        return f"{int((~finite).sum())} of its {tensor.numel()} values are NaN or infinite"
    largest = float(tensor.abs().max()) if tensor.numel() else 0.0
    if largest > MAX_ADAPTER_MAGNITUDE:
        return f"holds {largest:.3g}, beyond {MAX_ADAPTER_MAGNITUDE:.0e} in magnitude"
    return None
