"""Typed keys for what the relay's aiohttp applications share."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from shared.config import ServerConfig

from .store.base import Store

if TYPE_CHECKING:
    from .hub import AgentHub

__all__ = ["config_key", "store_key", "hub_key", "relay_id_key"]

config_key = web.AppKey("config", ServerConfig)
store_key = web.AppKey("store", Store)
hub_key: web.AppKey["AgentHub"] = web.AppKey("hub")
relay_id_key = web.AppKey("relay_id", str)
