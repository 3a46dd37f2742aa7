"""The admin web page in Debian's chromium (headless, Playwright): the whole Let's Encrypt Certs
story of issue 19 against a real Pebble and `lbproxy run`, one screenshot per step under the
test's tmp dir (screenshots/NN-step.png)."""

from __future__ import annotations

import re
import socket
import ssl
from pathlib import Path
from typing import Any

from cryptography import x509

from tests.browser.conftest import Lbproxy, config_text, progress_texts, record_progress
from tests.support.pebble import PebbleInstance

ORDER_TIMEOUT_MS = 60_000  # an order against Pebble with its validation delay, on 2 busy cores
UI_TIMEOUT_MS = 10_000  # any other change the page shows


class Steps:
    def __init__(self, page: Any, shots: Path) -> None:
        self.page, self.shots, self.n = page, shots, 0

    def shot(self, name: str) -> None:
        self.n += 1
        self.page.screenshot(path=str(self.shots / f"{self.n:02d}-{name}.png"), full_page=True)


def served_serial(port: int, name: str, pebble: PebbleInstance) -> int:
    """The serial of the leaf the HTTPS VS serves for SNI `name`, verified with Pebble's root."""
    ctx = ssl.create_default_context(cadata=pebble.root_pem())
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=name) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def https_port(node: Lbproxy) -> int:
    st, vs = node.api("GET", "/api/vs/secure")
    assert st == 200
    return int(vs["listen"].rsplit(":", 1)[1])


