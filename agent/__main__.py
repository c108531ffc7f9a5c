"""``python -m agent``: the same as the ``nbd-hotplug`` command."""

from agent.cli import main

raise SystemExit(main())
