"""What `lbproxy check` says about a bad file (issue 18, point 6): the line of each problem, the
VS/SubVS/rule by name, a suggestion for a misspelt key, value or reference, a unit hint for
"3s", and warnings for SubVSs no request can reach."""

from __future__ import annotations

import pickle
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbproxy.config import load_file, parse_config
from lbproxy.config.loader import config_warnings
from lbproxy.config.locate import label_of, line_map, line_of, locate
from lbproxy.errors import ConfigError, ConfigProblem

ROOT = Path(__file__).resolve().parents[2]


def problems(text: str) -> list[ConfigProblem]:
    with pytest.raises(ConfigError) as ei:
        parse_config(text)
    return list(ei.value.problems)


def one(text: str, where: str) -> ConfigProblem:
    hits = [p for p in problems(text) if p.where == where]
    assert len(hits) == 1, [str(p) for p in problems(text)]
    return hits[0]


def run_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lbproxy", "check", "-c", str(path)],
                          capture_output=True, text=True, timeout=60, check=False)


TYPO_FILE = """\
# line 1
[[rule]]
name = "images"
pattern = "/img/"

[[vs]]
name = "web"
listn = "127.0.0.1:8080"

  [[vs.subvs]]
  name = "static"
  rules = ["imgaes"]
"""


def test_check_prints_file_line_name_and_suggestion(tmp_path: Path) -> None:
    f = tmp_path / "lbproxy.toml"
    f.write_text(TYPO_FILE)
    out = run_check(f)
    text = out.stdout + out.stderr
    assert out.returncode == 1, text
    assert f"{f}:8: vs \"web\" (vs[0]).listn: unknown key; did you mean 'listen'?" in text
    assert f"{f}:6: vs \"web\" (vs[0]).listen: is required" in text  # its [[vs]] header
    assert (f"{f}:12: vs \"web\" (vs[0]).subvs \"static\" (subvs[0]).rules[0]: unknown content "
            "rule 'imgaes'; did you mean 'images'?") in text
    assert "Traceback" not in text


