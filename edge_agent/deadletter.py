"""Poison messages are dead-lettered, never looped: a durable receive count per message.

A message the process dies while handling (a bug no guard catches: a crash in C code, the
OOM killer, a hang the watchdog ends) is redelivered by the broker after the restart, and
would kill the agent again, forever. So before a burst is handled, the fingerprints of its
messages are appended to a small journal in ``data_dir``; after its PUBACKs, an end mark.
At the next start, every fingerprint of a burst without an end mark gets one more death in
a counts file. A redelivered message with deaths is handled alone (so that its next death
blames no neighbour); with ``[input] poison_max_deaths`` deaths it is quarantined with the
reason ``poison`` and acknowledged.

The journal is written without fsync: a process crash does not lose what ``write()`` put in
the page cache, and a power cut is not a poison message. Two appends per burst, measured in
README "Durability" (poison messages).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Final

log = logging.getLogger(__name__)

_COMPACT_BYTES: Final = 1024 * 1024  # rewrite the journal beyond this
_MAX_REMEMBERED: Final = 10_000  # counts kept for messages not seen again (oldest go)


def fingerprint(topic: str, payload: bytes) -> str:
    """The identity of a redelivered message: same topic, same bytes."""
    digest = hashlib.blake2b(payload, digest_size=16, person=b"edge-deadletter")
    digest.update(b"\0" + topic.encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


class HandlingJournal:
    """One per source. Not thread-safe: used on the event loop only."""

    def __init__(self, directory: Path, name: str, max_deaths: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.max_deaths = max_deaths
        self._journal_path = directory / f"{name}.journal"
        self._counts_path = directory / f"{name}.deaths.json"
        self.deaths: dict[str, int] = self._load_counts()
        died = self._count_unfinished()
        if died:
            log.warning(
                "deadletter.deaths.recorded source=%s messages=%d (the agent stopped while "
                "handling them; each is handled alone when redelivered, dead-lettered after "
                "%d deaths)",
                name,
                died,
                max_deaths,
            )
            self._save_counts()
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND  # append even after truncation
        self._fd = os.open(self._journal_path, flags, 0o640)
        self._size = 0
        self._write_failed = False
        self._open: dict[int, str] = {}  # batch id -> its B line, for compaction
        self._next_id = 0

    def verdict(self, fp: str | None) -> int:
        """Deaths while handling this message so far (0: never)."""
        return 0 if fp is None else self.deaths.get(fp, 0)

    def is_poison(self, fp: str | None) -> bool:
        return self.verdict(fp) >= self.max_deaths

    def begin(self, fps: Iterable[str | None]) -> int:
        """Record a burst as in hand, before handling it; returns its id for ``end``."""
        batch = self._next_id
        self._next_id += 1
        marks = " ".join(fp for fp in fps if fp is not None)
        if marks:
            line = f"B {batch} {marks}\n"
            self._append(line)
            self._open[batch] = line
        return batch

    def end(self, batch: int, fps: Iterable[str | None]) -> None:
        """The burst is acknowledged: it can no longer come back."""
        if batch not in self._open:
            return
        del self._open[batch]
        self._append(f"E {batch}\n")
        settled = [fp for fp in fps if fp is not None and fp in self.deaths]
        if settled:  # a suspect survived (or a poison one was dead-lettered): forget it
            for fp in settled:
                del self.deaths[fp]
            self._save_counts()
        if self._size > _COMPACT_BYTES:
            # Under steady load bursts overlap and the journal is never idle: keep only
            # what is in hand (a crash inside these two calls forgets one death, no more).
            os.ftruncate(self._fd, 0)
            self._size = 0
            self._append("".join(self._open.values()))

    def abandon(self) -> None:
        """The source restarts in this process: what it held comes back, not as a death."""
        for batch in sorted(self._open):
            self._append(f"E {batch}\n")
        self._open.clear()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)

    # ---- files ---------------------------------------------------------------------

    def _append(self, line: str) -> None:
        data = line.encode("ascii")
        try:
            os.write(self._fd, data)
        except OSError as exc:
            # A full disk must not stop input on top of what the buffer does about it: a
            # mark lost costs at most one uncounted death.
            if not self._write_failed:
                log.warning(
                    "deadletter.journal.write_failed path=%s error=%r", self._journal_path, exc
                )
            self._write_failed = True
            return
        self._write_failed = False
        self._size += len(data)

    def _count_unfinished(self) -> int:
        try:
            text = self._journal_path.read_text("ascii", errors="replace")
        except FileNotFoundError:
            return 0
        begun: dict[str, list[str]] = {}
        for line in text.splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "B":
                begun[parts[1]] = parts[2:]
            elif len(parts) == 2 and parts[0] == "E":
                begun.pop(parts[1], None)
        unfinished = {fp for fps in begun.values() for fp in fps if len(fp) == 32}
        for fp in unfinished:
            self.deaths[fp] = self.deaths.pop(fp, 0) + 1  # re-inserted: newest last
        while len(self.deaths) > _MAX_REMEMBERED:
            del self.deaths[next(iter(self.deaths))]
        return len(unfinished)

    def _load_counts(self) -> dict[str, int]:
        try:
            document = json.loads(self._counts_path.read_text("utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:  # damaged: start over rather than stop the agent
            log.warning("deadletter.counts.unreadable path=%s error=%r", self._counts_path, exc)
            return {}
        if not isinstance(document, dict):
            return {}
        return {
            str(fp): deaths
            for fp, deaths in document.items()
            if isinstance(deaths, int) and not isinstance(deaths, bool) and deaths > 0
        }

    def _save_counts(self) -> None:
        # Rare (a start after a death, a suspect settled): atomic and durable.
        temporary = self._counts_path.with_suffix(".tmp")
        try:
            with temporary.open("w", encoding="utf-8") as handle:
                json.dump(self.deaths, handle)
                handle.flush()
                os.fsync(handle.fileno())
            temporary.replace(self._counts_path)
        except OSError as exc:  # a full disk: the counts live on in memory for this run
            log.warning("deadletter.counts.write_failed path=%s error=%r", self._counts_path, exc)
