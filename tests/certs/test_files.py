"""lbproxy.certs.files: `safe_path` keeps every path built from input inside its root (a table
of hostile parts, symlink escapes), and `remove_debris` drops exactly what interrupted atomic
writes leave, never following a link."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lbproxy.certs.errors import CertInputError, InputProblem
from lbproxy.certs.files import TMP_PREFIX, UnsafePathError, remove_debris, safe_path

HOSTILE: list[tuple[str, tuple[str, ...]]] = [
    ("parent", ("..",)),
    ("parent then name", ("..", "x")),
    ("dot", (".",)),
    ("empty", ("",)),
    ("no part", ()),
    ("traversal in one part", ("../x",)),
    ("deep traversal", ("../../../etc/passwd",)),
    ("absolute", ("/etc/passwd",)),
    ("absolute second part", ("certs", "/etc/passwd")),
    ("separator", ("a/b",)),
    ("trailing separator", ("a/",)),
    ("backslash", ("..\\x",)),
    ("NUL", ("a\0b",)),
    ("NUL at the end", ("a.json\0",)),
    ("parent after a name", ("certs", "..")),
]


@pytest.mark.parametrize(("what", "parts"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_parts_are_refused(tmp_path: Path, what: str, parts: tuple[str, ...]) -> None:
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(UnsafePathError) as e:
        safe_path(root, *parts)
    assert isinstance(e.value, CertInputError) and e.value.reason is InputProblem.UNSAFE_PATH
    assert e.value.status == 400 and str(root) in str(e.value)


def test_plain_names_are_joined_unresolved(tmp_path: Path) -> None:
    real = tmp_path / "real"
    (real / "certs").mkdir(parents=True)
    link = tmp_path / "state"
    link.symlink_to(real)  # the root itself may be a link (a state dir moved elsewhere)
    for parts in (("a",), ("certs", "x.json"), (".tmp-a.1234",), ("a..b",), ("new", "deep")):
        assert safe_path(link, *parts) == link.joinpath(*parts)


def test_symlink_escapes_are_refused(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "certs").symlink_to(outside)                 # a directory link out of the root
    (root / "file.json").symlink_to(outside / "victim")  # a file link out of the root
    (root / "loop").symlink_to(root / "loop")
    (root / "inside").symlink_to(root / "real")          # a link that stays inside is fine
    for parts in (("certs", "x.json"), ("file.json",), ("loop",)):
        with pytest.raises(UnsafePathError):
            safe_path(root, *parts)
    assert safe_path(root, "inside", "x") == root / "inside" / "x"
    (root / "self").symlink_to(root)
    with pytest.raises(UnsafePathError, match="outside"):
        safe_path(root, "self")  # the root itself is not a file under it


def test_remove_debris_removes_only_temporaries_and_never_follows_links(tmp_path: Path) -> None:
    d, outside = tmp_path / "d", tmp_path / "outside"
    d.mkdir()
    outside.mkdir()
    (outside / "keep").write_text("precious")
    (d / f"{TMP_PREFIX}settings.json.0a1b2c3d").write_text("half")
    (d / f"{TMP_PREFIX}shop.77aa88bb").mkdir()
    (d / f"{TMP_PREFIX}shop.77aa88bb" / "meta.json").write_text("{}")
    (d / f"{TMP_PREFIX}link").symlink_to(outside)
    (d / ".trash-x.1").mkdir()
    for name in ("settings.json", "tmp-not-debris", ".tmpfoo", "x.tmp-1"):
        (d / name).write_text("kept")
    removed = remove_debris(d)
    assert sorted(p.name for p in removed) == sorted(
        [f"{TMP_PREFIX}settings.json.0a1b2c3d", f"{TMP_PREFIX}shop.77aa88bb", f"{TMP_PREFIX}link"])
    assert sorted(p.name for p in d.iterdir()) == sorted(
        [".trash-x.1", "settings.json", "tmp-not-debris", ".tmpfoo", "x.tmp-1"])
    assert (outside / "keep").read_text() == "precious"
    assert [p.name for p in remove_debris(d, (".trash-",))] == [".trash-x.1"]
    assert remove_debris(tmp_path / "missing") == []


def test_a_write_killed_before_its_rename_leaves_what_remove_debris_removes(
        tmp_path: Path) -> None:
    """A real crash (os._exit where the rename would be): the temporary name write_atomic
    leaves is the one remove_debris looks for, and the committed file is untouched."""
    target = tmp_path / "settings.json"
    target.write_text("committed")
    code = textwrap.dedent(f"""
        import os, sys
        from pathlib import Path
        from lbproxy.certs import files
        files.os.replace = lambda *a: os._exit(9)
        files.write_atomic(Path({str(target)!r}), b"new")
    """)
    r = subprocess.run([sys.executable, "-c", code], timeout=60, check=False,
                       cwd=Path(__file__).resolve().parents[2], capture_output=True)
    assert r.returncode == 9, r.stderr
    debris = [p for p in tmp_path.iterdir() if p != target]
    assert len(debris) == 1 and debris[0].read_bytes() == b"new"
    assert remove_debris(tmp_path) == debris
    assert os.listdir(tmp_path) == ["settings.json"] and target.read_text() == "committed"