def test_a_problem_keeps_its_path_and_gains_line_source_and_label(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text(TYPO_FILE)
    with pytest.raises(ConfigError) as ei:
        load_file(f)
    p = next(p for p in ei.value.problems if p.where == "vs[0].subvs[0].rules[0]")
    assert (p.line, p.source) == (12, str(f))
    assert p.label == 'vs "web" (vs[0]).subvs "static" (subvs[0]).rules[0]'
    # the reload path sends problems from a child process pickled: nothing is lost
    assert pickle.loads(pickle.dumps(p)) == p
    # file order
    lines = [q.line for q in ei.value.problems]
    assert lines == sorted(lines)


def test_without_a_file_the_line_is_still_given() -> None:
    p = one('[[vs]]\nname = "a"\nlisten = "127.0.0.1:1"\nbogus = 1\n', "vs[0].bogus")
    assert p.line == 4 and p.source is None
    assert str(p) == 'line 4: vs "a" (vs[0]).bogus: unknown key (typo?)'


def test_a_toml_syntax_error_has_its_line_as_a_field() -> None:
    (p,) = problems('[[vs]]\nname = "a"\nlisten = \n')
    assert p.line == 3 and "TOML syntax" in p.message


def test_an_unnamed_or_misnamed_vs_is_named_by_index_only() -> None:
    p = one('[[vs]]\nlisten = "127.0.0.1:1"\n', "vs[0].name")
    assert p.label == "" and str(p) == "line 1: vs[0].name: is required"


@pytest.mark.parametrize(("text", "where", "message"), [
    # enum values, by value or by the member's name
    ('[[rule]]\nname = "r"\npattern = "/"\nmatch = "prefx"\n', "rule[0].match",
     "unknown value 'prefx'; did you mean 'prefix'?"),
    ('[[vs]]\nname = "a"\nlisten = "127.0.0.1:1"\nscheduler = "least_connection"\n',
     "vs[0].scheduler", "unknown value 'least_connection'; did you mean 'lc'?"),
    # a certificate's VS
    ('[[vs]]\nname = "web"\nlisten = "127.0.0.1:1"\n[[certificate]]\nid = "c"\n'
     'common_name = "a.example"\nvs = "wbe"\n', "certificate[0].vs",
     "unknown virtual service 'wbe'; did you mean 'web'?"),
    # a precedence entry
    ('[[rule]]\nname = "api"\npattern = "/a"\n[[vs]]\nname = "a"\nlisten = "127.0.0.1:1"\n'
     'precedence = ["apu"]\n[[vs.subvs]]\nname = "s"\nrules = ["api"]\n', "vs[0].precedence[0]",
     "rule 'apu' is not assigned to any SubVS of this VS; did you mean 'api'?"),
    # a key of the table
    ('[admin]\nlisen = "127.0.0.1:1"\n', "admin.lisen", "unknown key; did you mean 'listen'?"),
])
def test_did_you_mean(text: str, where: str, message: str) -> None:
    assert one(text, where).message.startswith(message)


def test_a_key_after_a_subtable_header_is_explained() -> None:
    # TOML's trap: `real_servers` below [vs.tls] belongs to the tls table
    p = one('[[vs]]\nname = "web"\nlisten = "127.0.0.1:1"\n[vs.tls]\ncertificates = []\n'
            'real_servers = [{ address = "127.0.0.1:2" }]\n', "vs[0].tls.real_servers")
    assert p.line == 6
    assert p.message.startswith('unknown key here, but a key of vs "web" (vs[0]): a key after '
                                "a [vs.tls] header belongs to that table; move it above")


def test_no_suggestion_for_a_word_like_no_key() -> None:
    assert one('colour = "blue"\n', "colour").message == "unknown key (typo?)"


VS = '[[vs]]\nname = "a"\nlisten = "127.0.0.1:1"\n'


@pytest.mark.parametrize(("line", "where", "hint"), [
    ('timeouts = { head = "3s" }', "vs[0].timeouts.head",
     "durations are numbers of seconds: write head = 3"),
    ('timeouts = { idle = "500ms" }', "vs[0].timeouts.idle",
     "durations are numbers of seconds: write idle = 0.5"),
    ('timeouts = { body = "2m" }', "vs[0].timeouts.body",
     "durations are numbers of seconds: write body = 120"),
    ('timeouts = { connect = "10" }', "vs[0].timeouts.connect",
     "write it without quotes, connect = 10"),
    ('health_check = { interval = "1.5 s" }', "vs[0].health_check.interval",
     "write interval = 1.5"),
    ('limits = { max_body = "1m" }', "vs[0].limits.max_body",
     "sizes are numbers of bytes: write max_body = 1048576"),
    ('limits = { max_header_bytes = "64k" }', "vs[0].limits.max_header_bytes",
     "write max_header_bytes = 65536"),
])
def test_unit_hints(line: str, where: str, hint: str) -> None:
    p = one(VS + line + "\n", where)
    assert p.message.startswith("expected ") and p.message.endswith(hint), p.message
    assert p.line == 4


def test_no_unit_hint_where_a_unit_makes_no_sense() -> None:
    p = one(VS + 'real_servers = [{ address = "127.0.0.1:2", weight = "3s" }]\n',
            "vs[0].real_servers[0].weight")
    assert p.message == "expected an integer, got str"


ROUTING = """\
[[rule]]
name = "api"
pattern = "/api/"

[[rule]]
name = "late"
pattern = "/late/"

[[rule]]
name = "mark"
pattern = "/m"
set_flag = 1

[[rule]]
name = "spare"
pattern = "/spare"

[[vs]]
name = "web"
listen = "127.0.0.1:1"
precedence = ["api", "mark", "default", "late"]

  [[vs.subvs]]
  name = "api"
  rules = ["api"]

  [[vs.subvs]]
  name = "orphan"

  [[vs.subvs]]
  name = "marked"
  rules = ["mark"]

  [[vs.subvs]]
  name = "rest"
  rules = ["default"]

  [[vs.subvs]]
  name = "after"
  rules = ["late"]

[[vs]]
name = "ordered"
listen = "127.0.0.1:2"
content_switching = false

  [[vs.subvs]]
  name = "one"
  rules = ["api"]
"""


def test_warnings_for_what_no_request_reaches(tmp_path: Path) -> None:
    f = tmp_path / "lbproxy.toml"
    f.write_text(ROUTING)
    cfg = load_file(f)
    got = {(w.where, w.line): str(w) for w in config_warnings(cfg, f)}
    assert set(got) == {
        ("vs[0].subvs[1]", 27),
        ("vs[0].subvs[2]", 30),
        ("vs[0].subvs[4]", 38),
        ("vs[0].subvs[4].rules[0]", 40),
        ("vs[1].content_switching", 45),
        ("rule[3]", 14),
    }, got
    assert got[("vs[0].subvs[1]", 27)].startswith(
        f'{f}:27: vs "web" (vs[0]).subvs "orphan" (subvs[1]): has no rules')
    assert "never chosen: its rules only set flags" in got[("vs[0].subvs[2]", 30)]
    assert "all its rules come after 'default'" in got[("vs[0].subvs[4]", 38)]
    assert "rule 'late' comes after 'default'" in got[("vs[0].subvs[4].rules[0]", 40)]
    assert "rules of its SubVSs are not used" in got[("vs[1].content_switching", 45)]
    assert got[("rule[3]", 14)] == f'{f}:14: rule "spare" (rule[3]): is not used by any SubVS ' \
                                   "(no VS can match it)"
    # without the file: the same warnings, named, without lines
    assert {(w.where, w.line, w.label) for w in config_warnings(cfg)} >= {
        ("vs[0].subvs[1]", None, 'vs "web" (vs[0]).subvs "orphan" (subvs[1])')}


def test_check_prints_the_unreachable_subvs_warning(tmp_path: Path) -> None:
    f = tmp_path / "lbproxy.toml"
    f.write_text(ROUTING)
    out = run_check(f)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert 'vs "web" (vs[0]).subvs "orphan" (subvs[1]): has no rules' in text


def test_the_quickstart_has_no_warnings() -> None:
    path = ROOT / "conf" / "quickstart.toml"
    assert config_warnings(load_file(path), path) == []


TRICKY = """\
# [[vs]] in a comment is not a header
"quoted.key" = 1
a . b = { c = [1, 2], "d" = 'x' }
text = \"\"\"
[[vs]]
not a header\"\"\"\"
raw = '''
[rule]'''
[[vs]]
name = "one"   # [comment]
real_servers = [
  { address = "1.2.3.4:80" },

  { address = "1.2.3.5:80", weight = 2 },
]
  [[vs.subvs]]
  name = "s"
  rules = ["a",
           "b"]
  [vs.subvs.health_check]
  path = "/x"
[[vs]]
name = "two"
  [[vs.subvs]]
  name = "t"
"""


def test_line_map_of_tricky_toml() -> None:
    lines = line_map(TRICKY)
    expected = {
        "quoted.key": 2, "a": 3, "a.b": 3, "a.b.c": 3, "a.b.c[1]": 3, "a.b.d": 3, "text": 4,
        "raw": 7, "vs[0]": 9, "vs[0].name": 10, "vs[0].real_servers[0]": 12,
        "vs[0].real_servers[1].weight": 14, "vs[0].subvs[0]": 16, "vs[0].subvs[0].rules[1]": 19,
        "vs[0].subvs[0].health_check.path": 21, "vs[1]": 22, "vs[1].name": 23,
        "vs[1].subvs[0].name": 25,
    }
    assert {k: lines.get(k) for k in expected} == expected
    assert "vs[2]" not in lines and "rule" not in lines  # the strings held no headers
    # an unknown path falls back to its nearest table; a path not in the text has no line
    assert line_of("vs[0].subvs[0].health_check.rise", lines) == 20
    assert line_of("events.webhook_url", lines) is None


def test_label_of_walks_the_data() -> None:
    data = {"vs": [{"name": "a"}, {"name": "b", "subvs": [{"name": "s"}]}],
            "certificate": [{"id": "c1"}]}
    assert label_of("vs[1].subvs[0].name", data) == 'vs "b" (vs[1]).subvs "s" (subvs[0]).name'
    assert label_of("certificate[0].vs", data) == 'certificate "c1" (certificate[0]).vs'
    assert label_of("admin.listen", data) == ""
    assert label_of("vs[7].listen", data) == ""


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("[]{}=\"'.,#\n \tab1")), max_size=80))
def test_locating_never_raises(text: str) -> None:
    line_map(text)
    (p,) = locate([ConfigProblem("vs[0].a", "m")], text, source="x.toml")
    assert p.where == "vs[0].a" and p.source == "x.toml"


def _paths(data: object, prefix: str = "") -> list[str]:
    out: list[str] = []
    items = (data.items() if isinstance(data, dict)
             else [(f"[{i}]", v) for i, v in enumerate(data)] if isinstance(data, list) else [])
    for k, v in items:
        path = prefix + k if k.startswith("[") else (f"{prefix}.{k}" if prefix else k)
        out += [path, *_paths(v, path)]
    return out


@pytest.mark.parametrize("name", ["quickstart", "docs example", "tricky"])
def test_every_path_of_a_real_file_has_a_line(name: str) -> None:
    text = {"quickstart": lambda: (ROOT / "conf" / "quickstart.toml").read_text(),
            "docs example": lambda: re.findall(r"```toml\n(.*?)```",
                                               (ROOT / "docs" / "config.md").read_text(),
                                               re.S)[0],
            "tricky": lambda: TRICKY}[name]()
    lines = line_map(text)
    missing = [p for p in _paths(tomllib.loads(text)) if p not in lines]
    assert missing == []
