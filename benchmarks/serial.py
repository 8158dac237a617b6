"""Benchmark the serial path (not a test; prints figures).

    .venv/bin/python benchmarks/serial.py [--frames 20000] [--runs 3]

Three measurements, each the median of ``--runs``:
- decoder: ``FrameDecoder.feed`` over a stream of realistic EVENT frames in 4 KiB chunks,
  against a plain ``bytes.split(b"\\0")`` of the same stream in the same run (the ratio is the
  codec's overhead: COBS, CRC-32, header);
- pty, full speed: a writer thread floods a real pty with the same frames; the agent's
  ``SerialSource`` decodes, maps, "commits" through a trivial emit and ACKs them;
- pty, 115200 baud: the same, the writer paced at 11,520 bytes/s (a pty has no baud rate of
  its own, so the writer paces itself the way a UART would).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import select
import statistics
import sys
import threading
import time
import tty
from collections.abc import Sequence
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and this file, being named
# serial.py, would shadow pyserial's ``serial``: take the folder off before importing it.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _HERE]

from benchmarks.figures import Figures, add_png_argument  # noqa: E402
from edge_agent.events import Event, Rejected  # noqa: E402
from firmware_bridge import codec  # noqa: E402
from firmware_bridge.codec import Frame, FrameDecoder, MessageType  # noqa: E402
from firmware_bridge.messages import EventMessage, Hello  # noqa: E402
from firmware_bridge.serial_source import SerialPortConfig, SerialSource  # noqa: E402

BOOT = 0x5EED


def event_frames(count: int) -> list[bytes]:
    frames = []
    for seq in range(2, count + 2):
        data = {"sku": f"SKU-{seq % 5000:06d}", "weight_g": 100 + seq % 900, "shelf": "s-07-2"}
        message = EventMessage("product.pickup", f"c-{seq % 997:06d}", 1795852800000 + seq, data)
        frames.append(codec.encode(Frame(MessageType.EVENT, BOOT, seq, message.encode())))
    return frames


def bench_decoder(stream: bytes, runs: int) -> tuple[float, float]:
    chunks = [stream[i : i + 4096] for i in range(0, len(stream), 4096)]
    codec_times, split_times = [], []
    expected = stream.count(0)
    for _ in range(runs):
        decoder = FrameDecoder()
        started = time.perf_counter()
        decoded = sum(len(decoder.feed(chunk)) for chunk in chunks)
        codec_times.append(time.perf_counter() - started)
        assert decoded == expected, (decoded, expected)
        started = time.perf_counter()
        parts = stream.split(b"\0")
        split_times.append(time.perf_counter() - started)
        assert len(parts) - 1 == expected
    return expected / statistics.median(codec_times), expected / statistics.median(split_times)


def _writer(
    master: int,
    hello: bytes,
    frames: list[bytes],
    bytes_per_s: float | None,
    events: tuple[threading.Event, threading.Event, threading.Event],
) -> None:
    """Send HELLO once the port is open, then on the go the frames; discard the agent's ACKs."""
    ready, go, done = events
    ready.wait(10)  # written earlier, opening the port would flush it
    os.write(master, hello)
    go.wait(10)
    data = b"".join(frames)
    sent = 0
    started = time.perf_counter()
    poller = select.poll()
    poller.register(master, select.POLLIN | select.POLLOUT)
    while not done.is_set():
        for _, mask in poller.poll(50):
            if mask & select.POLLIN:
                with contextlib.suppress(BlockingIOError):
                    os.read(master, 65536)  # ACKs
            if mask & select.POLLOUT and sent < len(data):
                budget = len(data) - sent
                if bytes_per_s is not None:
                    allowed = int((time.perf_counter() - started) * bytes_per_s) - sent
                    budget = min(budget, max(allowed, 0))
                if budget:
                    with contextlib.suppress(BlockingIOError):
                        sent += os.write(master, data[sent : sent + min(budget, 4096)])
        if bytes_per_s is not None and sent < len(data):
            time.sleep(0.005)


async def bench_pty(frames: list[bytes], bytes_per_s: float | None) -> float:
    master, slave = os.openpty()
    tty.setraw(slave)
    path = os.ttyname(slave)
    os.set_blocking(master, False)
    committed = 0
    finished = asyncio.Event()

    async def emit(items: Sequence[Event | Rejected]) -> None:
        nonlocal committed
        committed += len(items)
        if committed >= len(frames):
            finished.set()

    source = SerialSource(SerialPortConfig(url=path, store_id="bench", read_poll_s=0.05))
    task = asyncio.create_task(source.run(emit))
    hello = codec.encode(Frame(MessageType.HELLO, BOOT, 1, Hello("bench-1", "b", 1, 1).encode()))
    ready, go, done = threading.Event(), threading.Event(), threading.Event()
    thread = threading.Thread(
        target=_writer, args=(master, hello, frames, bytes_per_s, (ready, go, done)), daemon=True
    )
    thread.start()
    try:
        for _ in range(500):
            if source.stats.connected:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        ready.set()
        for _ in range(500):
            if source.device_id is not None:
                break
            await asyncio.sleep(0.01)
        started = time.perf_counter()
        go.set()
        if source.device_id is None:
            raise RuntimeError("the source never identified the benchmark device")
        await asyncio.wait_for(finished.wait(), 120)
        elapsed = time.perf_counter() - started
    finally:
        done.set()
        source.request_stop()
        await asyncio.wait_for(task, 10)
        thread.join(5)
        os.close(master)
        os.close(slave)
    return committed / elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--baud-seconds", type=float, default=3.0, help="length of a 115200 run")
    add_png_argument(parser)
    args = parser.parse_args()
    figures = Figures("Serial: frames per second (medians)", "frames/s", log_scale=True)
    frames = event_frames(args.frames)
    stream = b"".join(frames)
    mean_frame = len(stream) / len(frames)
    print(f"frames: {len(frames)}, mean {mean_frame:.0f} bytes on the wire")

    decoded, split = bench_decoder(stream, max(args.runs, 5))
    print(f"decoder alone:   {decoded:>10,.0f} frames/s ({decoded * mean_frame / 1e6:.1f} MB/s)")
    print(f"bytes.split:     {split:>10,.0f} chunks/s")
    print(f"ratio split/decoder: {split / decoded:.0f}x")
    figures.add("bytes.split(b'\\0') baseline", split)
    figures.add("decoder alone", decoded)

    full = [asyncio.run(bench_pty(frames, None)) for _ in range(args.runs)]
    print(f"pty, full speed: {statistics.median(full):>10,.0f} frames/s decoded+committed+acked")
    figures.add("pty full speed, committed+ACKed", statistics.median(full))

    uart_bytes_per_s = 115200 / 10  # 8N1: ten bits a byte
    count = int(args.baud_seconds * uart_bytes_per_s / mean_frame)
    paced = [asyncio.run(bench_pty(frames[:count], uart_bytes_per_s)) for _ in range(args.runs)]
    line_rate = uart_bytes_per_s / mean_frame
    print(
        f"pty, 115200 8N1: {statistics.median(paced):>10,.0f} frames/s "
        f"(line limit {line_rate:.0f} frames/s)"
    )
    figures.add("pty at 115200 baud", statistics.median(paced))
    if args.png:
        figures.write_png(args.png)


if __name__ == "__main__":
    main()
