"""``python -m relay_agent`` is ``xon-relay-agent``."""

import sys

from .cli import main

sys.exit(main())
