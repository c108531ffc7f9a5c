"""Tools around nbd-hotplug that are not the agent: test guest, demo, benchmarks."""
