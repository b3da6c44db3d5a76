"""Where the base model comes from: the BASE_MODEL environment variable, resolved to a folder.

BASE_MODEL is one of
  * a local folder in Hugging Face format (used in place),
  * an https URL of a tar archive of such a folder (downloaded and unpacked once into the cache),
  * a Hugging Face repo id (HF_TOKEN for a gated repo), downloaded once into the cache.
Unset, it is meta-llama/Llama-2-7b-chat-hf: read in place from MANAGED_WEIGHTS, where Cog
mounts it in a pushed model (cog.yaml's `weights:`, no token needed at run time), and only
where that folder holds no model, from the Hub. The cache folder is BASE_MODEL_CACHE (default
~/.cache/llama2-cog). Nothing happens at import.
"""

import contextlib
import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from src.archive import safe_extract
from src.errors import UserInputError
from src.fetch import download, public_url
from src.log import log

DEFAULT_BASE_MODEL = "meta-llama/Llama-2-7b-chat-hf"
# cog.yaml's `weights:` target for DEFAULT_BASE_MODEL (tests/test_cog_yaml.py keeps them one)
MANAGED_WEIGHTS = Path("/src/weights/llama-2-7b-chat")
MAX_BASE_ARCHIVE_BYTES = 64 * 2**30
_WEIGHT_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model"]


@dataclass(frozen=True)
class BaseModel:
    """A base model ready to load: what the user named and the folder that holds it."""

    source: str
    path: Path

    @property
    def public_name(self) -> str:
        """The source as it may be logged or written into outputs (adapter_config.json)."""
        return public_url(self.source)


def base_model_source() -> str:
    return os.environ.get("BASE_MODEL") or DEFAULT_BASE_MODEL


def cache_dir() -> Path:
    return Path(os.environ.get("BASE_MODEL_CACHE") or Path.home() / ".cache" / "llama2-cog")


COMPILER_CACHES = {"TORCHINDUCTOR_CACHE_DIR": "torchinductor", "TRITON_CACHE_DIR": "triton"}


def keep_compiler_caches_out_of_tmp() -> None:
    """torch.compile's and triton's caches into the cache folder (they default to TMPDIR,
    which holds only what a request needs and is emptied of it); an operator's setting wins.

    Importing transformers imports torch._dynamo, which asks inductor for its cache folder,
    and inductor then writes its TMPDIR default into TORCHINDUCTOR_CACHE_DIR: that value is
    inductor's, not an operator's, so it is replaced (and the empty folder removed)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    inductor_default = os.path.abspath(default_cache_dir())
    for variable, name in COMPILER_CACHES.items():
        current = os.environ.get(variable)
        if current is None or os.path.abspath(current) == inductor_default:
            os.environ[variable] = str(cache_dir() / name)
    for empty in (os.path.join(inductor_default, "dynamo"), inductor_default):
        with contextlib.suppress(OSError):  # only if empty, as inductor's import left it
            os.rmdir(empty)


def resolve_base_model(source: str | None = None) -> BaseModel:
    """The folder of the base model, fetching it into the cache the first time."""
    source = source or base_model_source()
    if source == DEFAULT_BASE_MODEL and _holds_a_model(MANAGED_WEIGHTS):
        log(f"base model: {source} from the weights mounted at {MANAGED_WEIGHTS}")
        return BaseModel(source, MANAGED_WEIGHTS)
    if source.startswith(("https://", "http://")):
        path = _fetch_archive(source)
    elif Path(source).is_dir():
        path = Path(source)
    elif Path(source).is_absolute() or source.startswith("."):
        raise UserInputError(f"BASE_MODEL: no such folder: {source}")
    else:
        path = _fetch_hub(source)
    if not (path / "config.json").is_file():
        raise UserInputError(f"BASE_MODEL {public_url(source)}: no config.json in {path}")
    return BaseModel(source, path)


def _holds_a_model(folder: Path) -> bool:
    """A mounted folder with the config and at least one safetensors file (an empty or
    half-mounted target falls through to the Hub, as a local run does)."""
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _fetch_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    log(f"base model: fetching {repo_id} from the Hugging Face Hub (cached in {cache_dir()})")
    try:
        folder = snapshot_download(
            repo_id,
            cache_dir=cache_dir() / "hub",
            allow_patterns=_WEIGHT_PATTERNS,
            token=os.environ.get("HF_TOKEN") or None,
        )
    except LocalEntryNotFoundError as error:
        raise UserInputError(
            f"BASE_MODEL {repo_id}: not in the cache and the Hub cannot be reached "
            f"(offline or HF_HUB_OFFLINE=1): {error}"
        ) from error
    except HfHubHTTPError as error:
        raise UserInputError(
            f"BASE_MODEL {repo_id}: download failed ({error}); for a gated repo set HF_TOKEN"
        ) from error
    return Path(folder)


def _fetch_archive(url: str) -> Path:
    target = cache_dir() / "archives" / hashlib.sha256(url.encode()).hexdigest()[:16]
    if (target / ".complete").is_file():
        return _model_folder(target, url)
    log(f"base model: downloading {public_url(url)}")
    with tempfile.TemporaryDirectory(dir=_mkdir(cache_dir())) as tmp:
        tar_path = Path(tmp) / "model.tar"
        download(url, tar_path, what="BASE_MODEL")
        unpacked = Path(tmp) / "unpacked"
        what = f"BASE_MODEL {public_url(url)}"
        safe_extract(tar_path, unpacked, MAX_BASE_ARCHIVE_BYTES, what=what)
        (unpacked / ".complete").touch()
        shutil.rmtree(target, ignore_errors=True)
        _mkdir(target.parent)
        unpacked.rename(target)  # atomic: a half-written cache entry is never used
    return _model_folder(target, url)


def _model_folder(root: Path, url: str) -> Path:
    """The folder with config.json: the archive root or its single top folder."""
    if (root / "config.json").is_file():
        return root
    candidates = [p.parent for p in root.glob("*/config.json")]
    if len(candidates) != 1:
        raise UserInputError(
            f"BASE_MODEL {public_url(url)}: the archive holds no model folder with config.json"
        )
    return candidates[0]


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
