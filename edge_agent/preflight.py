"""What ``check-config`` can check of the machine, beyond the config itself.

Each finding is a warning, not an error: the config may be prepared on another machine,
a USB device may be plugged in later, the broker may come up after the agent (which
retries). ``run`` would meet these at start; here they are named before it.
"""

from __future__ import annotations

import concurrent.futures
import os
import socket
from pathlib import Path
from typing import Final

from edge_agent.config import Config

RESOLVE_TIMEOUT_S: Final = 3.0


def environment_warnings(config: Config) -> list[str]:
    """One sentence per problem found, naming the config key it concerns."""
    warnings = _data_dir_warnings(config.data_dir)
    for index, port in enumerate(config.serial.ports):
        if "://" in port.url:  # a pyserial URL (socket://, rfc2217://): nothing to look at
            continue
        if not Path(port.url).exists():
            warnings.append(
                f"serial.ports[{index}].url: {port.url} does not exist (not plugged in?)"
            )
    problem = _unresolvable(config.mqtt.host)
    if problem:
        warnings.append(f"mqtt.host: {config.mqtt.host} cannot be resolved: {problem}")
    return warnings


def _data_dir_warnings(data_dir: Path) -> list[str]:
    # The nearest existing ancestor decides: the agent creates what is missing below it.
    existing = data_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return [f"agent.data_dir: {existing} is not a directory"]
    if not os.access(existing, os.W_OK | os.X_OK):
        whose = "it" if existing == data_dir else f"{existing}, where it would be created,"
        return [f"agent.data_dir: {data_dir}: {whose} is not writable by this user"]
    return []


def _unresolvable(host: str) -> str:
    """Why ``host`` does not resolve ("" when it does); bounded by RESOLVE_TIMEOUT_S."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        pool.submit(socket.getaddrinfo, host, None).result(RESOLVE_TIMEOUT_S)
    except socket.gaierror as exc:
        return str(exc.strerror or exc)
    except concurrent.futures.TimeoutError:
        return f"no answer within {RESOLVE_TIMEOUT_S:.0f} s"
    except (OSError, UnicodeError) as exc:
        return str(exc)
    finally:
        pool.shutdown(wait=False)  # a resolver stuck past the timeout is left behind
    return ""
