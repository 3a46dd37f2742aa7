"""Challenge injection into the RuntimeStore: the SubVS and rule, codes 12, 17.1-3 and 20-25."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lbproxy.config.model import (
    Address,
    Config,
    ContentRule,
    MatchType,
    Protocol,
    RealServer,
    SubVS,
    VirtualService,
    VSKind,
    rule_order,
)
from lbproxy.letsencrypt.challenge import (
    ChallengeJournal,
    RuntimeHttp01Responder,
    eligible_services,
    verify_vs,
)
from lbproxy.letsencrypt.codes import LeError
from lbproxy.letsencrypt.filestore import FileStorage
from lbproxy.runtime import RuntimeStore

TOKEN = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA"
KEYAUTH = TOKEN + ".9jg46WB3rR_AHD-EBXdN7cBkH1WOu0tA3M9fm21mqTI"
RS = RealServer(Address("127.0.0.1", 9))


def config() -> Config:
    return Config(
        virtual_services=(
            VirtualService("web", Address("127.0.0.1", 8080), subvs=(
                SubVS("app", real_servers=(RS,), rules=("api", "default")),)),
            VirtualService("plain", Address("127.0.0.1", 8081), real_servers=(RS,)),
            VirtualService("redir", Address("127.0.0.1", 8082), kind=VSKind.REDIRECT),
            VirtualService("empty", Address("127.0.0.1", 8083), protocol=Protocol.HTTP),
        ),
        rules=(ContentRule("api", MatchType.PREFIX, "/api"),),
    )


def test_eligibility_and_vs_verification() -> None:
    cfg = config()
    assert [vs.name for vs in eligible_services(cfg)] == ["web", "empty"]
    assert verify_vs(cfg, "web", known_before=True).name == "web"
    for vs, known, sub in (("", False, 1), ("nope", False, 1), ("nope", True, 2),
                           ("plain", True, 3), ("redir", False, 3)):
        with pytest.raises(LeError) as info:
            verify_vs(cfg, vs, known_before=known)
        assert (info.value.code, info.value.subcode) == (17, sub)
        # 17.1 and 17.2 name a VS that is not there; 17.3's VS exists, it is not eligible
        if sub == 3:
            assert info.value.text.startswith("VS not eligible for challenges: VS ")
            assert "Unknown VS" not in info.value.text
        else:
            assert info.value.text.endswith(": Unknown VS")


async def test_present_injects_first_precedence_and_cleanup_removes(tmp_path: Path) -> None:
    store = RuntimeStore(config())
    journal = ChallengeJournal(FileStorage(tmp_path))
    r = RuntimeHttp01Responder(store, "www", {"WWW.Example.test": "web"}, journal)
    await r.present("www.example.test", TOKEN, KEYAUTH)
    [inj] = store.current.injections
    assert inj.vs == "web" and inj.subvs.real_servers == ()
    na = inj.subvs.not_available
    assert (na.status, na.content_type, na.body) == (200, "text/plain", KEYAUTH.encode())
    assert inj.rule.include_host and inj.rule.match_type is MatchType.REGEX
    rx = re.compile(inj.rule.pattern)
    assert rx.match(f"www.example.test/.well-known/acme-challenge/{TOKEN}")
    assert rx.match(f"WWW.example.test:8080/.well-known/acme-challenge/{TOKEN}")
    assert not rx.match(f"other.test/.well-known/acme-challenge/{TOKEN}")
    assert not rx.match(f"www.example.test/.well-known/acme-challenge/{TOKEN.lower()}")
    assert not rx.match(f"www.example.test/.well-known/acme-challenge/{TOKEN}x")
    eff = store.current.effective_vs(store.current.config.virtual_services[0])
    assert rule_order(eff)[0] == (inj.rule.name, inj.subvs.name)
    assert await journal.entries() == [{
        "cert": "www", "vs": "web", "subvs": inj.subvs.name, "host": "www.example.test",
        "token": TOKEN, "key_authorization": KEYAUTH}]
    # any holder of the storage finds the answer there
    other = ChallengeJournal(FileStorage(tmp_path))
    assert await other.answer("WWW.example.test.", TOKEN) == KEYAUTH
    assert await other.answer("www.example.test", TOKEN[:-1]) is None
    await r.cleanup("www.example.test", TOKEN)
    assert store.current.injections == ()
    assert await journal.entries() == []


async def test_two_names_on_one_vs_and_cleanup_all(tmp_path: Path) -> None:
    store = RuntimeStore(config())
    r = RuntimeHttp01Responder(store, "c", {"a.test": "web", "b.test": "web", "c.test": "empty"},
                               ChallengeJournal(FileStorage(tmp_path)))
    await r.present("a.test", "tokenA" * 4, "tokenA.x")
    await r.present("b.test", "tokenB" * 4, "tokenB.x")
    await r.present("c.test", "tokenC" * 4, "tokenC.x")
    assert len(store.current.injections) == 3
    eff = store.current.effective_vs(store.current.config.virtual_services[0])
    assert [rn for rn, _ in rule_order(eff)][2:] == ["api", "default"]
    await r.cleanup_all()
    assert len(store.current.injections) == 0


async def test_unrequested_name_is_code_12(tmp_path: Path) -> None:
    store = RuntimeStore(config())
    r = RuntimeHttp01Responder(store, "c", {"a.test": "web"},
                               ChallengeJournal(FileStorage(tmp_path)))
    with pytest.raises(LeError) as info:
        await r.present("evil.test", TOKEN, KEYAUTH)
    assert info.value.code == 12
    assert store.current.injections == ()


@pytest.mark.parametrize("code", [20, 21, 22, 23, 24, 25])
async def test_each_step_fails_with_its_code(tmp_path: Path, code: int) -> None:
    store = RuntimeStore(config())
    journal = ChallengeJournal(FileStorage(tmp_path))
    r = RuntimeHttp01Responder(store, "c", {"a.test": "web"}, journal, fail_at={code})
    with pytest.raises(LeError) as info:
        await r.present("a.test", TOKEN, KEYAUTH)
    assert info.value.code == code
    assert store.current.injections == () and await journal.entries() == []


async def test_real_failures_have_codes(tmp_path: Path) -> None:
    store = RuntimeStore(config())
    r = RuntimeHttp01Responder(store, "c", {"a.test": "web"},
                               ChallengeJournal(FileStorage(tmp_path)))
    with pytest.raises(LeError) as info:
        await r.present("a.test", "bad token!", KEYAUTH)
    assert info.value.code == 20
    with pytest.raises(LeError) as info:
        await r.present("a.test", TOKEN, "keyauth-\u00e9")
    assert info.value.code == 25

    async def refuse(_rt: object) -> None:
        raise RuntimeError("listener refused")
    store.subscribe(refuse)
    with pytest.raises(LeError) as info:
        await r.present("a.test", TOKEN, KEYAUTH)
    assert info.value.code == 21
    assert store.current.injections == ()
