"""sd_notify without a dependency: READY, STOPPING, WATCHDOG and STATUS to systemd.

The protocol is one datagram to the socket named in NOTIFY_SOCKET (a path, or an abstract
name starting with '@'); outside systemd the variable is unset and every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(state: str) -> bool:
    """Send ``state`` (e.g. "READY=1") to systemd; False when not run by systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode("utf-8"))
    except OSError as exc:
        log.warning("systemd.notify.failed state=%s error=%r", state.split("=", maxsplit=1)[0], exc)
        return False
    return True


def watchdog_interval_s() -> float | None:
    """Half the watchdog timeout systemd set for this process, or None without a watchdog."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(int(usec) / 2_000_000, 0.05)
    except ValueError:
        return None
