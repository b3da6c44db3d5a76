"""Safe extraction of tar archives that come from outside (base models, trained weights).

Refuses absolute paths, `..`, links, devices and archives whose content exceeds a size cap,
before anything is written; then extracts with Python's "data" filter as a second guard.
"""

import tarfile
from pathlib import Path, PurePosixPath

from src.errors import UserInputError


def safe_extract(archive: Path, destination: Path, max_bytes: int, what: str) -> None:
    """Extract `archive` into `destination`, or raise UserInputError if any member is unsafe."""
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            _check_members(members, max_bytes, what)
            destination.mkdir(parents=True, exist_ok=True)
            tar.extractall(destination, members=members, filter="data")
    except tarfile.TarError as error:
        raise UserInputError(f"{what} is not a readable tar archive: {error}") from error


def _check_members(members: list[tarfile.TarInfo], max_bytes: int, what: str) -> None:
    total = 0
    for member in members:
        name = PurePosixPath(member.name)
        if name.is_absolute() or ".." in name.parts:
            raise UserInputError(
                f"{what}: refusing archive member with unsafe path {member.name!r}"
            )
        if not (member.isfile() or member.isdir()):
            raise UserInputError(
                f"{what}: refusing archive member {member.name!r}: "
                "only files and folders are allowed"
            )
        total += member.size
        if total > max_bytes:
            raise UserInputError(
                f"{what}: archive content exceeds the limit of {max_bytes / 2**30:.1f} GiB"
            )
