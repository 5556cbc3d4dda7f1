"""Test time unit: every timeout in the tests is a multiple of MS, scaled on slow machines."""

from __future__ import annotations

import os

FACTOR = float(os.environ.get("XON_TESTS_TIMEOUT_FACTOR", "1"))
MS = 0.001 * FACTOR
"""One millisecond, scaled by XON_TESTS_TIMEOUT_FACTOR."""
