"""Content switching: a VS's content rules compiled into an immutable router (the hot path)."""

from .router import (
    MEMO_HOST_URL,
    MEMO_NONE,
    MEMO_URL,
    NO_MATCH,
    REFUSE,
    RequestInfo,
    Router,
    Tuning,
    compile_router,
)

__all__ = ["MEMO_HOST_URL", "MEMO_NONE", "MEMO_URL", "NO_MATCH", "REFUSE", "RequestInfo", "Router",
           "Tuning", "compile_router"]
