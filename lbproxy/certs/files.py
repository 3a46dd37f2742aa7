"""Files in the state directory: atomic writes, private directories, the debris an interrupted
atomic write leaves behind, and `safe_path`, the one check that keeps a path built from user
input (a certificate id, a backup's entry) inside its storage root."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import secrets
import shutil
import stat
from collections.abc import Iterable
from pathlib import Path

from .errors import CertInputError, InputProblem

logger = logging.getLogger(__name__)

# Every atomic write goes through a file (or directory) whose name starts with this; after a
# crash such a name is debris: it was never committed (the rename is the commit).
TMP_PREFIX = ".tmp-"


class UnsafePathError(CertInputError):
    """A path built from user input would leave its storage root (or is not a plain name)."""

    def __init__(self, message: str) -> None:
        super().__init__(InputProblem.UNSAFE_PATH, message)


def safe_path(root: Path, *parts: str) -> Path:
    """`root / part / ...`, refused (UnsafePathError) unless it stays inside `root`.

    Each part must be one plain file name: not empty, not "." or "..", without "/", "\\" or NUL
    (so not absolute either). If any part is a symbolic link, the joined path is then resolved
    and must lie strictly below the resolved root: a symlink inside the root that points out of it
    is refused too. The path returned is the unresolved join (the root may itself be a link).
    """
    if not parts:
        raise UnsafePathError(f"no file name under {root}")
    for part in parts:
        if not isinstance(part, str):
            raise UnsafePathError(f"file name {part!r} under {root} is not text")
        if part in ("", ".", "..") or any(c in part for c in ("/", "\\", "\0")):
            raise UnsafePathError(f"{part!r} is not a plain file name (under {root})")
    path = root.joinpath(*parts)
    if not _any_link(root, parts):
        return path   # plain names, no link among them: below the root by construction
    real_root = _resolved_root(root)
    try:
        real = path.resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop: RuntimeError before 3.13
        raise UnsafePathError(f"{path} cannot be resolved: {exc}") from None
    if real == real_root or not real.is_relative_to(real_root):
        raise UnsafePathError(f"{path} resolves to {real}, outside {real_root}")
    return path


def _any_link(root: Path, parts: tuple[str, ...]) -> bool:
    """Whether a prefix of `parts` under `root` is a symbolic link (a missing one is not: nothing
    below it exists either). One lstat per part instead of one per component of the whole path
    (what resolve() costs: it is called at every store of a certificate)."""
    where = os.fspath(root)
    for part in parts:
        where = os.path.join(where, part)
        try:
            if stat.S_ISLNK(os.lstat(where).st_mode):
                return True
        except FileNotFoundError:
            return False
        except OSError:
            return True   # cannot tell: take the full check, which reports it
    return False


@functools.lru_cache(maxsize=64)
def _resolved_root(root: Path) -> Path:
    """A storage root, resolved once per process (it is resolved at every store of a
    certificate otherwise). If the root is re-pointed later, a path through a link under it is
    checked against the old target and refused: stale means safe, never wider."""
    return root.resolve()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o600, *, sync_dir: bool = True) -> None:
    """Temp file in the same directory (created with `mode`), fsync, rename, fsync directory
    (`sync_dir=False` leaves that to the caller's next write_atomic or fsync_dir of it)."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if sync_dir:
        fsync_dir(path.parent)


def mkdir_private(path: Path) -> None:
    """Create a directory (and parents) with mode exactly 0700."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)  # mkdir's mode is masked by the umask; make it exact


def remove_debris(directory: Path, prefixes: Iterable[str] = (TMP_PREFIX,)) -> list[Path]:
    """Remove what interrupted atomic writes left in `directory` (names starting with one of
    `prefixes`; not recursive); returns what was removed. Call it at start, before anything
    writes there: a temporary name of a write in progress would be removed too.

    A symlink is removed itself, never followed; what cannot be removed is logged and left.
    """
    starts = tuple(prefixes)
    try:
        entries = sorted(directory.iterdir())
    except FileNotFoundError:
        return []
    removed = []
    for entry in entries:
        if not entry.name.startswith(starts):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError as exc:
            logger.error("cannot remove %s, left by an interrupted write: %s", entry,
                         exc.strerror or exc)
            continue
        removed.append(entry)
        logger.info("removed %s, left by an interrupted write", entry)
    return removed


__all__ = ["TMP_PREFIX", "UnsafePathError", "fsync_dir", "mkdir_private", "remove_debris",
           "safe_path", "write_atomic"]
