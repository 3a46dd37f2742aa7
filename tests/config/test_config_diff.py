"""What a reload changes (lbproxy.config.diff): VSs, rules and real servers added, removed or
changed, by name, from two parsed configs."""

from __future__ import annotations

from lbproxy.config import parse_config
from lbproxy.config.diff import config_diff, diff_is_empty, diff_summary, server_name

BASE = """
[[rule]]
name = "api"
match = "prefix"
pattern = "/api/"
[[rule]]
name = "img"
match = "prefix"
pattern = "/img/"
[[vs]]
name = "web"
listen = "127.0.0.1:8080"
real_servers = [ { address = "10.0.0.1:80" }, { address = "10.0.0.2:80" } ]
[[vs]]
name = "shop"
listen = "127.0.0.1:8081"
content_switching = true
  [[vs.subvs]]
  name = "api"
  rules = ["api"]
  real_servers = [ { address = "10.0.0.1:80" } ]
  [[vs.subvs]]
  name = "img"
  rules = ["img"]
  real_servers = [ { address = "10.0.0.3:80" } ]
[[vs]]
name = "old"
listen = "127.0.0.1:8082"
real_servers = [ { address = "10.0.0.9:80" } ]
"""


def test_same_config_is_an_empty_diff() -> None:
    d = config_diff(parse_config(BASE), parse_config(BASE))
    assert diff_is_empty(d)
    assert diff_summary(d) == []
    assert d == {part: {"added": [], "removed": [], "changed": []}
                 for part in ("virtual_services", "rules", "real_servers")}


def test_added_removed_and_changed_by_name() -> None:
    new = (BASE
           .replace('pattern = "/img/"', 'pattern = "/images/"')  # rule img changed
           .replace('{ address = "10.0.0.2:80" }', '{ address = "10.0.0.2:80", weight = 5 }')
           .replace('real_servers = [ { address = "10.0.0.3:80" } ]',
                    'real_servers = [ { address = "10.0.0.4:80" } ]')
           .replace('[[vs]]\nname = "old"\nlisten = "127.0.0.1:8082"\n'
                    'real_servers = [ { address = "10.0.0.9:80" } ]\n', "")
           + '[[vs]]\nname = "new"\nlisten = "127.0.0.1:8083"\n'
             'real_servers = [ { address = "10.0.0.1:80", enabled = false } ]\n'
             '[[rule]]\nname = "doc"\nmatch = "prefix"\npattern = "/doc/"\n')
    d = config_diff(parse_config(BASE), parse_config(new))
    assert d["virtual_services"] == {"added": ["new"], "removed": ["old"],
                                     "changed": ["web", "shop"]}
    assert d["rules"] == {"added": ["doc"], "removed": [], "changed": ["img"]}
    assert d["real_servers"] == {
        "added": ["shop/img 10.0.0.4:80", "new 10.0.0.1:80"],
        "removed": ["shop/img 10.0.0.3:80", "old 10.0.0.9:80"],
        "changed": ["web 10.0.0.2:80"]}
    assert diff_summary(d) == [
        "virtual services: added new; removed old; changed web, shop",
        "rules: added doc; changed img",
        "real servers: added shop/img 10.0.0.4:80, new 10.0.0.1:80; removed shop/img "
        "10.0.0.3:80, old 10.0.0.9:80; changed web 10.0.0.2:80"]


def test_a_server_disabled_in_the_file_is_changed() -> None:
    new = BASE.replace('{ address = "10.0.0.1:80" }, ', '{ address = "10.0.0.1:80", '
                                                        'enabled = false }, ')
    d = config_diff(parse_config(BASE), parse_config(new))
    assert d["real_servers"]["changed"] == ["web 10.0.0.1:80"]
    assert d["virtual_services"]["changed"] == ["web"]


def test_a_setting_outside_vss_rules_and_servers_is_no_named_change() -> None:
    d = config_diff(parse_config(BASE), parse_config("drain_timeout = 5\n" + BASE))
    assert diff_is_empty(d)


def test_server_names() -> None:
    assert server_name("web", "", "10.0.0.1:80") == "web 10.0.0.1:80"
    assert server_name("web", "api", "[::1]:80") == "web/api [::1]:80"
