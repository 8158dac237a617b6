"""One rule for a device's timestamp, for every source, and a watch on the agent's own clock.

A device time within the tolerance of the agent's clock (``[input] max_future_skew_s``
ahead, ``max_event_age_s`` behind) becomes the event's ``ts``. Outside it the event is still
kept (a wrong clock is no reason to lose a customer's pickup) with the receive time as its
``ts``, and counted. But when many device times look "in the future" at once, the agent's
clock is the likelier culprit (a box that lost its RTC, NTP not yet synced): the alarm
``suspect_skew`` goes up with a WARNING, and events that agree with the observed skew keep
their device time. The receive time (``received_at``) is stored either way, so the store
can tell the two clocks apart later.

Pure: times come in as arguments; nothing here reads a clock or does I/O.
"""

from __future__ import annotations

import collections
import logging
import statistics
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

log = logging.getLogger(__name__)

# The calendar the agent can represent in UTC, with a day to spare on each side so that
# adding a tolerance to a moment never overflows (year 1 and 9999 are legal ISO dates).
EARLIEST: Final = datetime(1, 1, 2, tzinfo=UTC)
LATEST: Final = datetime(9999, 12, 30, tzinfo=UTC)
_WINDOW: Final = 64  # the last device times the skew alarm looks at
_EARLIEST_EPOCH_S: Final = EARLIEST.timestamp()
_LATEST_EPOCH_S: Final = LATEST.timestamp()


@dataclass(frozen=True, slots=True)
class ClockRules:
    future_tolerance_s: float = 24 * 3600.0
    past_tolerance_s: float = 30 * 24 * 3600.0
    skew_min_events: int = 10  # "many": at least this many of the window, and half of it


class DeviceClockJudge:
    """Picks each event's ``ts`` and keeps the clock-skew alarm; one per agent."""

    def __init__(self, rules: ClockRules | None = None) -> None:
        self.rules = rules or ClockRules()
        self.suspect_skew = False
        self.skew_s: float | None = None  # device clocks minus ours, median of the "future" ones
        self.replaced = collections.Counter[str]()  # device times not used, by direction
        self._recent: collections.deque[float] = collections.deque(maxlen=_WINDOW)

    def judge(self, device: datetime | None, received: datetime) -> datetime:
        """The moment to use as the event's ``ts``."""
        if device is None:
            return received
        offset = _seconds_between(device, received)
        self._recent.append(offset)
        self._update_alarm()
        rules = self.rules
        if -rules.past_tolerance_s <= offset <= rules.future_tolerance_s:
            return device
        if (
            self.suspect_skew
            and self.skew_s is not None
            and abs(offset - self.skew_s) <= rules.future_tolerance_s
        ):
            return device  # our clock is off, this device agrees with the others: keep it
        self.replaced["future" if offset > 0 else "past"] += 1
        return received

    def status(self) -> dict[str, dict[str, Any]]:
        return {
            "clock": {
                "suspect_skew": self.suspect_skew,
                "skew_s": None if self.skew_s is None else round(self.skew_s, 1),
                "device_time_replaced": sum(self.replaced.values()),
                "replaced_by_direction": dict(self.replaced),
                "future_tolerance_s": self.rules.future_tolerance_s,
            }
        }

    def _update_alarm(self) -> None:
        tolerance = self.rules.future_tolerance_s
        ahead = [offset for offset in self._recent if offset > tolerance]
        suspect = len(ahead) >= self.rules.skew_min_events and 2 * len(ahead) >= len(self._recent)
        self.skew_s = statistics.median(ahead) if suspect else None
        if suspect and not self.suspect_skew:
            log.warning(
                "clock.skew.suspected device_clocks_ahead_s=%.0f of_last=%d tolerance_s=%.0f "
                "(check NTP / the box's clock; events are kept with both times)",
                self.skew_s,
                len(self._recent),
                tolerance,
            )
        elif self.suspect_skew and not suspect:
            log.warning("clock.skew.cleared")
        self.suspect_skew = suspect


def _seconds_between(device: datetime, received: datetime) -> float:
    return (device - received) / timedelta(seconds=1)


def from_epoch(value: float) -> datetime | None:
    """A device's epoch number (seconds, or milliseconds above 1e11) as a moment, or None."""
    return _moment(value / 1000.0 if value > 1e11 else float(value))


def from_epoch_ms(value: int) -> datetime | None:
    """A serial device's milliseconds since the epoch; 0 means "no clock" (None)."""
    return None if value == 0 else _moment(value / 1000.0)


def _moment(seconds: float) -> datetime | None:
    if not _EARLIEST_EPOCH_S <= seconds <= _LATEST_EPOCH_S:  # also refuses NaN
        return None
    return datetime.fromtimestamp(seconds, UTC)
