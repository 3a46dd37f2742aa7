"""The ACME account: reading and writing it in storage (key first), registering a new one,
linking an existing one by its key, and what the API shows of it."""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

from acmeclient import KeyType
from acmeclient.crypto import load_account_key, private_key_to_pem
from acmeclient.errors import (
    AccountDoesNotExistError,
    AcmeError,
    CryptoError,
    MalformedResponseError,
    UnexpectedStatusError,
)

from .blocking import on_thread
from .codes import AcmeCode, LeError, classify
from .issuer import AcmeClientLike, Issuer, close_client, new_key
from .model import Account, dump
from .state import LeState
from .storage import ACCOUNT, ACCOUNT_KEY, load_or_none

logger = logging.getLogger(__name__)


async def _new_account(client: AcmeClientLike, action: str, *, unknown: str = "",
                       **kw: Any) -> Any:
    """newAccount, the directory fetched first and its failures classified apart: a malformed
    answer (not a non-2xx one) of the newAccount exchange itself leaves lbproxy without an
    account URL (acmeclient refuses an answer without Location this way): code 10; the same
    error from the directory is an unexpected CA answer (14), not an account without URL.
    `unknown`: the text of code 8 when the CA knows no account for the key."""
    try:
        await client.directory()
    except AcmeError as exc:
        raise classify(exc, action=action) from None
    try:
        return await client.new_account(**kw)
    except AccountDoesNotExistError as exc:
        if not unknown:
            raise classify(exc, action=action) from None
        raise LeError(AcmeCode.NOT_REGISTERED, f"{unknown}: {exc.detail}") from None
    except AcmeError as exc:
        raise _account_error(exc, action) from None


def _account_error(exc: AcmeError, action: str) -> LeError:
    """The code of a failed newAccount exchange (the directory already fetched)."""
    if isinstance(exc, MalformedResponseError) and not isinstance(exc, UnexpectedStatusError):
        return LeError(AcmeCode.ACCOUNT_WITHOUT_URL,
                       f"{action}: the CA's answer gives no usable account URL: {exc}")
    return classify(exc, action=action)


