"""What trainings leave in TMPDIR: the weights archive of the last one, nothing else.

Cog reads the archive that train() returns after train() has returned, so it cannot go with
the training's other temporary files; it goes when the next training of the same server
starts. Each archive lives in a folder named after the process that train() runs in (a
data-parallel rank 0 names its launcher's), so a server removes its own earlier outputs and
those of processes that are gone, never another running server's.

Cog downloads a URL given as train_data or validation_data itself, before train() runs,
into `tmpXXXXXXXX<file name>` in TMPDIR; a download that fails leaves the partial file
behind. The next training removes such files of data (.jsonl, .json, .ndjson, .txt) when
nothing has them open and they are not this training's inputs.
"""

import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import psutil

from src.log import log

OUTPUT_PREFIX = "llama2-output-"
LAUNCHER_PID_VARIABLE = "TRAIN_LAUNCHER_PID"  # set by the launcher for its workers
# tempfile.NamedTemporaryFile(suffix=filename) as Cog 0.23 names a downloaded input; only
# data files' names, so that other programs' temporary files in a shared /tmp are left alone
COG_DOWNLOAD = re.compile(r"tmp[a-z0-9_]{8}.+\.(jsonl|json|ndjson|txt)")
LEFTOVER_AGE_S = 60  # younger files may be a download still being written


def owner_pid() -> int:
    """The process whose training this is: the one train() runs in."""
    return int(os.environ.get(LAUNCHER_PID_VARIABLE) or os.getpid())


def new_output_folder() -> Path:
    return Path(tempfile.mkdtemp(prefix=f"{OUTPUT_PREFIX}{owner_pid()}-"))


def clear_earlier_outputs(inputs: Iterable[Path | None] = ()) -> None:
    """Before a training: earlier trainings' archives (this server's, or of processes that
    are gone) and Cog's partial downloads, except `inputs`, this training's own files."""
    root = Path(tempfile.gettempdir())
    me = owner_pid()
    for folder in root.glob(f"{OUTPUT_PREFIX}*"):
        pid = folder.name.removeprefix(OUTPUT_PREFIX).partition("-")[0]
        if pid.isdigit() and (int(pid) == me or not psutil.pid_exists(int(pid))):
            shutil.rmtree(folder, ignore_errors=True)
    remove_cog_leftovers(root, {Path(p).resolve() for p in inputs if p is not None})


def remove_cog_leftovers(root: Path, keep: set[Path]) -> None:
    candidates = [
        path
        for path in root.iterdir()
        if COG_DOWNLOAD.fullmatch(path.name)
        and path.is_file()
        and not path.is_symlink()
        and path.resolve() not in keep
        and path.stat().st_uid == os.getuid()
        and time.time() - path.stat().st_mtime > LEFTOVER_AGE_S
    ]
    if not candidates:
        return
    open_now = _open_files()
    removed = [path for path in candidates if path.resolve() not in open_now]
    for path in removed:
        path.unlink(missing_ok=True)
    if removed:
        log(f"removed {len(removed)} partial download(s) that Cog left in {root}")


def _open_files() -> set[Path]:
    """Files any process this user can see has open."""
    paths: set[Path] = set()
    for process in psutil.process_iter():
        try:
            paths.update(Path(f.path).resolve() for f in process.open_files())
        except (psutil.Error, OSError):
            continue
    return paths
