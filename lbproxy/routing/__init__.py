"""Content switching: a VS's content rules compiled into an immutable router (the hot path)."""

from .router import NO_MATCH, REFUSE, RequestInfo, Router, Tuning, compile_router

__all__ = ["NO_MATCH", "REFUSE", "RequestInfo", "Router", "Tuning", "compile_router"]
