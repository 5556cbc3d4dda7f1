"""The X-on platform simulator: an example event catalogue, request builders, a sender, a demo."""

from __future__ import annotations

from .catalogue import CATALOGUE, EVENT_TYPES, EventSpec, example_params
from .encode import ENCODINGS, Encoding, SimRequest, build_request, params_as_sent
from .send import Planned, SendResult, plan, request_url, send_requests

__all__ = [
    "CATALOGUE",
    "EVENT_TYPES",
    "EventSpec",
    "example_params",
    "ENCODINGS",
    "Encoding",
    "SimRequest",
    "build_request",
    "params_as_sent",
    "Planned",
    "SendResult",
    "plan",
    "request_url",
    "send_requests",
]