def test_le_certs_screen(browser: Any, lbproxy: Lbproxy, slow_pebble: PebbleInstance,
                         upstream: int, shots: Path) -> None:
    from playwright.sync_api import expect

    ctx = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = ctx.new_page()
    page.set_default_timeout(UI_TIMEOUT_MS)
    js_errors: list[str] = []
    elsewhere: list[str] = []
    page.on("pageerror", lambda e: js_errors.append(str(e)))
    page.on("request", lambda r: None if r.url.startswith((lbproxy.url, "blob:", "data:"))
            else elsewhere.append(r.url))
    steps = Steps(page, shots)
    notice = page.locator("#notice")

    # -- log in (a wrong token first: the error sits next to the field)
    page.goto(lbproxy.url + "/ui/")
    token = page.get_by_label("Admin token")
    expect(token).to_be_visible()
    for hidden in (page.locator("#app"), page.locator("#nav"), page.locator("#logout")):
        expect(hidden).to_be_hidden()  # nothing but the login form before logging in
    token.fill("not-the-token-0123456789")
    page.get_by_role("button", name="Log in").click()
    expect(page.locator("#err-login-token")).to_contain_text("wrong admin token")
    expect(token).to_have_attribute("aria-invalid", "true")
    steps.shot("login-refused")
    token.fill(lbproxy.token)
    token.press("Enter")  # the keyboard is enough
    expect(page.locator("#app")).to_be_visible()
    cookie = next(c for c in ctx.cookies() if c["name"] == "lbproxy_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and not cookie["secure"]
    steps.shot("logged-in")

    # -- directory: a local Pebble; register
    page.get_by_label("Directory URL").fill(slow_pebble.directory_url)
    page.get_by_label("CA bundle (file on the server, optional)").fill(slow_pebble.ca_bundle)
    page.locator("#dir-form").get_by_role("button", name="Set").click()
    expect(notice).to_have_text("Directory set.")
    # a file that is no account key: the API's code 7 next to the file field
    page.get_by_label("Account key (PEM or JWK)").set_input_files(
        files=[{"name": "key.pem", "mimeType": "text/plain", "buffer": b"not a key"}])
    page.get_by_role("button", name="Upload Key").click()
    expect(page.locator("#err-key-file")).to_contain_text("(code: 7)")
    page.get_by_label("Email (optional)").fill("ops@le.test")
    page.get_by_role("button", name="Register Account").click()
    expect(page.locator("#acct-id")).to_contain_text("/my-account/")
    expect(page.locator("#acct-email")).to_have_text("ops@le.test")
    expect(page.locator("#err-key-file")).to_be_hidden()  # the old refusal is gone
    steps.shot("registered")

    # -- the request form: EC greys out the key size; two names on two VSs
    size = page.get_by_label("Key size (RSA)")
    expect(size).to_be_disabled()
    page.get_by_label("Elliptic Curve (P-256)").uncheck()
    expect(size).to_be_enabled()
    page.get_by_label("Elliptic Curve (P-256)").check()
    expect(size).to_be_disabled()
    page.get_by_label("Certificate Identifier").fill("site")
    page.get_by_label("Common Name").fill("www.le.test")
    page.get_by_label("Virtual Service (HTTP challenge)").select_option("web")
    page.get_by_label("2 letter Country Code").fill("DE")
    page.get_by_role("button", name="Add SAN").click()
    page.get_by_label("SAN 1 name").fill("api.le.test")
    page.get_by_label("SAN 1 Virtual Service").select_option("web2")
    record_progress(page)
    page.get_by_role("button", name="Request Certificate").click()

    progress = page.locator("#progress")
    # the challenge SubVS and its first-precedence rule, in the VS view while Pebble validates
    challenge = page.locator("#vs-list .subvs.challenge").first
    expect(challenge).to_be_visible(timeout=ORDER_TIMEOUT_MS)
    expect(page.locator("#vs-list li[data-injected]").first).to_contain_text("acme-")
    steps.shot("validating")
    expect(progress).to_have_attribute("data-phase", "issued", timeout=ORDER_TIMEOUT_MS)
    assert progress.get_attribute("data-seen") == "pending validating issued"
    assert any(re.fullmatch(r"Validating: SubVS acme-\S+ on VS web2?(, SubVS acme-\S+ on VS "
                            r"web2?)?", t) for t in progress_texts(page)), progress_texts(page)
    expect(page.locator("#vs-list .subvs.challenge")).to_have_count(0)
    expect(page.locator("#vs-list li[data-injected]")).to_have_count(0)
    row = page.locator('#certs tr[data-id="site"]')
    expect(row).to_contain_text("www.le.test, api.le.test")
    expect(row).to_contain_text("EC P-256")
    expect(row).to_contain_text("www.le.test: web; api.le.test: web2")
    st, view = lbproxy.api("GET", "/api/le/certs/site")
    assert st == 200 and view["status"] == "valid"
    expires_before = row.locator(".expires").inner_text()
    assert expires_before.startswith(view["not_after"][:19].replace("T", " "))
    assert int(row.locator(".days-left").inner_text()) > 0
    steps.shot("issued")
    # every control has an accessible name (a label, aria-label or aria-labelledby)
    unnamed = page.evaluate("""() => [...document.querySelectorAll('input, select, button')]
        .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')
                && !e.getAttribute('aria-labelledby') && !(e.tagName === 'BUTTON'
                && e.textContent.trim())).map(e => e.outerHTML)""")
    assert unnamed == []

    # -- assign to the HTTPS VS: served there; Delete disabled with its reason
    row.get_by_label("HTTPS Virtual Service for site").select_option("secure")
    row.get_by_role("button", name="Assign").click()
    expect(row.locator(".assigned")).to_have_text("secure")
    delete = row.locator("[data-action=delete]")
    expect(delete).to_be_disabled()
    expect(row).to_contain_text("In use by secure: unassign it first.")
    port = https_port(lbproxy)
    assert served_serial(port, "api.le.test", slow_pebble) == int(view["serial"], 16)
    steps.shot("assigned")

    # -- renew: progress again, a new expiry in the table, the new certificate served
    row.get_by_role("button", name="Renew").click()
    expect(progress).to_have_attribute("data-phase", "issued", timeout=ORDER_TIMEOUT_MS)
    expect(row.locator(".expires")).not_to_have_text(expires_before)
    st, renewed = lbproxy.api("GET", "/api/le/certs/site")
    assert renewed["serial"] != view["serial"]
    assert row.locator(".expires").inner_text().startswith(
        renewed["not_after"][:19].replace("T", " "))
    assert served_serial(port, "www.le.test", slow_pebble) == int(renewed["serial"], 16)
    steps.shot("renewed")

    # -- renew period: out of range refused in the form; 20 days moves the next renewal
    next_before = row.locator("td[data-label='Next renewal']").inner_text()
    period = page.get_by_label("Days before expiry (1-60)")
    period.fill("90")
    page.locator("#period-form").get_by_role("button", name="Set").click()
    expect(page.locator("#err-period-days")).to_contain_text("from 1 to 60")
    period.fill("20")
    page.locator("#period-form").get_by_role("button", name="Set").click()
    expect(page.locator("#acct-period")).to_have_text("20 days")
    expect(row.locator("td[data-label='Next renewal']")).not_to_have_text(next_before)

    # -- 11 SANs: refused next to the SAN list, nothing sent
    page.get_by_label("Certificate Identifier").fill("many")
    page.get_by_label("Common Name").fill("many.le.test")
    # by keyboard: Enter on "Add SAN" adds a row and puts the focus in its name field
    page.get_by_role("button", name="Add SAN").focus()
    page.keyboard.press("Enter")
    expect(page.get_by_label("SAN 2 name")).to_be_focused()
    page.keyboard.type("n2.le.test")
    page.keyboard.press("Tab")
    expect(page.get_by_label("SAN 2 Virtual Service")).to_be_focused()
    page.get_by_label("SAN 2 Virtual Service").select_option("web")
    for i in range(3, 12):
        page.get_by_role("button", name="Add SAN").click()
        page.get_by_label(f"SAN {i} name").fill(f"n{i}.le.test")
        page.get_by_label(f"SAN {i} Virtual Service").select_option("web")
    page.get_by_label("SAN 1 name").fill("n1.le.test")
    page.get_by_role("button", name="Request Certificate").click()
    expect(page.locator("#err-sans")).to_contain_text("'sans' has 11 items; at most 10")
    assert lbproxy.api("GET", "/api/le/certs/many")[0] == 404
    steps.shot("eleven-sans")

    # -- an ineligible VS (web2 gets real servers on its parent after the page loaded its list):
    # the API's code 17 next to that SAN's VS drop-down, which then no longer offers web2
    for _ in range(10):
        page.get_by_role("button", name="Remove SAN 2").click()
    page.get_by_label("Certificate Identifier").fill("stale")
    page.get_by_label("Common Name").fill("stale.le.test")
    page.get_by_label("SAN 1 name").fill("stale2.le.test")
    page.get_by_label("SAN 1 Virtual Service").select_option("web2")
    original = lbproxy.config_path.read_text()
    lbproxy.config_path.write_text(config_text(
        slow_pebble, int(lbproxy.url.rsplit(":", 1)[1]), port, upstream,
        web2_parent_servers=True))
    try:
        st, ans = lbproxy.api("POST", "/api/reload")
        assert st == 200, ans
        page.get_by_role("button", name="Request Certificate").click()
        err = page.locator("#err-san-1-vs")
        expect(err).to_contain_text("web2")
        expect(err).to_contain_text("sub-code 3 (code: 17)")
        expect(page.get_by_label("SAN 1 Virtual Service")).to_have_attribute(
            "aria-invalid", "true")
        expect(page.locator("#req-vs option[value=web2]")).to_have_count(0)
        steps.shot("ineligible-vs")
    finally:
        lbproxy.config_path.write_text(original)
        st, ans = lbproxy.api("POST", "/api/reload")
        assert st == 200, ans

    # -- an order the CA cannot validate (the name points where nothing listens): failed with
    # its code in the progress and the table; Delete is enabled (not in use) and works
    page.get_by_role("button", name="Remove SAN 1").click()
    page.get_by_label("Certificate Identifier").fill("site")  # taken: the API says so
    page.get_by_label("Common Name").fill("dead.le.test")
    page.get_by_role("button", name="Request Certificate").click()
    expect(page.locator("#err-req-id")).to_contain_text("'site' already exists")
    page.get_by_label("Certificate Identifier").fill("dead")
    page.get_by_role("button", name="Request Certificate").click()
    expect(progress).to_have_attribute("data-phase", "failed", timeout=ORDER_TIMEOUT_MS)
    expect(page.locator("#progress-text")).to_contain_text("(code 13)")
    dead = page.locator('#certs tr[data-id="dead"]')
    expect(dead).to_contain_text("backoff")
    expect(dead.locator(".last-error")).to_contain_text("dead.le.test")
    expect(dead.locator(".last-error")).to_contain_text("(code 13)")
    steps.shot("failed-order")
    dead_delete = dead.locator("[data-action=delete]")
    expect(dead_delete).to_be_enabled()
    dead_delete.click()
    expect(dead_delete).to_have_text("Confirm delete")
    dead_delete.click()
    expect(dead).to_have_count(0)
    assert lbproxy.api("GET", "/api/le/certs/dead")[0] == 404

    # -- Virtual Services view: rules, real servers with health; drain and enable one
    page.get_by_role("button", name="Refresh").click()
    web = page.locator('[data-vs="web"]')
    expect(web).to_contain_text("default \u2192 app")
    rs = web.locator(".rs-row").first
    expect(rs).to_have_attribute("data-state", "enabled")
    rs.get_by_role("button", name="Drain", exact=False).click()
    expect(web.locator(".rs-row").first).to_have_attribute("data-state", "drain")
    st, servers = lbproxy.api("GET", "/api/servers?vs=web")
    assert {s["state"] for s in servers["servers"]} == {"drain"}
    steps.shot("vs-drain")
    web.locator(".rs-row").first.get_by_role("button", name="Enable").click()
    expect(web.locator(".rs-row").first).to_have_attribute("data-state", "enabled")

    # -- backup: an encrypted file downloaded from the page
    page.get_by_label("Passphrase", exact=True).first.fill("a long passphrase")
    with page.expect_download() as dl:
        page.get_by_role("button", name="Download Backup").click()
    backup_file = Path(dl.value.path())
    data = backup_file.read_bytes()
    assert len(data) > 100 and b"BEGIN" not in data
    steps.shot("backup")
    # restore it: a wrong passphrase is shown next to its field, the right one restores
    page.get_by_label("Backup file").set_input_files(str(backup_file))
    restore_pass = page.locator("#restore-pass")
    restore_pass.fill("not the passphrase")
    page.get_by_role("button", name="Restore", exact=True).click()
    expect(page.locator("#err-restore-pass")).to_be_visible()
    restore_pass.fill("a long passphrase")
    page.get_by_role("button", name="Restore", exact=True).click()
    expect(notice).to_have_text("Backup restored.")
    expect(page.locator('#certs tr[data-id="site"]')).to_be_visible()
    steps.shot("restored")

    # -- unassign from the page: Delete becomes possible
    row = page.locator('#certs tr[data-id="site"]')
    row.get_by_role("button", name="Unassign from secure").click()
    expect(row.locator(".assigned")).to_have_text("-")
    expect(row.locator("[data-action=delete]")).to_be_enabled()
    assert lbproxy.api("GET", "/api/le/certs/site")[1]["in_use_by"] == []

    # -- CSRF: with the session cookie but without (or with a wrong) X-CSRF-Token: 403
    for headers in ({}, {"X-CSRF-Token": "forged"}):
        status, text = page.evaluate(
            "async (h) => { const r = await fetch('/api/le/certs/site/renew', {method: 'POST',"
            " headers: {'Content-Type': 'application/json', ...h}, body: '{}'});"
            " return [r.status, await r.text()]; }", headers)
        assert status == 403 and "CSRF" in text
    assert page.evaluate("async () => (await fetch('/api/le/certs')).status") == 200

    # -- a phone screen: nothing wider than the viewport
    page.set_viewport_size({"width": 390, "height": 844})
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    steps.shot("phone")
    page.set_viewport_size({"width": 1280, "height": 900})

    # -- log out: the session is gone on the server too
    page.get_by_role("button", name="Log out").click()
    expect(page.get_by_label("Admin token")).to_be_visible()
    for hidden in (page.locator("#app"), page.locator("#nav"), page.locator("#logout")):
        expect(hidden).to_be_hidden()
    assert not [c for c in ctx.cookies() if c["name"] == "lbproxy_session"]
    assert page.evaluate("async () => (await fetch('/api/le/certs')).status") == 401
    steps.shot("logged-out")

    assert js_errors == []
    assert elsewhere == []  # nothing but the admin API: no CDN, no fonts
    assert len(list(shots.glob("*.png"))) == steps.n
    ctx.close()
