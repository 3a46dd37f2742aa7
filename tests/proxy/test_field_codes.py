"""Field names are classified in any case, through a bounded cache (http.FIELD_CODES)."""

from __future__ import annotations

from lbproxy.proxy import http as h


def test_a_name_in_any_case_gets_its_code_and_is_remembered() -> None:
    h.FIELD_CODES.clear()
    for name in (b"Transfer-Encoding", b"TRANSFER-ENCODING", b"transfer-encoding",
                 b"tRaNsFeR-eNcOdInG"):
        assert h.field_code(name) == h.H_TE
        assert h.FIELD_CODES[name] == h.H_TE
    assert h.field_code(b"User-Agent") == 0
    assert h.FIELD_CODES[b"User-Agent"] == 0


def test_made_up_names_cannot_grow_the_cache_past_its_bound() -> None:
    h.FIELD_CODES.clear()
    for i in range(3 * h.FIELD_CODES_MAX):
        h.field_code(b"X-Made-Up-%d" % i)
        assert len(h.FIELD_CODES) <= h.FIELD_CODES_MAX
    # Emptied and refilled: the special names are still told apart afterwards.
    assert h.field_code(b"Content-Length") == h.H_CLEN
    assert h.field_code(b"HOST") == h.H_HOST
