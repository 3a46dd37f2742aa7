"""Writing the config file back: an edit of the operator's TOML made with tomlkit (comments, order
and formatting kept outside the edited tables), validated by the normal loader before anything is
written, written atomically (temp file, fsync, rename, the file's mode kept), then applied through
the caller's reload path; or a refusal that names what to put in the file by hand.

The edits (`convert_vs_edit`, `remove_certificate_edit`, `replace_vs_config_edit`) are pure
functions of a tomlkit document; `ConfigFile` does the I/O, one edit at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomlkit
from tomlkit.container import Container
from tomlkit.exceptions import TOMLKitError
from tomlkit.items import AoT, Array, Comment, InlineTable, Item, Table, Whitespace
from tomlkit.toml_document import TOMLDocument

from ..errors import AdminError, ConfigError
from .loader import parse_config
from .model import DEFAULT_RULE, Config

Edit = Callable[[TOMLDocument], None]
# Re-reads the config file and makes it the running config; raises what refused it.
Apply = Callable[[], Awaitable[object]]
# The tables `restore --vs` takes from a backup: the VSs, the rules they use and the certificates
# declared on them (what BackupContents.vs_config is for); the rest of the file stays this host's.
VS_CONFIG_KEYS = ("rule", "vs", "certificate")


class ConfigWriteError(AdminError):
    """The config file cannot be edited as asked; nothing was changed (status: HTTP hint)."""

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message, status)


@dataclass(frozen=True, slots=True)
class PendingEdit:
    """An edit checked whole and not yet written: the file's text before and after."""

    path: Path    # the file as configured (the loader's base for relative paths)
    target: Path  # the file written: `path` with symlinks resolved
    old_text: str
    new_text: str
    config: Config


# -- the edits ------------------------------------------------------------------------------------

def _tables(doc: TOMLDocument, key: str) -> list[Any]:
    found = doc.get(key)
    if found is None:
        return []
    if not isinstance(found, (AoT, Array)):
        raise ConfigWriteError(f"`{key}` in the config file is not an array of tables")
    return list(found)


def _find(doc: TOMLDocument, key: str, field: str, value: str) -> tuple[int, Any]:
    for i, t in enumerate(_tables(doc, key)):
        if isinstance(t, (Table, InlineTable)) and t.get(field) == value:
            return i, t
    raise ConfigWriteError(f"the config file has no [[{key}]] with {field} = {value!r}")


def _rename_in_place(table: Table | InlineTable, old: str, new: str, value: Item) -> None:
    # tomlkit has no public "replace this key by another at the same place"; Container._replace
    # (tomlkit 0.13 to 0.15) keeps the position, so the VS's later keys and sub-tables stay put.
    table.value._replace(old, new, value)


def convert_vs_edit(vs_name: str, sub_name: str) -> Edit:
    """`vs convert`: the VS's real_servers become those of a SubVS `sub_name` with the rule
    `default`, written where real_servers stood, in the same style ([[...]] or inline). The
    SubVS inherits the VS's scheduler, health check and not-available answer, as at run time."""
    def edit(doc: TOMLDocument) -> None:
        _, vs = _find(doc, "vs", "name", vs_name)
        servers = vs.get("real_servers")
        if not servers:
            raise ConfigWriteError(f"[[vs]] name = {vs_name!r} has no real_servers in the "
                                   "config file; nothing to convert")
        if "subvs" in vs:
            raise ConfigWriteError(f"[[vs]] name = {vs_name!r} already has SubVSs in the "
                                   "config file")
        new: Item
        if isinstance(servers, AoT):
            sub = tomlkit.table()
            sub.add("name", sub_name)
            sub.add("rules", [DEFAULT_RULE])
            sub.add("real_servers", servers)
            new = tomlkit.aot()
            new.append(sub)
        else:
            comment_ws, comment = servers.trivia.comment_ws, servers.trivia.comment
            inline = tomlkit.inline_table()
            inline.append("name", sub_name)
            inline.append("rules", [DEFAULT_RULE])
            inline.append("real_servers", servers)
            new = tomlkit.array()
            new.append(inline)
            new.trivia.comment_ws, new.trivia.comment = comment_ws, comment
        _rename_in_place(vs, "real_servers", "subvs", new)
        if "content_switching" in vs:
            vs["content_switching"] = True
    return edit


