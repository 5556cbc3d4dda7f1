"""The single-file agent's entry point: ``xon-relay-agent`` (packaging/agent.spec)."""

import sys

from relay_agent.cli import main

sys.exit(main())
