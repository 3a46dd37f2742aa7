"""The challenge type of the Request New Certificate form in Debian's chromium (headless,
Playwright), against `lbproxy run` and a real Pebble: what each type asks of the Virtual Service
fields (http-01 an eligible VS, tls-alpn-01 an HTTPS VS, dns-01 none), the server's refusals
shown at their field (no DNS provider: code 104; a VS that cannot answer tls-alpn-01: code 17
sub-code 4), and, with a real Knot DNS server behind Pebble, a wildcard certificate by dns-01
and one by tls-alpn-01 ordered from the page, each watched through pending, validating (what is
being validated: the TXT record, the validation certificate's VS) and issued, and shown in the
certificate table."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from lbproxy.certs import CertStore
from tests.browser.conftest import (
    PEBBLE_ENV,
    Lbproxy,
    progress_texts,
    record_progress,
    start_lbproxy,
    stop_process,
)
from tests.support.knot import KnotInstance, knot_or_skip, start_knot
from tests.support.lbconfig import config_head, https_vs, rest_vs
from tests.support.pebble import PebbleInstance, free_port, pebble_or_skip, start_pebble
from tests.support.tlsclient import bootstrap_certificate

ORDER_TIMEOUT_MS = 60_000  # one order against Pebble on 2 busy cores
UI_TIMEOUT_MS = 10_000  # any other change the page shows
NO_VS = "Choose the Virtual Service that answers the challenge."


def open_page(browser: Any, node: Lbproxy) -> tuple[Any, Any, list[str], list[dict[str, Any]]]:
    """A logged-in page; with the page errors and the bodies of every POST /api/le/certs the
    browser sent (what left the page, as the server received it)."""
    from playwright.sync_api import expect

    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    page = ctx.new_page()
    page.set_default_timeout(UI_TIMEOUT_MS)
    js_errors: list[str] = []
    posted: list[dict[str, Any]] = []
    page.on("pageerror", lambda e: js_errors.append(str(e)))
    page.on("request", lambda r: posted.append(r.post_data_json) if (
        r.method == "POST" and r.url == node.url + "/api/le/certs") else None)
    page.goto(node.url + "/ui/")
    page.get_by_label("Admin token").fill(node.token)
    page.get_by_role("button", name="Log in").click()
    expect(page.locator("#app")).to_be_visible()
    # the drop-downs are filled once the VS lists are loaded
    expect(page.locator("#req-vs option[value=web]")).to_have_count(1)
    return ctx, page, js_errors, posted


def options(select: Any) -> list[str]:
    return [str(v) for v in select.locator("option").evaluate_all("os => os.map(o => o.value)")]


def test_the_vs_follows_the_challenge_type_and_refusals_sit_at_their_field(
        browser: Any, lbproxy: Lbproxy) -> None:
    from playwright.sync_api import expect

    ctx, page, js_errors, posted = open_page(browser, lbproxy)
    challenge = page.get_by_label("Challenge Type")
    vs = page.locator("#req-vs")
    submit = page.get_by_role("button", name="Request Certificate")

    # -- the default is HTTP-01: the VS is required, offered from the eligible VSs
    expect(challenge).to_have_value("http-01")
    expect(page.locator("#req-challenge option:checked")).to_have_text(
        "HTTP-01 (HTTP challenge, port 80)")
    expect(page.get_by_label("Virtual Service (HTTP challenge)")).to_be_enabled()
    expect(vs).to_have_attribute("aria-required", "true")
    assert options(vs) == ["", "web", "web2", "secure"]

    # -- HTTP-01 without a VS: refused in the page with the existing message, nothing sent
    page.get_by_label("Certificate Identifier").fill("novs")
    page.get_by_label("Common Name").fill("novs.le.test")
    submit.click()
    expect(page.locator("#err-req-vs")).to_have_text(NO_VS)
    expect(vs).to_have_attribute("aria-invalid", "true")
    expect(vs).to_be_focused()
    assert posted == []
    assert lbproxy.api("GET", "/api/le/certs/novs")[0] == 404

    # -- a wildcard with HTTP-01: refused at the name (the server's code 11, mirrored)
    vs.select_option("web")
    page.get_by_label("Certificate Identifier").fill("wild")
    page.get_by_label("Common Name").fill("*.le.test")
    submit.click()
    expect(page.locator("#err-req-cn")).to_contain_text("only the DNS-01 challenge can prove it")
    expect(page.locator("#err-req-vs")).to_be_hidden()
    assert posted == []

    # -- DNS-01: no VS, the labels say why; the request carries dns-01 and no VS, and the
    # server's refusal (this node has no [letsencrypt.dns]: code 104) sits at the challenge type
    page.get_by_role("button", name="Add SAN").click()
    page.get_by_label("SAN 1 name").fill("le.test")
    page.get_by_label("SAN 1 Virtual Service").select_option("web2")
    challenge.select_option("dns-01")
    expect(page.get_by_label("Virtual Service (not needed: the DNS challenge uses none)")
           ).to_be_disabled()
    expect(vs).to_have_attribute("aria-required", "false")
    expect(vs).to_have_value("")
    san_vs = page.get_by_label("SAN 1 Virtual Service (not needed: DNS challenge)")
    expect(san_vs).to_be_disabled()
    expect(page.locator("#hint-req-challenge")).to_contain_text("TXT record")
    expect(page.locator("#sans-legend")).to_contain_text("DNS-01 needs no Virtual Service")
    submit.click()
    err = page.locator("#err-req-challenge")
    expect(err).to_contain_text("dns-01 needs a DNS provider")
    expect(err).to_contain_text("(code: 104)")
    expect(challenge).to_have_attribute("aria-invalid", "true")
    expect(challenge).to_be_focused()
    for other in ("#err-req-vs", "#err-req-cn", "#err-san-1-vs", "#err-req-id"):
        expect(page.locator(other)).to_be_hidden()
    assert len(posted) == 1
    body = posted[0]
    assert body["challenge"] == "dns-01"
    assert body["common_name"] == "*.le.test"
    assert "vs" not in body and body["sans"] == [{"name": "le.test"}]
    assert lbproxy.api("GET", "/api/le/certs/wild")[0] == 404  # refused before anything kept

    # -- back to HTTP-01: the VSs chosen before are there again, required
    challenge.select_option("http-01")
    expect(page.get_by_label("Virtual Service (HTTP challenge)")).to_be_enabled()
    expect(vs).to_have_value("web")
    expect(page.get_by_label("SAN 1 Virtual Service")).to_have_value("web2")
    expect(vs).to_have_attribute("aria-required", "true")

    # -- TLS-ALPN-01: only HTTPS VSs are offered; one that stopped being HTTPS after the page
    # loaded its list is refused by the server (17.4) next to that drop-down, which then drops it
    challenge.select_option("tls-alpn-01")
    expect(page.locator("#req-vs-label")).to_have_text(
        "Virtual Service (HTTPS, TLS-ALPN challenge)")
    assert options(vs) == ["", "secure"]
    assert options(page.get_by_label("SAN 1 Virtual Service")) == ["", "secure"]
    page.get_by_label("Certificate Identifier").fill("alpn")
    page.get_by_label("Common Name").fill("alpn.le.test")
    page.get_by_role("button", name="Remove SAN 1").click()
    vs.select_option("secure")
    original = lbproxy.config_path.read_text()
    tls = 'protocol = "https"\ntls = { certificates = ["boot"] }\n'
    assert tls in original
    lbproxy.config_path.write_text(original.replace(tls, ""))
    try:
        st, ans = lbproxy.api("POST", "/api/reload")
        assert st == 200, ans
        submit.click()
        err = page.locator("#err-req-vs")
        expect(err).to_contain_text("cannot answer tls-alpn-01")
        expect(err).to_contain_text("sub-code 4 (code: 17)")
        expect(vs).to_have_attribute("aria-invalid", "true")
        expect(page.locator("#req-vs option[value=secure]")).to_have_count(0)
        assert posted[-1]["challenge"] == "tls-alpn-01" and posted[-1]["vs"] == "secure"
        assert lbproxy.api("GET", "/api/le/certs/alpn")[0] == 404
    finally:
        lbproxy.config_path.write_text(original)
        st, ans = lbproxy.api("POST", "/api/reload")
        assert st == 200, ans

    # every control has an accessible name (a label, aria-label or aria-labelledby)
    unnamed = page.evaluate("""() => [...document.querySelectorAll('input, select, button')]
        .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')
                && !e.getAttribute('aria-labelledby') && !(e.tagName === 'BUTTON'
                && e.textContent.trim())).map(e => e.outerHTML)""")
    assert unnamed == []
    assert js_errors == []
    ctx.close()


# -- issued from the page: dns-01 (a wildcard) and tls-alpn-01, Pebble resolving through Knot ----

RECORD = "_acme-challenge.example.test"


@pytest.fixture(scope="module")
def knot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KnotInstance]:
    knot_or_skip()
    with start_knot(tmp_path_factory.mktemp("knot")) as k:
        yield k


@pytest.fixture(scope="module")
def https_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def dns_pebble(knot: KnotInstance, https_port: int,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[PebbleInstance]:
    """Pebble resolving every name through Knot (every *.example.test is 127.0.0.1, and the
    dns-01 TXT records lbproxy adds are there) and dialing the HTTPS VS for tls-alpn-01; its
    validations take a moment (PEBBLE_ENV), so the page's polling sees them."""
    pebble_or_skip()
    with start_pebble(tmp_path_factory.mktemp("pebble"), dns_server=knot.dns_address,
                      tls_port=https_port, env=PEBBLE_ENV) as p:
        yield p


