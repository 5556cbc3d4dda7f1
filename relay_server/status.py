"""Status items: which events are status events, and the item each one updates.

DESIGN §Link protocol, Status: "the relay keeps the latest value of each status item per account
and sends the snapshot on connect, then changes". An item is an event type plus the values of
its identifying params (``ServerConfig.status.types``); its value is the newest event's params.
Status events still travel the normal event stream as well; this only feeds the status cache.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping, Sequence

from .store.base import StatusItem, StoredEvent

__all__ = ["status_item", "item_key"]


def item_key(event_type: str, ids: Mapping[str, str]) -> str:
    """``messages.waiting?mailbox=201``: the type, then the identifying params in config order."""
    if not ids:
        return event_type
    return event_type + "?" + urllib.parse.urlencode(list(ids.items()))


def status_item(stored: StoredEvent, types: Mapping[str, Sequence[str]]) -> StatusItem | None:
    """The status item ``stored`` updates, or ``None`` when it is not a status event.

    A missing identifying param counts as empty, so a malformed event still lands on one
    well-defined item instead of being dropped (DESIGN principle 2: nothing silently lost).
    """
    event = stored.event
    id_names = types.get(event.type)
    if id_names is None:
        return None
    ids = {name: event.params.get(name, "") for name in id_names}
    return StatusItem(
        account_id=event.account,
        key=item_key(event.type, ids),
        type=event.type,
        ids=ids,
        params=dict(event.params),
        event_id=event.id,
        seq=stored.seq,
        received_at=event.received_at,
    )