def _holder(item: Any) -> Container | None:
    """The container at whose end `item`'s text ends: the comments and blank lines found
    there precede whatever follows `item` in the file (tomlkit keeps them with `item`)."""
    while True:
        if isinstance(item, AoT):
            if not item.body:
                return None
            item = item.body[-1]
        elif isinstance(item, Table):
            body = item.value.body
            if body and isinstance(body[-1][1], (Table, AoT)):
                item = body[-1][1]
            else:
                return item.value
        else:
            return None


def _trailing(c: Container) -> int:
    """Where the run of comments and blank lines closing `c` starts."""
    i = len(c.body)
    while i > 0 and c.body[i - 1][0] is None and isinstance(c.body[i - 1][1],
                                                              (Comment, Whitespace)):
        i -= 1
    return i


def _hand_over(before: Container | None, removed: Any) -> None:
    """`removed` leaves the file: the comment lines right above its header (kept at the end of
    `before`) go with it, and the comments it held above the next table stay in the file."""
    if before is None:
        return
    tail = _holder(removed)
    carried = tail.body[_trailing(tail):] if tail is not None else []
    start = _trailing(before)
    end = len(before.body)
    while end > start and isinstance(before.body[end - 1][1], Comment):
        end -= 1   # the comment block touching the removed header
    while end > start and carried and isinstance(before.body[end - 1][1], Whitespace) \
            and isinstance(carried[0][1], Whitespace):
        end -= 1   # one blank line between, not two
    del before.body[end:]
    before.body.extend(carried)


def remove_certificate_edit(cert_id: str) -> Edit:
    """`le delete`: the [[certificate]] table with this id leaves the file."""
    def edit(doc: TOMLDocument) -> None:
        i, _ = _find(doc, "certificate", "id", cert_id)
        certs = doc["certificate"]
        if isinstance(certs, AoT):
            if i > 0:
                _hand_over(_holder(certs.body[i - 1]), certs.body[i])
            else:
                _hand_over(_before(doc, "certificate"), certs.body[i])
        del certs[i]
        if not certs:
            del doc["certificate"]
    return edit


def _before(doc: TOMLDocument, key: str) -> Container | None:
    """The container ending right above `key`'s first table (None: top-level values)."""
    body = doc.body
    for j, (k, _) in enumerate(body):
        if k is not None and k.key == key:
            return _holder(body[j - 1][1]) if j > 0 else None
    return None


def replace_vs_config_edit(backup_text: str) -> Edit:
    """`restore --vs`: the file's [[rule]], [[vs]] and [[certificate]] tables become the backup's
    (each where it stood; one the file lacks goes at the end); the rest of the file is kept."""
    def edit(doc: TOMLDocument) -> None:
        try:
            backup = tomlkit.parse(backup_text)
        except TOMLKitError as exc:
            raise ConfigWriteError(f"the backup's VS configuration is not TOML: {exc}") from None
        for key in VS_CONFIG_KEYS:
            old, new = doc.get(key), backup.get(key)
            if old is not None and new is not None:
                carried = _holder(old)
                into = _holder(new)
                if carried is not None and into is not None:
                    del into.body[_trailing(into):]
                    into.body.extend(carried.body[_trailing(carried):])
                doc[key] = new
            elif old is not None:
                del doc[key]
            elif new is not None:
                doc.add(key, new)
    return edit


def vs_config_text(backup_text: str) -> str:
    """The backup's [[rule]], [[vs]] and [[certificate]] tables alone, as TOML text."""
    doc = tomlkit.parse(backup_text)
    out = tomlkit.document()
    for key in VS_CONFIG_KEYS:
        if key in doc:
            out.add(key, doc[key])
    return out.as_string()


# -- the file -------------------------------------------------------------------------------------

def _why_not_writable(path: Path | None) -> str | None:
    if path is None:
        return "the process was not given the config file's path"
    try:
        target = path.resolve(strict=True)
        st = target.stat()
    except OSError as exc:
        return f"{path} cannot be read: {exc.strerror}"
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file"
    if not stat.S_IMODE(st.st_mode) & 0o222:
        # Nobody may write it: the operator's wish, even for root (whom access() lets write).
        return f"{target} is read-only (mode {stat.S_IMODE(st.st_mode):04o})"
    if not os.access(target, os.W_OK):
        return f"{target} is not writable by this process"
    if not os.access(target.parent, os.W_OK | os.X_OK):
        return (f"its directory {target.parent} is not writable (the new file is written "
                "beside it, then renamed over it)")
    return None


