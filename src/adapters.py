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
from pathlib import Path

import psutil
import torch
from safetensors import safe_open

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
from src.errors import UserInputError, raise_all
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


def check_adapter_fits(
    adapter: AdapterFiles, base: BaseModel, model: torch.nn.Module, what: str
) -> None:
    """Refuse an adapter trained on another base. `model` is the base's module tree (its
    weights may be on the meta device); `what` names the adapter in messages."""
    if adapter.metadata is None:
        _check_foreign(adapter, model, what)
        return
    trained_on = adapter.metadata.get("base_model", {})
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


def _check_foreign(adapter: AdapterFiles, model: torch.nn.Module, what: str) -> None:
    """An adapter trained elsewhere (Replicate's trainer wrote no metadata): taken as LoRA if
    its tensors fit this base's layers. The base path in its adapter_config.json names a
    folder on another machine and proves nothing."""
    log(
        f"{what}: no {METADATA} (trained elsewhere, such as by Replicate's trainer): taken as "
        f"LoRA; its training facts are unknown"
    )
    config = read_adapter_config(adapter.folder / ADAPTER_CONFIG)
    problems = adapter_shape_problems(adapter.folder / ADAPTER_WEIGHTS, model, config)
    raise_all(problems, f"{what} do not fit this server's base model:")


def adapter_shape_problems(weights: Path, base: torch.nn.Module, config: dict) -> list[str]:
    """A LoRA adapter whose config names the modules its tensors adapt, every tensor against
    the layer it adapts: lora_A is (rank, in), lora_B (out, rank)."""
    if config.get("peft_type", "LORA") != "LORA":
        return [f"a {config.get('peft_type')} adapter: only LoRA adapters are served"]
    linears = {
        name.removesuffix(".base_layer"): module
        for name, module in base.named_modules()
        if isinstance(module, torch.nn.Linear) or hasattr(module, "in_features")
    }
    problems, adapted = [], set()
    rank, targets = config.get("r"), set(config.get("target_modules") or [])
    with safe_open(weights, framework="pt") as tensors:
        for key in tensors.keys():  # noqa: SIM118 - safe_open is not a mapping
            match = LORA_KEY.fullmatch(key)
            if match is None:
                problems.append(f"{key}: not a LoRA weight of a linear layer")
                continue
            adapted.add(match["module"].rsplit(".", 1)[-1])
            module = linears.get(match["module"])
            shape = tuple(tensors.get_slice(key).get_shape())
            inner = shape[0] if match["part"] == "A" else shape[-1]
            if module is None:
                problems.append(f"{key}: this base has no layer {match['module']}")
            elif match["part"] == "A" and shape[1:] != (module.in_features,):
                problems.append(f"{key}: shape {shape}, the layer takes {module.in_features}")
            elif match["part"] == "B" and shape[:1] != (module.out_features,):
                problems.append(f"{key}: shape {shape}, the layer gives {module.out_features}")
            elif inner != rank:
                problems.append(f"{key}: rank {inner}, the config says r={rank}")
    if adapted != targets:
        problems.append(
            f"the config's target_modules {sorted(targets)} are not the modules its tensors "
            f"adapt, {sorted(adapted)}"
        )
    return problems