class Accounts:
    """The account of `state` (state.account, state.account_problem)."""

    def __init__(self, state: LeState, issuer: Issuer) -> None:
        self.state = state
        self.issuer = issuer

    def require(self) -> Account:
        """The account, or the LeError saying why there is none (code 8, 9 or 10)."""
        s = self.state
        if s.account is None:
            raise s.problem(s.account_problem or LeError(
                AcmeCode.NOT_REGISTERED, "no Let's Encrypt account is registered"))
        return s.account

    async def load(self) -> None:
        s, storage = self.state, self.state.storage
        s.account, s.account_problem = None, None
        meta_where, key_where = storage.describe(ACCOUNT), storage.describe(ACCOUNT_KEY)
        try:
            key_pem = await load_or_none(storage, ACCOUNT_KEY)
            meta = await load_or_none(storage, ACCOUNT)
        except OSError as exc:
            key_pem, meta = None, None
            s.damaged[ACCOUNT_KEY] = f"{key_where}: {exc}"
            s.account_problem = s.problem(LeError(
                AcmeCode.INVALID_STORED_KEY,
                f"the stored account key {key_where} cannot be used: {exc}"))
            return
        if meta is None and key_pem is None:
            return
        try:
            if key_pem is None:
                raise FileNotFoundError(2, "No such file or directory", key_where)
            key = load_account_key(key_pem)
        except (OSError, CryptoError) as exc:
            s.damaged[ACCOUNT_KEY] = f"{key_where}: {exc}"
            s.account_problem = s.problem(LeError(
                AcmeCode.INVALID_STORED_KEY,
                f"the stored account key {key_where} cannot be used: {exc}"))
            return
        why, d = "it has no account URL", {}
        try:
            if meta is None:
                raise FileNotFoundError(2, "No such file or directory", meta_where)
            d = json.loads(meta)
            url = str(d.get("url") or "") if isinstance(d, dict) else ""
        except (OSError, ValueError) as exc:
            url, d, why = "", {}, f"it is damaged ({exc})"
            s.damaged[ACCOUNT] = f"{meta_where}: {exc}"
        if not url:
            s.account_problem = s.problem(LeError(
                AcmeCode.ACCOUNT_WITHOUT_URL,
                f"the stored account {meta_where} cannot be used: {why}"))
            return
        s.account = Account(url, str(d.get("email", "")), key)

    async def save(self, account: Account) -> None:
        s = self.state
        pem = await on_thread(lambda: private_key_to_pem(account.key))
        # The key first: an account.json never points at a key that is not stored.
        await s.write(ACCOUNT_KEY, pem, "account key not stored")
        await s.write(ACCOUNT, dump({"url": account.url, "email": account.email}),
                      "account not stored")
        s.account, s.account_problem = account, None
        s.damaged.pop(ACCOUNT_KEY, None)
        s.damaged.pop(ACCOUNT, None)

    async def register(self, email: str | None = None) -> dict[str, Any]:
        """Register a new account with a generated key (code 6 if one is registered)."""
        s = self.state
        if s.account is not None:
            raise s.problem(LeError(AcmeCode.ACCOUNT_EXISTS,
                                    f"an account is already registered: {s.account.url}"))
        mail = s.settings.email if email is None else email
        try:
            key = await new_key(KeyType.EC_P256)
            private_key_to_pem(key)
        except (ValueError, CryptoError) as exc:
            raise s.problem(LeError(AcmeCode.INVALID_ACCOUNT_KEY,
                                    f"the generated account key is invalid: {exc}")) from None
        client = self.issuer.temporary(s.settings, key)
        try:
            res = await _new_account(client, "register account",
                                     contact=[f"mailto:{mail}"] if mail else [],
                                     terms_of_service_agreed=True)
        except LeError as err:
            s.count("new_account", err.code)
            raise s.problem(err) from None
        finally:
            await close_client(client)
        s.count("new_account", None)
        await self.save(Account(res.url, mail, key))
        await self._adopt_email(mail)
        s.log.audit(f"account registered: {res.url}")
        return self.view()

    async def upload_key(self, data: bytes, passphrase: bytes | None = None, *,
                         replace: bool = False) -> dict[str, Any]:
        """Link an existing account by its key: PEM (optionally encrypted) or certbot's JWK.
        Like `register`, refused with code 6 while an account is linked, unless `replace`:
        replacing it strands the certificates' renewals on the old account's rate limits and
        authorizations, so it is the operator's explicit choice."""
        s = self.state
        old = s.account
        if old is not None and not replace:
            raise s.problem(LeError(
                AcmeCode.ACCOUNT_EXISTS,
                f"an account is already registered: {old.url}; to link another one in its "
                "place, upload the key with replace (lbproxy le upload-key FILE --replace)"))
        try:
            key = await on_thread(lambda: load_account_key(data, passphrase))
        except CryptoError as exc:
            raise s.problem(LeError(AcmeCode.INVALID_ACCOUNT_KEY,
                                    f"the uploaded account key is invalid: {exc}")) from None
        client = self.issuer.temporary(s.settings, key)
        try:
            res = await _new_account(
                client, "link account", only_return_existing=True,
                unknown=f"the uploaded key has no account at {s.settings.directory_url}")
        except LeError as err:
            s.count("link_account", err.code)
            raise s.problem(err) from None
        finally:
            await close_client(client)
        s.count("link_account", None)
        contact = [c.removeprefix("mailto:") for c in getattr(res.account, "contact", ())]
        await self.save(Account(res.url, contact[0] if contact else "", key))
        await self._adopt_email(contact[0] if contact else "")
        if old is not None and old.url != res.url:
            s.log.audit(f"account linked by key upload: {res.url}, replacing {old.url}")
        else:
            s.log.audit(f"account linked by key upload: {res.url}")
        return self.view()

    async def _adopt_email(self, email: str) -> None:
        """The account's email becomes the settings' one (what the next `register` would use),
        so the two never disagree after a registration or a link."""
        s = self.state
        if email and s.settings.email != email:
            s.settings = dataclasses.replace(s.settings, email=email)
            await s.save_settings()

    def view(self) -> dict[str, Any]:
        s = self.state
        settings = s.settings.to_json()
        if s.account is not None and s.account.email and not settings["email"]:
            # Settings reset from a config file without an email: the account still has one.
            settings["email"] = s.account.email
        return {
            "registered": s.account is not None,
            "account_id": s.account.url if s.account else "",
            "email": s.account.email if s.account else "",
            "problem": str(s.account_problem) if s.account_problem else "",
            "settings": settings,
        }
