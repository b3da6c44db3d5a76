"""Trained weights for inference: from what the user names to an unpacked adapter folder.

Cog hands COG_WEIGHTS (and this model's `replicate_weights` input) over as a plain string:
a local path, an http(s) URL or a data: URI (what train() returns when the server has no
upload URL). Each source is unpacked once into its own folder, named by a hash of the source.
"""

import hashlib
import shutil
import tempfile
from pathlib import Path

from src.artifact import AdapterFiles, open_adapter, read_archive
from src.fetch import fetch_to_file, public_url
from src.log import log


class WeightsStore:
    """Unpacked adapters under one root folder, one per distinct source."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or Path(tempfile.mkdtemp(prefix="llama2-weights-"))

    def unpack(self, source: str, what: str = "weights") -> AdapterFiles:
        key = hashlib.sha256(_identity(source).encode()).hexdigest()[:16]
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
            log(f"{what}: unpacked {_describe(source)}")
        return open_adapter(folder / "adapter")

    def forget(self, source: str) -> None:
        key = hashlib.sha256(_identity(source).encode()).hexdigest()[:16]
        shutil.rmtree(self.root / key, ignore_errors=True)


def _identity(source: str) -> str:
    """A local file is the same source while its size and modification time are."""
    path = Path(source)
    if not source.startswith(("http://", "https://", "data:")) and path.is_file():
        stat = path.stat()
        return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return source


def _describe(source: str) -> str:
    if source.startswith("data:"):
        return f"data: URI ({len(source) / 2**20:.1f} MiB)"
    return public_url(source)
