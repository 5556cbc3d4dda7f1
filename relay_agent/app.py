"""Wire the agent together: inbox, link (with its CTOX commands), local API, delivery modes
(forward and tcp targets) and retention, until told to stop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from pathlib import Path

from aiohttp import web

from shared.config import AgentConfig, parse_hostport
from shared.crypto import SigningKey
from shared.files import write_private_file

from .commands import Commands
from .delivery import Delivery
from .enroll import INBOX_FILE, STATE_FILE, TOKEN_FILE
from .inbox import Inbox
from .link import AgentLink
from .local_api import create_local_app
from .system import bind_local
from .tokens import TokenFile

__all__ = ["run_agent", "local_url", "RETENTION_INTERVAL"]

log = logging.getLogger(__name__)

RETENTION_INTERVAL = 60.0
"""Seconds between retention passes besides the ones after each commit (age limit)."""


def local_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def _retention(inbox: Inbox, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        deleted = await inbox.prune()
        if deleted:
            log.info("inbox.pruned", extra={"events": deleted})


async def run_agent(
    config: AgentConfig, *, token: str, private_key: SigningKey, stop: asyncio.Event
) -> None:
    """Run until ``stop`` is set.

    Raises:
        Revoked, Unauthorized: the relay refused this agent; everything is shut down first.
    """
    host, port = parse_hostport(config.listen, what="listen")
    state_file = config.data_dir / STATE_FILE
    async with contextlib.AsyncExitStack() as stack:
        inbox = await Inbox.open(
            config.data_dir / INBOX_FILE,
            max_events=config.retention_max_events,
            max_age=config.retention_max_age,
        )
        stack.push_async_callback(inbox.close)
        await inbox.prune()
        commands = Commands(
            timeout=config.command_timeout, max_in_flight=config.max_commands_in_flight
        )
        link = AgentLink(config, private_key=private_key, inbox=inbox, commands=commands)
        delivery = Delivery(config, inbox)
        # TokenFile re-reads local-token when it changes: `token rotate` needs no restart.
        app = create_local_app(
            config=config,
            inbox=inbox,
            link_status=link.status,
            token=TokenFile(config.data_dir / TOKEN_FILE, initial=token),
            commands=link.commands,
            delivery=delivery,
        )
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=5.0)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        await web.SockSite(runner, bind_local(host, port)).start()
        await delivery.start()
        stack.push_async_callback(delivery.close)
        bound_port = int(runner.addresses[0][1])
        url = local_url(host, bound_port)
        _write_state(state_file, url, config.agent_id)
        stack.callback(_remove_state, state_file)
        log.info("agent.started", extra={"local_url": url, "agent_id": config.agent_id,
                                         "relay_url": config.relay_url})

        tasks = [
            asyncio.create_task(link.run(), name="link"),
            asyncio.create_task(_retention(inbox, RETENTION_INTERVAL), name="retention"),
        ]
        stopper = asyncio.create_task(stop.wait(), name="stop")
        try:
            done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (*tasks, stopper):
                task.cancel()
            await asyncio.gather(*tasks, stopper, return_exceptions=True)
        for task in done:
            if task is not stopper:
                task.result()  # re-raises the link's fatal refusal
        log.info("agent.stopping", extra={"agent_id": config.agent_id})


def _write_state(path: Path, url: str, agent_id: str) -> None:
    state = {"local_url": url, "pid": os.getpid(), "agent_id": agent_id}
    write_private_file(path, json.dumps(state) + "\n")


def _remove_state(path: Path) -> None:
    # Only our own file: a second agent on the same dir may have replaced it.
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass
