"""The reference C codec against the Python codec: shared vectors, then a differential fuzz."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

import firmware_bridge
from firmware_bridge import codec, vectors
from firmware_bridge.codec import Frame, FrameDecoder, MessageType
from tests.support.services import missing_service

C_DIR = Path(firmware_bridge.__file__).parent / "c"
HARNESS = Path(__file__).with_name("c_harness.c")
DROP_ORDER = ("bad_cobs", "too_short", "bad_crc", "too_large")


# The codec itself must build clean under strict flags; the harness is only test code.
STRICT = [
    "-std=c99",
    "-O1",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-pedantic",
    "-Wconversion",
    "-Wsign-conversion",
    "-Wshadow",
    "-Wcast-qual",
]
RELAXED = ["-std=c99", "-O1", "-Wall", "-Werror"]
# Out-of-bounds reads or writes in the codec fail the run, not just corrupt it.
SANITIZERS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"]


def sanitizers_available(compiler: str, workdir: Path) -> bool:
    probe = workdir / "probe.c"
    probe.write_text("int main(void) { return 0; }\n")
    built = subprocess.run(
        [compiler, *SANITIZERS, str(probe), "-o", str(workdir / "probe")],
        check=False,
        capture_output=True,
        timeout=60,
    )
    return built.returncode == 0


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Path:
    compiler = shutil.which("cc")
    if compiler is None:
        missing_service("no C compiler (cc) on PATH: the C codec cannot be checked")
    workdir = tmp_path_factory.mktemp("c")
    extra = SANITIZERS if sanitizers_available(compiler, workdir) else []
    codec_object = workdir / "edge_frame.o"
    binary = workdir / "harness"
    subprocess.run(
        [compiler, *STRICT, *extra, "-c", str(C_DIR / "edge_frame.c"), "-o", str(codec_object)],
        check=True,
        timeout=60,
    )
    subprocess.run(
        [
            compiler,
            *RELAXED,
            *extra,
            f"-I{C_DIR}",
            str(HARNESS),
            str(codec_object),
            "-o",
            str(binary),
        ],
        check=True,
        timeout=60,
    )
    return binary


def run(binary: Path, commands: list[str]) -> list[str]:
    done = subprocess.run(
        [str(binary)],
        env={**os.environ, "ASAN_OPTIONS": "detect_leaks=0"},
        input="\n".join(commands) + "\n",
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return done.stdout.splitlines()


def decode_in_c(binary: Path, streams: list[bytes]) -> list[tuple[list[str], dict[str, int]]]:
    lines = iter(run(binary, [f"D {stream.hex() or '-'}" for stream in streams]))
    results = []
    for _ in streams:
        frames = []
        for line in lines:
            if line.startswith("X "):
                counts = [int(n) for n in line.split()[1:]]
                drops = {k: n for k, n in zip(DROP_ORDER, counts, strict=True) if n}
                break
            frames.append(line)
        results.append((frames, drops))
    return results


def frame_line(frame: dict[str, Any] | Frame) -> str:
    if isinstance(frame, Frame):
        v, t, f, b, s, p = (
            frame.version,
            int(frame.type),
            frame.flags,
            frame.boot_id,
            frame.seq,
            frame.payload.hex(),
        )
    else:
        v, t, f, b, s, p = (
            frame["version"],
            frame["type"],
            frame["flags"],
            frame["boot_id"],
            frame["seq"],
            frame["payload_hex"],
        )
    return f"F {v} {t} {f} {b} {s} {p or '-'}"


def test_vectors_file_is_up_to_date() -> None:
    assert vectors.VECTORS_PATH.read_text("utf-8") == vectors.render()


def test_c_encodes_like_python(harness: Path) -> None:
    cases = json.loads(vectors.VECTORS_PATH.read_text("utf-8"))["frames"]
    commands = [
        f"E {c['version']} {c['type']} {c['flags']} {c['boot_id']} {c['seq']} "
        f"{c['payload_hex'] or '-'}"
        for c in cases
    ]
    assert run(harness, commands) == [c["wire_hex"] for c in cases]


def test_c_decodes_like_python(harness: Path) -> None:
    doc = json.loads(vectors.VECTORS_PATH.read_text("utf-8"))
    streams = [bytes.fromhex(c["wire_hex"]) for c in doc["frames"]]
    streams += [bytes.fromhex(s["wire_hex"]) for s in doc["streams"]]
    expected: list[tuple[list[str], dict[str, int]]]
    expected = [([frame_line(c)], {}) for c in doc["frames"]]
    expected += [([frame_line(f) for f in s["frames"]], s["drops"]) for s in doc["streams"]]
    assert decode_in_c(harness, streams) == expected


def test_c_payload_helpers_match_python(harness: Path) -> None:
    payloads = json.loads(vectors.VECTORS_PATH.read_text("utf-8"))["payloads"]
    commands, expected = [], []
    for p in payloads:
        f = p.get("fields", {})
        if p["kind"] == "hello":
            commands.append(f"HELLO {f['min']} {f['max']} {f['caps']} {f['device_id']} {f['fw']}")
            expected.append(p["hex"])
        elif p["kind"] == "event":
            commands.append(f"EVENT {f['type']} {f['customer_id'] or '-'} {f['ts_ms']} {p['json']}")
            expected.append(p["hex"])
        elif p["kind"] == "result":
            commands.append(f"RESULT {f['boot_id']} {f['seq']} {f['status']} {f['detail']}")
            expected.append(p["hex"])
        elif p["kind"] == "ack":
            commands.append(f"ACK {p['hex']}")
            expected.append(f"{f['boot_id']} {f['seq']}")
        elif p["kind"] == "nack":
            commands.append(f"NACK {p['hex']}")
            expected.append(f"{f['boot_id']} {f['seq']} {f['reason']} {f['text']}")
        else:
            commands.append(f"CMD {p['hex']}")
            expected.append(p["text"])
    assert run(harness, commands) == expected


def test_c_and_python_agree_on_random_streams(harness: Path) -> None:
    rng = random.Random(20261122)
    streams = []
    for _ in range(150):
        parts = []
        for _ in range(rng.randrange(0, 5)):
            frame = Frame(
                MessageType(rng.randrange(1, 10)),
                rng.getrandbits(32),
                rng.getrandbits(32),
                rng.randbytes(rng.randrange(0, 300)),
            )
            wire = codec.encode(frame)
            if rng.random() < 0.4:  # corrupt, cut or pad it
                at = rng.randrange(len(wire))
                wire = wire[:at] + rng.randbytes(rng.randrange(0, 8)) + wire[at + 1 :]
            parts.append(wire)
            if rng.random() < 0.3:
                parts.append(rng.randbytes(rng.randrange(1, 700)))
        streams.append(b"".join(parts))
    python = []
    for stream in streams:
        decoder = FrameDecoder()
        python.append(([frame_line(f) for f in decoder.feed(stream)], dict(decoder.drops)))
    assert decode_in_c(harness, streams) == python
