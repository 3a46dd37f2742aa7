"""Writing the config file back: edits keep every byte outside the edited table, the result passes
the loader before it is written, a file that cannot be written is refused with the TOML to add."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from lbproxy.config import load_file, parse_config
from lbproxy.config.writer import (
    ConfigWriteError,
    convert_vs_edit,
    prepare,
    remove_certificate_edit,
    write_atomic,
)

BEFORE_VS = """# lbproxy for the shop   (operator's notes)
state_dir = "state"   # beside this file
drain_timeout = 5

[admin]
enabled = false   # no API here

# the old application: real servers on the parent
"""
LEGACY = """[[vs]]
name = "legacy"   # keep this name
listen = "127.0.0.1:18080"
scheduler = "lc"
  # primary first
  [[vs.real_servers]]
  address = "127.0.0.1:19001"   # the big one
  weight = 3

  [[vs.real_servers]]
  address = "127.0.0.1:19002"
"""
AFTER_VS = """
# the new one, content switched
[[vs]]
name = "web"
listen = "127.0.0.1:18081"
real_servers = [ { address = "127.0.0.1:19003" } ]   # inline, on purpose

# certificates, one per table
[[certificate]]
id = "a"
common_name = "a.test"
vs = "web"   # challenge VS

# the second certificate
[[certificate]]
id = "b"
common_name = "b.test"
vs = "web"

# the end
"""
TEXT = BEFORE_VS + LEGACY + AFTER_VS


def write(tmp_path: Path, text: str = TEXT) -> Path:
    p = tmp_path / "lbproxy.toml"
    p.write_text(text)
    return p


def test_convert_keeps_the_rest_of_the_file_byte_for_byte(tmp_path: Path) -> None:
    path = write(tmp_path)
    running = load_file(path)
    pending = prepare(path, convert_vs_edit("legacy", "legacy-rs"), running=running,
                      what="test", snippet="")
    new = pending.new_text
    assert new.startswith(BEFORE_VS) and new.endswith(AFTER_VS)
    edited = new[len(BEFORE_VS):len(new) - len(AFTER_VS)]
    # The VS's own lines, comments included, are all still there, in their order.
    kept = [line for line in LEGACY.splitlines() if line and "real_servers" not in line]
    lines = edited.splitlines()
    assert [line for line in lines if line in kept] == kept
    assert '[[vs.subvs]]' in edited and 'name = "legacy-rs"' in edited
    cfg = parse_config(new, base=tmp_path)
    legacy = cfg.vs_by_name("legacy")
    assert legacy is not None and legacy.real_servers == ()
    (sub,) = legacy.subvs
    assert sub.rules == ("default",) and sub.scheduler.value == "lc"
    assert [(str(r.address), r.weight) for r in sub.real_servers] == [
        ("127.0.0.1:19001", 3), ("127.0.0.1:19002", 1)]
    assert pending.config == cfg


def test_convert_of_inline_real_servers_stays_inline_with_its_comment(tmp_path: Path) -> None:
    path = write(tmp_path)
    pending = prepare(path, convert_vs_edit("web", "web-rs"), running=load_file(path),
                      what="test", snippet="")
    (line,) = [x for x in pending.new_text.splitlines() if x.startswith("subvs = ")]
    assert line.endswith("   # inline, on purpose")
    assert pending.new_text.replace(line + "\n", "") == TEXT.replace(
        '[ { address = "127.0.0.1:19003" } ]   # inline, on purpose\n', "").replace(
        "real_servers = ", "")


@pytest.mark.parametrize(("cid", "gone", "kept"), [
    ("a", "# certificates, one per table\n", "# the second certificate\n"),
    ("b", "# the second certificate\n", "# the end\n"),
])
def test_removing_a_certificate_takes_its_comment_and_leaves_the_next_ones(
        tmp_path: Path, cid: str, gone: str, kept: str) -> None:
    path = write(tmp_path)
    pending = prepare(path, remove_certificate_edit(cid), running=load_file(path),
                      what="test", snippet="")
    new = pending.new_text
    assert f'id = "{cid}"' not in new and gone not in new and kept in new
    assert [c.id for c in pending.config.certificates] == ["b" if cid == "a" else "a"]
    head = TEXT[:TEXT.index("# certificates")]
    assert new.startswith(head)


def test_a_read_only_file_is_refused_with_the_toml_to_add(tmp_path: Path) -> None:
    path = write(tmp_path)
    path.chmod(0o444)
    with pytest.raises(ConfigWriteError) as err:
        prepare(path, convert_vs_edit("legacy", "legacy-rs"), running=load_file(path),
                what="`vs convert legacy`", snippet="[[vs.subvs]]\nname = \"legacy-rs\"\n")
    msg = str(err.value)
    assert "read-only (mode 0444)" in msg and str(path) in msg
    assert "nothing was changed" in msg and '[[vs.subvs]]\nname = "legacy-rs"' in msg
    assert err.value.status == 409
    assert path.read_text() == TEXT


def test_no_path_and_a_file_out_of_step_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path)
    with pytest.raises(ConfigWriteError, match="not given the config file's path"):
        prepare(None, convert_vs_edit("legacy", "x"), running=load_file(path), what="t",
                snippet="S")
    running = load_file(path)
    path.write_text(TEXT.replace("drain_timeout = 5", "drain_timeout = 6"))
    with pytest.raises(ConfigWriteError, match="differs from the running configuration"):
        prepare(path, convert_vs_edit("legacy", "x"), running=running, what="t", snippet="S")


def test_an_edit_the_loader_refuses_is_never_written(tmp_path: Path) -> None:
    path = write(tmp_path)
    # "web-rs" would be fine; a SubVS name the loader refuses is not written.
    with pytest.raises(ConfigWriteError, match="would not load") as err:
        prepare(path, convert_vs_edit("web", "bad name!"), running=load_file(path),
                what="test", snippet="HAND")
    assert "HAND" in str(err.value)
    assert path.read_text() == TEXT


def test_atomic_write_keeps_mode_and_line_endings_and_refuses_a_moved_file(
        tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_bytes(b"a = 1\r\n")
    path.chmod(0o640)
    write_atomic(path, "a = 2\r\n", expect="a = 1\r\n")
    assert path.read_bytes() == b"a = 2\r\n"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    with pytest.raises(ConfigWriteError, match="changed on disk"):
        write_atomic(path, "a = 3\r\n", expect="a = 1\r\n")
    assert path.read_bytes() == b"a = 2\r\n"
    assert [p.name for p in tmp_path.iterdir()] == ["c.toml"]  # no temp file left
