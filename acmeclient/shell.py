"""The asyncio shell around the sans-I/O OrderMachine: it runs the machine's commands (CA requests,
challenge responders) as tasks, feeds their outcomes and timers back, and cleans up challenges.

It reaches the CA only through the `post` it is handed (AcmeClient._post: signed with the account
key, nonces handled by the transport), so it holds no key, nonce or directory of its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from acmeclient.challenges import ChallengeResponder, responder_type
from acmeclient.errors import AcmeError, ClientStateError, ResponderError
from acmeclient.jws import b64url
from acmeclient.messages import Authorization, Challenge, Order
from acmeclient.order import (
    AuthorizationFetched,
    ChallengePresented,
    ChallengeResponded,
    CleanupChallenge,
    Command,
    CommandFailed,
    Event,
    FetchAuthorization,
    FinalizeOrder,
    OrderDone,
    OrderFailed,
    OrderMachine,
    OrderUpdated,
    PollOrder,
    PresentChallenge,
    RespondChallenge,
)
from acmeclient.transport import Response

logger = logging.getLogger(__name__)

# A signed POST to the CA: the payload, or None for POST-as-GET (RFC 8555 §6.3).
Post = Callable[[str, dict[str, Any] | None], Awaitable[Response]]


@dataclass(slots=True)
class _Shell:
    """Per-order bookkeeping of the asyncio shell around OrderMachine."""

    # events for the machine; a non-ACME exception (a bug, a broken responder) ends the order
    events: asyncio.Queue[Event | Exception] = field(default_factory=asyncio.Queue)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


async def drive_order(machine: OrderMachine, responder: ChallengeResponder, post: Post) -> Order:
    """Run `machine` to its end: the order valid (returned) or its error (raised)."""
    loop = asyncio.get_running_loop()
    shell = _Shell()
    cleanups: list[CleanupChallenge] = []

    async def run(cmd: Command) -> None:
        try:
            event = await _execute(cmd, responder, post)
        except AcmeError as exc:
            event = CommandFailed(exc)
        except Exception as exc:  # handed to the driver, which re-raises it
            shell.events.put_nowait(exc)
            return
        shell.events.put_nowait(event)

    async def stop_tasks() -> None:
        for task in shell.tasks:
            task.cancel()
        await asyncio.gather(*shell.tasks, return_exceptions=True)

    cmds = machine.start(loop.time())
    try:
        while True:
            for cmd in cmds:
                if isinstance(cmd, CleanupChallenge):
                    cleanups.append(cmd)
                elif isinstance(cmd, OrderDone | OrderFailed):
                    await stop_tasks()
                    await _cleanup(responder, cleanups)
                    cleanups.clear()
                    if isinstance(cmd, OrderFailed):
                        raise cmd.error
                    return cmd.order
                else:
                    task = asyncio.create_task(run(cmd))
                    shell.tasks.add(task)
                    task.add_done_callback(shell.tasks.discard)
            if cleanups:  # all authorizations valid: the challenges can go now
                await _cleanup(responder, cleanups)
            deadline = machine.next_deadline()
            timeout = None if deadline is None else max(0.0, deadline - loop.time())
            try:
                async with asyncio.timeout(timeout):
                    event = await shell.events.get()
            except TimeoutError:
                cmds = machine.handle_timer(loop.time())
                continue
            if isinstance(event, Exception):
                raise event
            cmds = machine.handle(event, loop.time())
    finally:
        await stop_tasks()
        await _cleanup(responder, cleanups)


async def _cleanup(responder: ChallengeResponder, cmds: list[CleanupChallenge]) -> None:
    for cmd in cmds:
        try:
            await responder.cleanup(cmd.domain, cmd.token)
        except Exception:  # cleanup is best effort; the order's outcome matters more
            logger.exception("%s cleanup failed for %s", responder_type(responder), cmd.domain)
    cmds.clear()


async def _execute(cmd: Command, responder: ChallengeResponder, post: Post) -> Event:
    if isinstance(cmd, FetchAuthorization):
        resp = await post(cmd.url, None)
        return AuthorizationFetched(
            cmd.url, Authorization.from_json(resp.json()), resp.retry_after
        )
    if isinstance(cmd, PresentChallenge):
        try:
            await responder.present(cmd.domain, cmd.token, cmd.key_authorization)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise ResponderError(
                f"{cmd.challenge_type} responder failed for {cmd.domain}: {exc}"
            ) from exc
        return ChallengePresented(cmd.authz_url, cmd.challenge_url)
    if isinstance(cmd, RespondChallenge):
        resp = await post(cmd.challenge_url, {})
        return ChallengeResponded(
            cmd.authz_url, Challenge.from_json(resp.json()), resp.retry_after
        )
    if isinstance(cmd, FinalizeOrder):
        resp = await post(cmd.url, {"csr": b64url(cmd.csr_der)})
        return OrderUpdated(Order.from_json(resp.json()), resp.retry_after)
    if isinstance(cmd, PollOrder):
        resp = await post(cmd.url, None)
        return OrderUpdated(Order.from_json(resp.json()), resp.retry_after)
    raise ClientStateError(f"shell cannot execute {type(cmd).__name__}")
