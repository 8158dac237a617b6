"""Child processes of the demo (the central store, the serial shelf), always cleaned up."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from pathlib import Path

from edge_agent.errors import DemoError

log = logging.getLogger(__name__)


async def run_command(*args: str) -> str:
    """Run a short command of this installation; return its stdout; raise on failure."""
    process = await asyncio.create_subprocess_exec(
        *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), 60)
    except TimeoutError as exc:
        process.kill()
        await process.wait()
        raise DemoError(f"{' '.join(args[:4])} did not finish within 60 s") from exc
    except asyncio.CancelledError:  # Ctrl-C or SIGTERM during start-up: leave nothing behind
        if process.returncode is None:
            process.kill()
            await asyncio.shield(process.wait())
        raise
    if process.returncode != 0:
        raise DemoError(f"{' '.join(args[:4])} failed: {err.decode(errors='replace')[-500:]}")
    return out.decode()


class ChildProcess:
    """A long-running child whose first stdout line says where it is; stopped on exit."""

    def __init__(self, name: str, argv: list[str], log_path: Path) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.process: asyncio.subprocess.Process | None = None

    async def start(self, first_line_timeout: float = 30.0) -> str:
        with self.log_path.open("ab") as log_file:  # the child keeps its own descriptor
            self.process = await asyncio.create_subprocess_exec(
                *self.argv, stdout=subprocess.PIPE, stderr=log_file
            )
        assert self.process.stdout is not None
        try:
            line = await asyncio.wait_for(self.process.stdout.readline(), first_line_timeout)
        except TimeoutError as exc:
            raise DemoError(
                f"{self.name} did not start within {first_line_timeout:.0f} s; see {self.log_path}"
            ) from exc
        if not line:
            raise DemoError(f"{self.name} exited at start; see {self.log_path}")
        return line.decode().strip()

    async def stop(self, grace_s: float = 10.0) -> None:
        process = self.process
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), grace_s)
        except TimeoutError:
            log.warning("demo.child.killed name=%s", self.name)
            process.kill()
            await process.wait()


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]
