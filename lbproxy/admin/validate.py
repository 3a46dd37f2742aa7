"""Admin API input discipline: request bodies read as strict JSON objects against a per-route
field schema, path parameters checked, and the middleware that answers every failure as JSON.

Every refusal of malformed input is a `FieldError`: a 4xx whose JSON answer names the field
({"error": "'renew_period_days' must be an integer, got a boolean", "field":
"renew_period_days"}); "body" stands for the body as a whole. Anything else a handler raises
by mistake becomes a JSON 500 with the traceback in the log, never aiohttp's text/plain page.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn

from aiohttp import web
from aiohttp.typedefs import Middleware

from ..certs.errors import CertInputError
from ..errors import AdminError, StoreError

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# No admin body nests deeper than 3 (a SAN object in a list in the body); 32 leaves room and
# stops a body of a million "[" long before the JSON parser's own recursion limit.
MAX_DEPTH = 32
# Names, URLs, addresses, e-mail addresses and subject fields; PEM, base64 and passphrase
# fields are bounded only by the body limit (Text(max_len=None)).
SHORT_TEXT = 1024
# A field name or path parameter quoted in an error message is cut to this many characters.
_SHOWN = 64


class FieldError(AdminError):
    """Malformed input: `field` names it ("body" for the body as a whole, "sans[1].name" for a
    nested one, the parameter name for a path parameter)."""

    def __init__(self, field: str, message: str, status: int = 400) -> None:
        self.field = field
        super().__init__(f"'{field}' {message}" if field != "body" else
                         f"the request body {message}", status)


def shown(name: str) -> str:
    """A field name fit for an error message: non-printable characters (lone surrogates,
    controls) escaped, cut to a few dozen characters."""
    out = name if name.isprintable() else repr(name)[1:-1]
    return out if len(out) <= _SHOWN else out[:_SHOWN] + "..."


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return {int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


def _bad_text(where: str, s: str) -> None:
    """Refuse what no admin field may hold: a lone surrogate (JSON allows "\\ud800"; it cannot
    be encoded, written to a file or logged) and NUL (it ends C strings and file names)."""
    if not s.isascii():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError as e:
            raise FieldError(where, f"holds a lone surrogate (\\u{ord(s[e.start]):04x}) at "
                             f"character {e.start}; strings must be valid Unicode") from None
    if "\x00" in s:
        raise FieldError(where, f"holds a NUL character at position {s.index(chr(0))}")


# -- field schema ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Text:
    """A string; `required`: present, not null and not empty."""

    required: bool = False
    max_len: int | None = SHORT_TEXT
    choices: tuple[str, ...] = ()

    def check(self, where: str, value: Any) -> str:
        if not isinstance(value, str):
            raise FieldError(where, f"must be a string, got {_kind(value)}")
        if self.required and not value:
            raise FieldError(where, "is required and must not be empty")
        if self.max_len is not None and len(value) > self.max_len:
            raise FieldError(where, f"is {len(value)} characters long; at most "
                             f"{self.max_len} are allowed")
        if self.choices and value not in self.choices:
            raise FieldError(where, f"must be one of {', '.join(self.choices)}, got "
                             f"{shown(value)!r}")
        return value


@dataclass(frozen=True, slots=True)
class Flag:
    """true or false (not 0, 1 or "true")."""

    required: bool = False

    def check(self, where: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise FieldError(where, f"must be true or false, got {_kind(value)}")
        return value


@dataclass(frozen=True, slots=True)
class Integer:
    """An integer in [lo, hi]; a boolean is not one (in Python `isinstance(True, int)`), nor
    is 30.0 or "30"."""

    lo: int
    hi: int
    required: bool = False

    def check(self, where: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise FieldError(where, f"must be an integer, got {_kind(value)}")
        if not self.lo <= value <= self.hi:
            raise FieldError(where, f"must be between {self.lo} and {self.hi}, got {value}")
        return value


@dataclass(frozen=True, slots=True)
class Objects:
    """A list of at most `max_items` objects, each checked against `fields`."""

    fields: Mapping[str, Spec]
    max_items: int
    required: bool = False

    def check(self, where: str, value: Any) -> list[Body]:
        if not isinstance(value, list):
            raise FieldError(where, f"must be a list, got {_kind(value)}")
        if len(value) > self.max_items:
            raise FieldError(where, f"has {len(value)} items; at most {self.max_items} "
                             "are allowed")
        return [_checked(item, self.fields, f"{where}[{i}]") for i, item in enumerate(value)]


Spec = Text | Flag | Integer | Objects
Schema = Mapping[str, Spec]


@dataclass(frozen=True, slots=True)
class Body:
    """A request body (or a nested object) whose fields all passed their `Spec`; the getters
    give the checked value or the default when the field was absent or null."""

    values: Mapping[str, Any] = field(default_factory=dict)

    def has(self, key: str) -> bool:
        return key in self.values

    def text(self, key: str, default: str = "") -> str:
        v = self.values.get(key, default)
        assert isinstance(v, str), key
        return v

    def optional_text(self, key: str) -> str | None:
        v = self.values.get(key)
        assert v is None or isinstance(v, str), key
        return v

    def flag(self, key: str, default: bool = False) -> bool:
        v = self.values.get(key, default)
        assert isinstance(v, bool), key
        return v

    def integer(self, key: str, default: int) -> int:
        v = self.values.get(key, default)
        assert isinstance(v, int) and not isinstance(v, bool), key
        return v

    def objects(self, key: str) -> list[Body]:
        v = self.values.get(key, [])
        assert isinstance(v, list), key
        return v


def _checked(data: Any, schema: Schema, where: str) -> Body:
    """Check one object against its schema: unknown fields, required fields, each value."""
    if not isinstance(data, dict):
        raise FieldError(where, f"must be a JSON object, got {_kind(data)}")
    prefix = "" if where == "body" else where + "."
    for key in data:
        if key not in schema:
            raise FieldError(prefix + shown(key), "is not a field of this request; "
                             f"expected: {', '.join(schema) or 'no fields'}")
    values: dict[str, Any] = {}
    for key, spec in schema.items():
        value = data.get(key)
        if value is None:
            if spec.required:
                raise FieldError(prefix + key, "is required")
            continue
        values[key] = spec.check(prefix + key, value)
    return Body(values)


# -- reading a body -------------------------------------------------------------------------------

class _Duplicate(ValueError):
    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(key)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:  # which one counts is parser-dependent: refuse the ambiguity
            raise _Duplicate(k)
        out[k] = v
    return out


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON (RFC 8259 has no NaN or Infinity)")


def _walk(doc: Any) -> Iterator[tuple[str, Any]]:
    """(path, value) of every key and value in a parsed document, iteratively; nesting deeper
    than MAX_DEPTH is refused, naming the top-level field it is under."""
    stack: list[tuple[str, str, Any, int]] = [("body", "", doc, 0)]
    while stack:
        top, path, value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise FieldError(top, f"nests deeper than {MAX_DEPTH} levels")
        if isinstance(value, dict):
            for k, v in value.items():
                where = f"{path}.{shown(k)}" if path else shown(k)
                yield where, k
                stack.append((where if not path else top, where, v, depth + 1))
        elif isinstance(value, list):
            stack.extend((top, f"{path}[{i}]", v, depth + 1) for i, v in enumerate(value))
        else:
            yield path or "body", value


def payload_too_large(limit: int, size: int | None = None) -> FieldError:
    got = f" ({size} bytes)" if size is not None else ""
    return FieldError("body", f"is larger than the limit of {limit} bytes{got}", status=413)


async def read_body(request: web.Request, schema: Schema, *, optional: bool = False) -> Body:
    """The request body as a `Body` checked against `schema`.

    Refused with a FieldError: a declared length over the app's body limit (413, before a byte
    is read; a chunked body over it is stopped by aiohttp, answered the same way by
    `json_errors`), bytes that are not UTF-8, text that is not JSON (NaN and Infinity
    included), a key given twice, nesting deeper than MAX_DEPTH, anything but an object at the
    top, a lone surrogate or NUL in any key or string, an unknown field, and each field's own
    type or range. `optional`: an empty body is an empty object.
    """
    limit = request.client_max_size
    if request.content_length is not None and request.content_length > limit:
        raise payload_too_large(limit, request.content_length)
    raw = await request.read()
    if optional and not raw.strip():
        return Body()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FieldError("body", f"is not UTF-8 (byte {e.start})") from None
    try:
        doc = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except _Duplicate as e:
        raise FieldError(shown(e.key), "is given twice") from None
    except RecursionError:
        raise FieldError("body", f"nests deeper than {MAX_DEPTH} levels") from None
    except ValueError as e:  # JSONDecodeError, NaN, an integer of more than 4300 digits
        raise FieldError("body", f"is not JSON: {e}") from None
    for where, value in _walk(doc):
        if isinstance(value, str):
            _bad_text(where, value)
    return _checked(doc, schema, "body")


# -- middlewares ----------------------------------------------------------------------------------

def _error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


def _too_large(message: str, limit: int) -> web.Response:
    """A 413 that closes the connection: the rest of the body is read and dropped (aiohttp's
    lingering read, so the client gets the answer rather than a reset), never parsed."""
    resp = _error(413, message, field="body", limit=limit)
    resp.force_close()
    return resp


def json_errors(*, max_body: int) -> Middleware:
    """The outermost middleware: every failure answered as JSON.

    FieldError -> its status with "field"; CertInputError -> 400 with "reason"; StoreError and
    AdminError -> their status; aiohttp's HTTP errors (404, 405 with Allow, 413) -> the same
    status as JSON; anything else -> 500 as JSON, the traceback logged (bodies never are).
    """

    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except FieldError as e:
            if e.status == 413:
                return _too_large(str(e), max_body)
            return _error(e.status, str(e), field=e.field)
        except CertInputError as e:
            return _error(e.status, str(e), reason=e.reason.value)
        except (StoreError, AdminError) as e:
            return _error(e.status, str(e))
        except web.HTTPRequestEntityTooLarge:
            return _too_large(str(payload_too_large(max_body)), max_body)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            resp = _error(e.status, f"{request.method} {shown(request.path)}: {e.reason}")
            if "Allow" in e.headers:
                resp.headers["Allow"] = e.headers["Allow"]
            return resp
        except Exception:
            logger.exception("admin API: %s %s failed", request.method, shown(request.path))
            return _error(500, "internal error in the admin API; the traceback is in the log")

    return errors


def _bad_param(value: str) -> str | None:
    if not value.isprintable():
        bad = next(c for c in value if not c.isprintable())
        return f"holds the non-printable character {bad!r}"
    if len(value) > SHORT_TEXT:
        return f"is {len(value)} characters long; at most {SHORT_TEXT} are allowed"
    return None


def path_params() -> Middleware:
    """Refuse a path parameter ({id}, {name}) with a control character or of absurd length:
    no certificate id or VS name holds one, and a NUL would reach file names."""

    @web.middleware
    async def params(request: web.Request, handler: Handler) -> web.StreamResponse:
        for key, value in request.match_info.items():
            problem = _bad_param(value)
            if problem is not None:
                raise FieldError(key, problem)
        return await handler(request)

    return params
