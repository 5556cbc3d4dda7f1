"""Link frame decoding: the typed, bounded decoder against the standard library's parser.

``python -m bench.frames [--seconds S]``

``frames.decode`` parses and checks every field against its limits (docs/protocol.md, Frame
limits) in one pass; ``json.loads`` only parses, with no checks, so it is a lower bound of
what the decoder before the limits cost (it parsed with ``json.loads``, then checked the
top-level fields by hand). Prints one row per message shape; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

from shared.link import frames


def _event(params: int, body: int) -> dict[str, Any]:
    return {
        "id": "ev-0123456789", "account": "acc_0123456789", "type": "call.arriving",
        "received_at": "2026-12-08T01:00:00.000Z",
        "params": {f"param_{i}": f"value {i}" for i in range(params)},
        "request": {"method": "POST", "path": "/call.arriving", "query": "",
                    "content_type": "application/json", "body_b64": "QUJD" * (body // 4)},
    }


def _shapes() -> dict[str, str]:
    typical = _event(12, 400)
    return {
        "ack": frames.encode(frames.Ack(seq=123_456_789)),
        "event (12 params, 400 B body)": frames.encode(frames.Event(seq=1, event=typical)),
        "events (100 of those)": frames.encode_events(
            [frames.encode_event_item(seq, typical) for seq in range(1, 101)]
        ),
        "event of 2 MiB (20,000 params)": frames.encode(
            frames.Event(seq=1, event=_event(20_000, 1_500_000))
        ),
    }


def _rate(parse: Callable[[str], object], text: str, seconds: float) -> float:
    """Mean seconds per call over about ``seconds`` of calls."""
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        parse(text)
        calls += 1
    return elapsed / calls


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.frames", description=__doc__)
    parser.add_argument("--seconds", type=float, default=1.0, help="per shape and parser")
    args = parser.parse_args()
    print(f"{'message':34} {'bytes':>9} {'frames.decode':>14} {'json.loads':>12}")
    for name, text in _shapes().items():
        typed = _rate(frames.decode, text, args.seconds)
        plain = _rate(json.loads, text, args.seconds)
        size = len(text.encode())
        print(f"{name:34} {size:9,d} {typed * 1e6:11.1f} µs {plain * 1e6:9.1f} µs")


if __name__ == "__main__":
    main()
