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
from datetime import UTC, datetime
from typing import Any, Final

log = logging.getLogger(__name__)

# The calendar the agent can represent in UTC, with a day to spare on each side so that
# adding a tolerance to a moment never overflows (year 1 and 9999 are legal ISO dates).
EARLIEST: Final = datetime(1, 1, 2, tzinfo=UTC)
LATEST: Final = datetime(9999, 12, 30, tzinfo=UTC)
_WINDOW: Final = 64  # the last device times the skew alarm looks at
_MEDIAN_EVERY: Final = 16  # events between two medians of the skew while the alarm is up
_EARLIEST_EPOCH_S: Final = EARLIEST.timestamp()
_LATEST_EPOCH_S: Final = LATEST.timestamp()


@dataclass(frozen=True, slots=True)
class ClockRules:
    future_tolerance_s: float = 24 * 3600.0
    past_tolerance_s: float = 30 * 24 * 3600.0
    skew_min_events: int = 10  # "many": at least this many of the window, and half of it


class DeviceClockJudge:
    """Picks each event's ``ts`` and keeps the clock-skew alarm; one per agent.

    On the hot path: O(1) per event (a running count of the "ahead" ones); the median skew
    is computed only while the alarm is up, at most every ``_MEDIAN_EVERY`` events.
    """

    def __init__(self, rules: ClockRules | None = None) -> None:
        self.rules = rules or ClockRules()
        self.suspect_skew = False
        self.replaced = collections.Counter[str]()  # device times not used, by direction
        self._recent: collections.deque[float] = collections.deque(maxlen=_WINDOW)
        self._ahead = 0  # entries of _recent ahead beyond the tolerance
        self._skew: float | None = None
        self._skew_age = 0

    @property
    def skew_s(self) -> float | None:
        """Device clocks minus ours (median of the "ahead" ones) while the alarm is up."""
        if not self.suspect_skew:
            return None
        if self._skew is None or self._skew_age >= _MEDIAN_EVERY:
            tolerance = self.rules.future_tolerance_s
            self._skew = statistics.median(o for o in self._recent if o > tolerance)
            self._skew_age = 0
        return self._skew

    def judge(self, device: datetime | None, received: datetime) -> datetime:
        """The moment to use as the event's ``ts``."""
        if device is None:
            return received
        offset = _seconds_between(device, received)
        self._record(offset)
        rules = self.rules
        if -rules.past_tolerance_s <= offset <= rules.future_tolerance_s:
            return device
        skew = self.skew_s
        if skew is not None and abs(offset - skew) <= rules.future_tolerance_s:
            return device  # our clock is off, this device agrees with the others: keep it
        self.replaced["future" if offset > 0 else "past"] += 1
        return received

    def status(self) -> dict[str, dict[str, Any]]:
        skew = self.skew_s
        return {
            "clock": {
                "suspect_skew": self.suspect_skew,
                "skew_s": None if skew is None else round(skew, 1),
                "device_time_replaced": sum(self.replaced.values()),
                "replaced_by_direction": dict(self.replaced),
                "future_tolerance_s": self.rules.future_tolerance_s,
            }
        }

    def _record(self, offset: float) -> None:
        tolerance = self.rules.future_tolerance_s
        recent = self._recent
        if len(recent) == recent.maxlen and recent[0] > tolerance:
            self._ahead -= 1  # about to fall out of the window
        recent.append(offset)
        if offset > tolerance:
            self._ahead += 1
        self._skew_age += 1
        suspect = self._ahead >= self.rules.skew_min_events and 2 * self._ahead >= len(recent)
        if suspect == self.suspect_skew:
            return
        self.suspect_skew = suspect
        self._skew = None
        if suspect:
            log.warning(
                "clock.skew.suspected device_clocks_ahead_s=%.0f of_last=%d tolerance_s=%.0f "
                "(check NTP / the box's clock; events are kept with both times)",
                self.skew_s or 0.0,
                len(recent),
                tolerance,
            )
        else:
            log.warning("clock.skew.cleared")


def _seconds_between(device: datetime, received: datetime) -> float:
    return (device - received).total_seconds()


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
