"""The store the settings name (see base.py for what a store holds)."""
from __future__ import annotations

from ..config import Settings
from .base import Acceptance, Store

__all__ = ["Acceptance", "Store", "open_store"]


def open_store(settings: Settings) -> Store:
    if settings.store == "embedded":
        from .embedded.store import EmbeddedStore
        return EmbeddedStore(settings)
    if settings.store.startswith(("redis://", "redis+unix://")):
        from .redis_store import RedisStore
        return RedisStore(settings)
    raise SystemExit("PAYCORE_STORE must be 'embedded', redis://HOST:PORT/DB or "
                     f"redis+unix:///PATH?db=N, got {settings.store!r}")
