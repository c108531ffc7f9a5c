"""Tiny throw-away Linux guest for hot-plug tests.

``build`` assembles a kernel + busybox initramfs from Debian packages (cached),
``vm`` boots it under QEMU and exposes a command channel (trio-async), and
``qmp`` is a minimal trio QMP client.  ``selftest`` exercises all of it.
"""