def _read(path: Path) -> str:
    # Bytes decoded as they are: line endings stay as the operator wrote them.
    return path.read_bytes().decode("utf-8")


def write_atomic(target: Path, text: str, *, expect: str) -> None:
    """Replace `target` by `text` (temp file, fsync, rename, directory fsync), keeping its mode
    and, where allowed, its owner; refused if the file no longer holds `expect`."""
    st = target.stat()
    if _read(target) != expect:
        raise ConfigWriteError(f"{target} changed on disk while the edit was prepared; nothing "
                               "was written; run the command again")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode("utf-8"))
            f.flush()
            os.fchmod(f.fileno(), stat.S_IMODE(st.st_mode))
            with contextlib.suppress(PermissionError):
                os.fchown(f.fileno(), st.st_uid, st.st_gid)
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _problems(exc: ConfigError) -> str:
    return "; ".join(str(p) for p in exc.problems)


def prepare(path: Path | None, edit: Edit, *, running: Config, what: str,
            snippet: str) -> PendingEdit:
    """Check an edit whole without writing: the file is writable, it holds the running config,
    the edited text passes the loader (and has a VS: a reload refuses a file without one).
    ConfigWriteError otherwise, saying what to put in the file by hand."""
    reason = _why_not_writable(path)
    if path is None or reason is not None:
        raise ConfigWriteError(
            f"{what} is kept in the config file, and {reason}; nothing was changed. Make the "
            f"file writable and run it again, or edit the file yourself:\n\n{snippet}")
    target = path.resolve()
    base = path.parent.resolve()
    old_text = _read(target)
    try:
        on_disk = parse_config(old_text, base=base, source=str(path))
    except ConfigError as exc:
        raise ConfigWriteError(f"{path} does not load now ({_problems(exc)}); nothing was "
                               f"changed; fix the file, then run {what} again") from None
    if on_disk != running:
        raise ConfigWriteError(
            f"{path} differs from the running configuration (edited and not reloaded yet, or "
            f"its last reload failed: see the log); nothing was changed; reload it (SIGHUP), "
            f"then run {what} again")
    doc = tomlkit.parse(old_text)
    edit(doc)
    new_text = doc.as_string()
    try:
        config = parse_config(new_text, base=base, source=str(path))
    except ConfigError as exc:
        raise ConfigWriteError(f"{what}: the edited {path} would not load ({_problems(exc)}); "
                               f"nothing was changed; edit the file yourself:\n\n{snippet}"
                               ) from None
    if not config.virtual_services:
        raise ConfigWriteError(f"{what}: the edited {path} would define no virtual service, "
                               "which a reload refuses; nothing was changed")
    return PendingEdit(path, target, old_text, new_text, config)


class ConfigFile:
    """The config file as the running process edits it: one edit at a time, each written
    atomically and applied through `apply` (the reload path); an edit the running process
    refuses is taken back out of the file."""

    def __init__(self, path: Path | None, apply: Apply) -> None:
        self.path = path
        self.apply = apply
        self._lock = asyncio.Lock()

    async def prepare(self, edit: Edit, *, running: Config, what: str,
                      snippet: str) -> PendingEdit:
        return await asyncio.to_thread(prepare, self.path, edit, running=running, what=what,
                                       snippet=snippet)

    async def commit(self, pending: PendingEdit) -> None:
        async with self._lock:
            await asyncio.to_thread(write_atomic, pending.target, pending.new_text,
                                    expect=pending.old_text)
            try:
                await self.apply()
            except Exception as exc:
                await asyncio.to_thread(write_atomic, pending.target, pending.old_text,
                                        expect=pending.new_text)
                raise ConfigWriteError(
                    f"the edited {pending.path} was refused by the running process ({exc}); "
                    "the file was put back as it was and the running configuration is "
                    "unchanged") from exc

    async def edit(self, edit: Edit, *, running: Config, what: str, snippet: str) -> Config:
        """prepare + commit; the config now running (read from the file written)."""
        pending = await self.prepare(edit, running=running, what=what, snippet=snippet)
        await self.commit(pending)
        return pending.config
