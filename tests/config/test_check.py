"""`lbproxy check` and the loader: good files pass, bad ones list every problem with its place."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lbproxy.config import load_file, parse_config
from lbproxy.config.model import MatchOn, MatchType, Protocol, Scheduler, rule_order
from lbproxy.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]

THREE_MISTAKES = """
[[rule]]
name = "api"
match = "prefix"
pattern = "/api/"

[[vs]]
name = "web"
listen = "127.0.0.1:70000"          # mistake 1: port out of range
scheduler = "fastest"               # mistake 2: unknown scheduler

  [[vs.subvs]]
  name = "a"
  rules = ["api", "nope"]           # mistake 3: unknown rule
"""


def run_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lbproxy", "check", "-c", str(path)],
                          capture_output=True, text=True, timeout=60, check=False)


def test_check_accepts_quickstart() -> None:
    out = run_check(ROOT / "conf" / "quickstart.toml")
    assert out.returncode == 0, out.stderr
    assert "OK" in out.stdout


def test_check_names_all_three_mistakes(tmp_path: Path) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(THREE_MISTAKES)
    out = run_check(f)
    assert out.returncode == 1
    assert "3 problem(s)" in out.stderr
    # file:line, then the table path with the VS/SubVS names
    assert f"{f}:9: vs \"web\" (vs[0]).listen: port '70000'" in out.stderr
    assert f"{f}:10: vs \"web\" (vs[0]).scheduler: unknown value 'fastest'" in out.stderr
    assert (f"{f}:14: vs \"web\" (vs[0]).subvs \"a\" (subvs[0]).rules[1]: unknown content "
            "rule 'nope'") in out.stderr


def test_toml_syntax_error_has_line(tmp_path: Path) -> None:
    f = tmp_path / "syntax.toml"
    f.write_text('[[vs]]\nname = "a"\nlisten = \n')
    out = run_check(f)
    assert out.returncode == 1
    assert "line 3" in out.stderr


@pytest.mark.parametrize(("text", "where", "fragment"), [
    ('[[rule]]\nname="r"\nmatch="regex"\npattern="(["', "rule[0].pattern", "regular expression"),
    ('[[rule]]\nname="r"\npattern="' + "a" * 251 + '"', "rule[0].pattern", "limit is 250"),
    ('[[rule]]\nname="r"\npattern="/x"\non="header"', "rule[0].header", "required"),
    ('[[rule]]\nname="r"\npattern="/x"\nset_flag=10', "rule[0].set_flag", "between 0 and 9"),
    ('[[rule]]\nname="default"\npattern="/x"', "rule[0].name", "built-in"),
    ('colour = "blue"', "colour", "unknown key"),
    ('[[vs]]\nname="a"\nlisten="127.0.0.1:1"\nprotocol="https"', "vs[0]", "certificate"),
    ('[[vs]]\nname="a"\nlisten="127.0.0.1:1"\nreal_servers=[{address="1.2.3.4"}]',
     "vs[0].real_servers[0].address", "no port"),
    ('[[vs]]\nname="a"\nlisten="127.0.0.1:1"\n[[vs]]\nname="a"\nlisten="127.0.0.1:1"',
     "vs[1].name", "already defined"),
    ('[[vs]]\nname="a"\nlisten="127.0.0.1:1"\nkind="redirect"\nredirect_to="https://{x}"',
     "vs[0].redirect_to", "placeholder"),
    ('[[vs]]\nname="a"\nlisten="127.0.0.1:1"\nnot_available={status=99}',
     "vs[0].not_available.status", "between 200 and 599"),
])
def test_each_mistake_is_located(text: str, where: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_config(text)
    hits = [p for p in ei.value.problems if p.where == where and fragment in p.message]
    assert hits, [str(p) for p in ei.value.problems]


def test_rules_over_the_limit_are_refused() -> None:
    text = "".join(f'[[rule]]\nname="r{i}"\npattern="/{i}"\n' for i in range(1025))
    with pytest.raises(ConfigError, match="limit is 1024"):
        parse_config(text)


def test_quickstart_model() -> None:
    cfg = load_file(ROOT / "conf" / "quickstart.toml")
    web = cfg.vs_by_name("web")
    assert web is not None and web.protocol is Protocol.HTTP and web.content_switching
    assert [s.name for s in web.subvs] == ["api", "static", "sorry", "web"]
    assert web.subvs[3].scheduler is Scheduler.LEAST_CONNECTIONS
    assert web.subvs[2].not_available.status == 200
    assert rule_order(web)[-1] == ("default", "web")
    images = cfg.rule_by_name("images")
    assert images is not None and images.match_type is MatchType.REGEX
    assert images.on is MatchOn.URL and images.ignore_case


def test_explicit_precedence_orders_rules() -> None:
    cfg = parse_config("""
[[rule]]
name = "a"
pattern = "/a"
[[rule]]
name = "b"
pattern = "/b"
[[vs]]
name = "v"
listen = "127.0.0.1:1"
precedence = ["b", "default", "a"]
[[vs.subvs]]
name = "s1"
rules = ["a", "default"]
[[vs.subvs]]
name = "s2"
rules = ["b"]
""")
    vs = cfg.virtual_services[0]
    assert rule_order(vs) == (("b", "s2"), ("default", "s1"), ("a", "s1"))


def test_not_available_body_file(tmp_path: Path) -> None:
    (tmp_path / "sorry.html").write_bytes(b"<h1>sorry</h1>")
    (tmp_path / "c.toml").write_text(
        '[[vs]]\nname="a"\nlisten="127.0.0.1:1"\n'
        'not_available={status=503, body_file="sorry.html", content_type="text/html"}\n')
    vs = load_file(tmp_path / "c.toml").virtual_services[0]
    assert vs.not_available.body == b"<h1>sorry</h1>"
    assert vs.not_available.content_type == "text/html"
