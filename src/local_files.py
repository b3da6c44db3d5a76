"""Local paths a request names are read from the server's own disk: only regular files.

A request may give `train_data`, `init_weights` or `replicate_weights` as a local path.
Files under /proc, /sys and /dev are the system's state (environment variables, memory,
devices), not data, and /proc's report a size of 0 while reads return bytes; a FIFO or a
device blocks or never ends. They are refused before anything opens them.
"""

import stat
from pathlib import Path

SYSTEM_TREES = (Path("/proc"), Path("/sys"), Path("/dev"))


def special_file_problem(path: Path, what: str) -> str | None:
    """Why `path` is not a data file this server reads (None: it is a regular file, or
    does not exist, which the caller reports in its own words)."""
    resolved = path.resolve()
    for tree in SYSTEM_TREES:
        if resolved.is_relative_to(tree):
            return f"{what} ({path}) is a system file under {tree}, not a data file"
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        return f"{what} ({path}) is not a regular file (a device, FIFO or socket)"
    return None
