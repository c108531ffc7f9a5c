"""nbd-hotplug: hot-plug nbdkit-backed disks into a running QEMU and keep them alive.

Architecture, one module per concept (data flows top to bottom)::

    cli        entry point: ``serve`` and the client sub-commands
    client     a control-socket client (the CLI's, and scripts')
    daemon     wires the actors in one nursery, owns the disk table and shutdown
    server     the JSON-lines control socket (connections, dispatch, events out)
    protocol   wire models: requests, replies, events, line framing
    hotplug    QEMU-side steps: blockdev-add / device_add / removal, with rollback
    supervisor one nbdkit per disk: start, readiness, health, restart, backoff
    nbdkit     argv building and validation, socket-activated spawn, the keeper
    sandbox    confinement layers: detection, bubblewrap/setpriv wrapper, seccomp
    nbd        a minimal NBD client for readiness and health probes
    qmp        the asyncio fence: qemu.qmp behind a small trio interface
    config     frozen configuration
    errors     the error tree and its machine-readable codes
    logs       structlog set-up
"""

__version__ = "0.1.0"
