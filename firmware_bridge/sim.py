"""``firmware-sim``: a simulated serial device on a pseudo-terminal.

The first line of stdout is a stable path to the device: a symlink to the current
``/dev/pts/N`` (like ``/dev/serial/by-id/...`` for a USB device). "Vanish and come back"
is an unplug: the pty is closed (the reader sees end of file), the symlink removed, and after
a while a new pty appears behind the same symlink, as udev does for a replugged device.
The last line of stdout is a JSON summary. Exit 0: every event acknowledged (or the run
ended by time/SIGTERM without ``--events``); 1: timed out; 3: the agent refused our protocol;
4: all settled, but the agent NACKed (quarantined) some.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import random
import select
import signal
import sys
import tempfile
import time
import tty
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from edge_agent import __version__
from firmware_bridge import codec
from firmware_bridge.codec import Frame, FrameDecoder
from firmware_bridge.sim_device import SimulatedDevice

logger = logging.getLogger(__name__)


class PtyEndpoint:
    """The master side of a pty, published at a stable symlink that survives a replug."""

    def __init__(self, link: Path) -> None:
        self.link = link
        self.fd = -1
        self.pts = ""
        self.vanished = 0

    def appear(self) -> None:
        master, slave = os.openpty()
        tty.setraw(slave)  # raw stays with the pty: no echo, no line editing, 8 bit clean
        self.pts = os.ttyname(slave)
        os.close(slave)  # the master now reports POLLHUP until a reader opens the slave
        os.set_blocking(master, False)
        self.fd = master
        tmp = self.link.with_name(self.link.name + ".new")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(self.pts)
        tmp.replace(self.link)  # atomic: a reader never sees a half-made link

    def vanish(self) -> None:
        self.vanished += 1
        self.close()

    def close(self) -> None:
        self.link.unlink(missing_ok=True)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _poll(self, timeout_ms: int) -> int:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        ready = poller.poll(timeout_ms)
        return ready[0][1] if ready else 0

    def wait_readable(self, timeout_s: float) -> tuple[bool, bool]:
        """(data to read, reader present) after waiting at most ``timeout_s``.

        After the reader closes, what it wrote last (ACKs) can still be read: POLLIN and
        POLLHUP come together until it is drained.
        """
        events = self._poll(int(timeout_s * 1000))
        hung_up = bool(events & select.POLLHUP)
        if hung_up and not events & select.POLLIN:
            time.sleep(timeout_s)  # POLLHUP is level-triggered: don't spin while unplugged
        return bool(events & select.POLLIN), not hung_up

    def read(self) -> bytes:
        try:
            return os.read(self.fd, 4096)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EIO):
                return b""
            raise

    def write(self, data: bytes) -> int:
        try:
            return os.write(self.fd, data)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EIO):
                return 0
            raise


@dataclass
class Faults:
    noise: float
    drop_bytes: float
    stall_after: int
    stall_for: float
    vanish_after: int
    vanish_for: float
    reboot_after: int
    oversize: float = 0.0
    noise_bytes: int = 0
    dropped_bytes: int = 0

    def mangle(self, wire: bytes, rng: random.Random) -> bytes:
        """Noise between or inside a frame, or a lost byte, each with its probability."""
        if self.drop_bytes and rng.random() < self.drop_bytes:
            cut = rng.randrange(len(wire))
            wire = wire[:cut] + wire[cut + 1 :]
            self.dropped_bytes += 1
        if self.noise and rng.random() < self.noise:
            burst = rng.randbytes(rng.randrange(1, 33))
            self.noise_bytes += len(burst)
            at = 0 if rng.random() < 0.5 else rng.randrange(len(wire))
            wire = wire[:at] + burst + wire[at:]
        if self.oversize and rng.random() < self.oversize:
            # A run longer than any frame with no delimiter: the receiver must skip it whole.
            blob = bytes(rng.randrange(1, 256) for _ in range(codec.MAX_ENCODED + 64))
            self.noise_bytes += len(blob)
            wire = blob + b"\x00" + wire
        return wire


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="firmware-sim", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=__version__)
    parser.add_argument("--device-id", default="sim-01")
    parser.add_argument("--events", type=int, default=0, help="send N events, exit when acked")
    parser.add_argument("--rate", type=float, default=50.0, help="events per second (0: max)")
    parser.add_argument("--window", type=int, default=32, help="unacknowledged events held")
    parser.add_argument("--telemetry", type=float, default=0.0, help="telemetry every S (0 off)")
    parser.add_argument("--retransmit", type=float, default=0.5, help="resend unacked after S")
    parser.add_argument("--noise", type=float, default=0.0, help="per-frame noise probability")
    parser.add_argument("--drop-bytes", type=float, default=0.0, help="per-frame byte loss p")
    parser.add_argument("--oversize", type=float, default=0.0, help="per-frame p of a huge run")
    parser.add_argument("--stall-after", type=int, default=0, help="stall after N events")
    parser.add_argument("--stall-for", type=float, default=2.0)
    parser.add_argument("--vanish-after", type=int, default=0, help="unplug after N events")
    parser.add_argument("--vanish-for", type=float, default=1.0)
    parser.add_argument("--reboot-after", type=int, default=0, help="reboot after N events")
    parser.add_argument("--proto-min", type=int, default=codec.PROTOCOL_MIN)
    parser.add_argument("--proto-max", type=int, default=codec.PROTOCOL_MAX)
    parser.add_argument("--link", type=Path, help="symlink path (default: in a temp dir)")
    parser.add_argument("--timeout", type=float, default=60.0, help="give up after S (0: never)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--log-level", default="WARNING")
    return parser.parse_args(argv)


class _Stop:
    requested = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr)
    rng = random.Random(args.seed)
    device = SimulatedDevice(
        args.device_id,
        rng,
        proto_min=args.proto_min,
        proto_max=args.proto_max,
        retransmit_s=args.retransmit,
    )
    faults = Faults(
        args.noise,
        args.drop_bytes,
        args.stall_after,
        args.stall_for,
        args.vanish_after,
        args.vanish_for,
        args.reboot_after,
        args.oversize,
    )
    with contextlib.ExitStack() as stack:
        link = args.link
        if link is None:
            link = Path(stack.enter_context(tempfile.TemporaryDirectory())) / args.device_id
        pty = PtyEndpoint(link.absolute())
        stack.callback(pty.close)
        pty.appear()
        print(pty.link, flush=True)
        stop = _Stop()
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        code = _run(args, device=device, faults=faults, pty=pty, rng=rng, stop=stop)
        summary = {
            "device_id": args.device_id,
            "ok": code == 0,
            "events": device.counters.events_sent,
            "acked": device.counters.acked,
            "nacked": device.counters.nacked,
            "telemetry": device.counters.telemetry_sent,
            "retransmissions": device.counters.retransmissions,
            "commands": device.counters.commands,
            "shown": device.counters.shown,
            "reboots": device.counters.reboots,
            "boot_ids": [f"{boot:08x}" for boot in device.boot_ids],
            "vanished": pty.vanished,
            "noise_bytes": faults.noise_bytes,
            "dropped_bytes": faults.dropped_bytes,
            "refused": device.refused,
            "pts": pty.pts,
        }
        print(json.dumps(summary), flush=True)
        return code


def _run(
    args: argparse.Namespace,
    *,
    device: SimulatedDevice,
    faults: Faults,
    pty: PtyEndpoint,
    rng: random.Random,
    stop: _Stop,
) -> int:
    started = time.monotonic()
    deadline = started + args.timeout if args.timeout > 0 else float("inf")
    decoder = FrameDecoder(range(1, 256))  # the device checks versions itself
    outgoing = bytearray()
    next_event = next_telemetry = 0.0
    while not stop.requested:
        now = time.monotonic()
        if now >= deadline:
            logger.warning("sim.timeout acked=%d", device.counters.acked)
            return 1
        if device.refused is not None and args.events:
            return 3
        if args.events and device.counters.events_sent >= args.events and not device.in_flight:
            return 0 if not device.counters.nacked else 4  # 4: the agent quarantined some
        readable, present = pty.wait_readable(0.01 if outgoing else 0.005)
        if readable:
            for frame in decoder.feed(pty.read()):
                _queue(outgoing, device.receive(frame), faults, rng)
        if not present:
            outgoing.clear()  # nobody is listening; unacked events are resent later
            continue
        _queue(outgoing, device.due(now), faults, rng)
        wanted = not args.events or device.counters.events_sent < args.events
        if wanted and device.ready and now >= next_event and device.in_flight < args.window:
            _queue(outgoing, [device.shopper_event(now)], faults, rng)
            next_event = now + (1.0 / args.rate if args.rate > 0 else 0.0)
            _inject(device, faults, pty)
        if device.ready and args.telemetry > 0 and now >= next_telemetry:
            _queue(outgoing, [device.telemetry(now)], faults, rng)
            next_telemetry = now + args.telemetry
        if outgoing:
            del outgoing[: pty.write(bytes(outgoing))]
    return 0


def _queue(outgoing: bytearray, frames: list[Frame], faults: Faults, rng: random.Random) -> None:
    for frame in frames:
        outgoing += faults.mangle(codec.encode(frame), rng)


def _inject(device: SimulatedDevice, faults: Faults, pty: PtyEndpoint) -> None:
    """One-shot faults, triggered by the number of events sent so far."""
    sent = device.counters.events_sent
    if sent == faults.stall_after:
        logger.warning("sim.stall seconds=%.1f", faults.stall_for)
        time.sleep(faults.stall_for)
    if sent == faults.vanish_after:
        logger.warning("sim.vanish seconds=%.1f", faults.vanish_for)
        pty.vanish()
        time.sleep(faults.vanish_for)
        pty.appear()
    if sent == faults.reboot_after:
        logger.warning("sim.reboot")
        device.reboot()


if __name__ == "__main__":
    raise SystemExit(main())
