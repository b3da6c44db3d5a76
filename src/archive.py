"""Safe extraction of tar and zip archives that come from outside (base models, weights).

Refuses absolute paths, `..`, links, devices and archives whose content exceeds a size cap,
before anything is written (a tar's sizes are those its members will have); a zip's members
are extracted by streaming, the cap counted in bytes actually written, so a member whose
header understates it cannot fill the disk. Tars are extracted with Python's "data" filter as
a second guard. With `only`, members of other names are not extracted at all.
"""

import shutil
import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

from src.errors import UserInputError

CHUNK = 1 << 20
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip's first member, or an empty zip


def safe_extract(
    archive: Path, destination: Path, max_bytes: int, what: str, only: set[str] | None = None
) -> list[str]:
    """Extract `archive` (tar or zip) into `destination`, or raise UserInputError if any
    member is unsafe, leaving nothing behind. Returns the names of members left out by
    `only` (names as they stand in the archive; "./name" counts as "name")."""
    with archive.open("rb") as head:
        is_zip = head.read(4) in ZIP_MAGIC  # by its first bytes: a tar may end with a zip
    try:
        if is_zip:
            return _extract_zip(archive, destination, max_bytes, what, only)
        return _extract_tar(archive, destination, max_bytes, what, only)
    except UserInputError:
        shutil.rmtree(destination, ignore_errors=True)
        raise
    except (tarfile.TarError, zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as error:
        shutil.rmtree(destination, ignore_errors=True)
        raise UserInputError(f"{what} is not a readable tar or zip archive: {error}") from error
    except (OSError, RuntimeError, NotImplementedError) as error:  # encrypted, odd layouts
        shutil.rmtree(destination, ignore_errors=True)
        raise UserInputError(f"{what}: cannot extract the archive: {error}") from error


def _extract_tar(
    archive: Path, destination: Path, max_bytes: int, what: str, only: set[str] | None
) -> list[str]:
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        for member in members:
            _check_member(member.name, member.isfile() or member.isdir(), what)
        wanted = [m for m in members if only is None or _plain(m.name) in only]
        _check_total(sum(m.size for m in wanted), max_bytes, what)
        destination.mkdir(parents=True, exist_ok=True)
        tar.extractall(destination, members=wanted, filter="data")
        kept = {id(m) for m in wanted}
        return [m.name for m in members if id(m) not in kept and m.isfile()]


def _extract_zip(
    archive: Path, destination: Path, max_bytes: int, what: str, only: set[str] | None
) -> list[str]:
    with zipfile.ZipFile(archive) as zipped:
        members = zipped.infolist()
        for member in members:
            is_link = stat.S_ISLNK(member.external_attr >> 16)
            _check_member(member.filename, not is_link, what)
        files = [m for m in members if not m.is_dir()]
        wanted = [m for m in files if only is None or _plain(m.filename) in only]
        destination.mkdir(parents=True, exist_ok=True)
        written = 0
        for member in wanted:
            target = destination / member.filename
            target.parent.mkdir(parents=True, exist_ok=True)
            with zipped.open(member) as source, target.open("wb") as out:
                while chunk := source.read(CHUNK):
                    written += len(chunk)  # what is written, whatever the header says
                    _check_total(written, max_bytes, what)
                    out.write(chunk)
        kept = {id(m) for m in wanted}
        return [m.filename for m in files if id(m) not in kept]


def _plain(name: str) -> str:
    return name.removeprefix("./")


def _check_member(name: str, is_file_or_folder: bool, what: str) -> None:
    path = PurePosixPath(name.replace("\\", "/"))
    drive = bool(path.parts) and path.parts[0].endswith(":")  # C: in a zip made on Windows
    if path.is_absolute() or ".." in path.parts or drive:
        raise UserInputError(f"{what}: refusing archive member with unsafe path {name!r}")
    if not is_file_or_folder:
        raise UserInputError(
            f"{what}: refusing archive member {name!r}: only files and folders are allowed"
        )


def _check_total(total: int, max_bytes: int, what: str) -> None:
    if total > max_bytes:
        raise UserInputError(
            f"{what}: archive content exceeds the limit of {max_bytes / 2**30:.1f} GiB"
        )