@pytest.fixture(scope="module")
def dns_node(dns_pebble: PebbleInstance, knot: KnotInstance, https_port: int,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lbproxy]:
    """`lbproxy run` with [letsencrypt.dns] on Knot, an HTTPS VS "secure" on `https_port`
    (serving a throw-away "boot" certificate) and an HTTP VS "web" (eligible for http-01)."""
    root = tmp_path_factory.mktemp("lbproxy")
    CertStore(root / "state").import_pem("boot", *bootstrap_certificate())
    text = (config_head(admin_port=free_port(), pebble=dns_pebble,
                        letsencrypt=knot.config_section())
            + https_vs("secure", f"127.0.0.1:{https_port}", ["boot"])
            + rest_vs("web", f"127.0.0.1:{free_port()}"))
    node = start_lbproxy(root, text)
    try:
        st, ans = node.api("POST", "/api/le/account", {"email": "ops@example.test"})
        assert st == 201, ans
        yield node
    finally:
        stop_process(node.proc)


def test_dns01_wildcard_and_tls_alpn01_issued_from_the_page(
        browser: Any, dns_node: Lbproxy, knot: KnotInstance) -> None:
    from playwright.sync_api import expect

    ctx, page, js_errors, posted = open_page(browser, dns_node)
    progress = page.locator("#progress")
    submit = page.get_by_role("button", name="Request Certificate")

    # -- dns-01: a wildcard and its base name, no VS at all
    page.get_by_label("Challenge Type").select_option("dns-01")
    page.get_by_label("Certificate Identifier").fill("wild")
    page.get_by_label("Common Name").fill("*.example.test")
    page.get_by_role("button", name="Add SAN").click()
    page.get_by_label("SAN 1 name").fill("example.test")
    record_progress(page)
    submit.click()
    expect(progress).to_have_attribute("data-phase", "issued", timeout=ORDER_TIMEOUT_MS)
    assert progress.get_attribute("data-seen") == "pending validating issued"
    # one TXT record for the wildcard and its base name
    assert "Validating: TXT record _acme-challenge.example.test" in progress_texts(page)
    assert posted[-1]["challenge"] == "dns-01" and "vs" not in posted[-1]
    st, view = dns_node.api("GET", "/api/le/certs/wild")
    assert st == 200 and view["status"] == "valid"
    assert view["challenge"] == "dns-01"
    assert view["names"] == ["*.example.test", "example.test"]
    assert view["http_challenge_vs"] == ["*.example.test: (dns-01: none)",
                                         "example.test: (dns-01: none)"]
    cell = page.locator('#certs tr[data-id="wild"] td[data-label="HTTP challenge VS(s)"]')
    expect(cell).to_have_text(
        "DNS-01 *.example.test: (dns-01: none); example.test: (dns-01: none)")
    assert knot.txt(RECORD) == set()  # the TXT values are gone again

    # -- tls-alpn-01: through the HTTPS VS
    page.get_by_label("Challenge Type").select_option("tls-alpn-01")
    page.get_by_role("button", name="Remove SAN 1").click()
    page.get_by_label("Certificate Identifier").fill("alpn")
    page.get_by_label("Common Name").fill("alpn.example.test")
    assert options(page.locator("#req-vs")) == ["", "secure"]
    page.get_by_label("Virtual Service (HTTPS, TLS-ALPN challenge)").select_option("secure")
    record_progress(page)
    submit.click()
    expect(progress).to_have_attribute("data-cert", "alpn")
    expect(progress).to_have_attribute("data-phase", "issued", timeout=ORDER_TIMEOUT_MS)
    assert progress.get_attribute("data-seen") == "pending validating issued"
    assert "Validating: tls-alpn-01 certificate on VS secure" in progress_texts(page)
    assert posted[-1]["challenge"] == "tls-alpn-01" and posted[-1]["vs"] == "secure"
    st, view = dns_node.api("GET", "/api/le/certs/alpn")
    assert st == 200 and view["status"] == "valid" and view["challenge"] == "tls-alpn-01"
    cell = page.locator('#certs tr[data-id="alpn"] td[data-label="HTTP challenge VS(s)"]')
    expect(cell).to_have_text("TLS-ALPN-01 alpn.example.test: secure")
    assert js_errors == []
    ctx.close()
