"""``deploy/install.sh`` in a throwaway root: a temporary directory stands in for ``/``.

The commands that would change this machine (getent, useradd, chown, systemctl) are
recording fakes first on PATH, and the script runs with ``--root``: nothing outside the
temporary directory is touched. To stay fast the package is a wheel built once, installed
``--no-deps``; its dependencies come from this interpreter's site-packages via PYTHONPATH
(the script does the full install in production).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.support.services import missing_service

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "deploy" / "install.sh"
FAKES = ("getent", "useradd", "chown", "systemctl")
# Each records its arguments; useradd also adds the user (its last argument) to a users
# file that getent reads, as the real pair would; `systemctl show` answers the unit's
# Environment= from FAKE_UNIT_ENVIRONMENT.
FAKE = """#!/bin/sh
name=$(basename "$0")
printf '%s' "$name" >> "$FAKE_LOG"
for arg in "$@"; do printf ' %s' "$arg" >> "$FAKE_LOG"; done
printf '\\n' >> "$FAKE_LOG"
case "$name" in
    useradd) for arg in "$@"; do user=$arg; done; echo "$user" >> "$FAKE_LOG.users" ;;
    getent) touch "$FAKE_LOG.users"; grep -qx "$2" "$FAKE_LOG.users"; exit $? ;;
    systemctl) if [ "$1" = show ]; then printf '%s\\n' "${FAKE_UNIT_ENVIRONMENT:-}"; fi ;;
esac
exit 0
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project as a wheel, built from a copy of the tree (a build writes into its tree)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    for package in ("edge_agent", "models", "cloud_sync", "firmware_bridge"):
        shutil.copytree(
            REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    out = tmp_path_factory.mktemp("wheels")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), source],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    wheels = sorted(out.glob("edge_agent-*.whl"))
    if build.returncode != 0 or not wheels:
        missing_service(f"cannot build the wheel (pip needs setuptools): {build.stderr[-500:]}")
    return wheels[0]


class Box:
    """One throwaway root and the log of the faked system commands."""

    def __init__(self, base: Path) -> None:
        self.base = base  # the working directory of every command (not the repository)
        self.root = base / "root"
        self.root.mkdir()
        self.fakes = base / "fakes"
        self.fakes.mkdir()
        self.log = base / "system.log"
        self.log.touch()
        for name in FAKES:
            fake = self.fakes / name
            fake.write_text(FAKE)
            fake.chmod(0o755)
        self.env = {
            "PATH": f"{self.fakes}:/usr/local/bin:/usr/bin:/bin",
            "HOME": str(base),
            "LANG": "C.UTF-8",
            "FAKE_LOG": str(self.log),
            "PYTHONPATH": sysconfig.get_paths()["purelib"],
            "PIP_NO_INDEX": "1",
            "PIP_NO_CACHE_DIR": "1",
        }
        for name in FAKES:  # the real commands must never be reached
            assert shutil.which(name, path=self.env["PATH"]) == str(self.fakes / name)

    def install(self, *args: str, unit_environment: str = "") -> subprocess.CompletedProcess[str]:
        command = ["bash", str(SCRIPT), "--root", str(self.root), "--system"]
        command += ["--python", sys.executable, "--no-deps", *args]
        return subprocess.run(
            command,
            env={**self.env, "FAKE_UNIT_ENVIRONMENT": unit_environment},
            cwd=self.base,
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )

    def calls(self) -> list[list[str]]:
        return [line.split(" ") for line in self.log.read_text().splitlines()]

    def take_calls(self) -> list[list[str]]:
        calls = self.calls()
        self.log.write_text("")
        return calls

    @property
    def active(self) -> Path:
        return (self.root / "opt/edge-agent/venv").resolve()

    def venvs(self) -> list[str]:
        return sorted(p.name for p in (self.root / "opt/edge-agent/venvs").iterdir())


@pytest.fixture
def box(tmp_path: Path) -> Box:
    return Box(tmp_path)


def _systemctl(calls: list[list[str]]) -> list[list[str]]:
    """The calls that change something (`show` only reads the unit's environment)."""
    return [call[1:] for call in calls if call[0] == "systemctl" and call[1] != "show"]


def test_install_a_refused_upgrade_an_upgrade_and_a_rollback(box: Box, wheel: Path) -> None:
    # Without a store id (the example's store-001 would be used) or with the example's id
    # itself, or an empty one, nothing at all is done.
    for refused_id in (None, "store-001", ""):
        options = () if refused_id is None else ("--store-id", refused_id)
        refused = box.install(*options, str(wheel))
        assert refused.returncode != 0
        assert "--store-id" in refused.stderr
        assert "store-001" in refused.stderr or refused_id == ""
        assert list(box.root.iterdir()) == []
        assert box.calls() == []

    # First install: the user, the directories, the files, the service.
    first = box.install("--store-id", "store-041", str(wheel))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "store_id=store-041" in first.stdout  # checked with the drop-in merged in
    calls = box.take_calls()
    assert ["getent", "passwd", "edge-agent"] in calls
    (useradd,) = [call for call in calls if call[0] == "useradd"]
    assert useradd[-1] == "edge-agent"
    assert "--system" in useradd
    assert useradd[useradd.index("--groups") + 1] == "dialout"
    assert ["chown", "edge-agent:edge-agent", str(box.root / "var/lib/edge-agent")] in calls
    assert _systemctl(calls) == [["daemon-reload"], ["enable", "--now", "edge-agent"]]

    unit = box.root / "etc/systemd/system/edge-agent.service"
    assert unit.read_bytes() == (REPO / "deploy/edge-agent.service").read_bytes()
    config = box.root / "etc/edge-agent/agent.toml"
    assert config.read_bytes() == (REPO / "deploy/agent.toml").read_bytes()
    assert config.stat().st_mode & 0o777 == 0o640
    dropins = box.root / "etc/edge-agent/conf.d"
    assert 'store_id = "store-041"' in (dropins / "50-store-id.toml").read_text()
    assert not (dropins / "50-sync-url.toml").exists()
    credentials = box.root / "etc/edge-agent/credentials"
    assert credentials.stat().st_mode & 0o777 == 0o700
    for name in ("sync-token", "mqtt-password", "pseudonym-key"):  # the unit's LoadCredential=
        assert f"LoadCredential={name}:/etc/edge-agent/credentials/{name}" in unit.read_text()
        assert (credentials / name).read_bytes() == b""  # not set
        assert (credentials / name).stat().st_mode & 0o777 == 0o600
    assert "Environment=EDGE_AGENT__SYNC__TOKEN" not in unit.read_text()
    assert (box.root / "etc/edge-agent/agent.toml.example").is_file()
    assert (box.root / "var/lib/edge-agent").stat().st_mode & 0o777 == 0o750
    assert (box.root / "opt/edge-agent/README.md").is_file()  # the unit's Documentation=
    assert (box.root / "opt/edge-agent/venv").is_symlink()
    first_venv = box.active
    assert first_venv.parent == box.root / "opt/edge-agent/venvs"

    # The installed command runs, from the venv's own copy of the package.
    edge_agent = box.root / "opt/edge-agent/venv/bin/edge-agent"
    helped = subprocess.run(
        [edge_agent, "--help"], env=box.env, cwd=box.base, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert helped.returncode == 0, helped.stderr
    assert "check-config" in helped.stdout
    python = box.root / "opt/edge-agent/venv/bin/python"
    where = subprocess.run(
        [python, "-c", "import edge_agent; print(edge_agent.__file__)"],
        env=box.env, cwd=box.base, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert Path(where.stdout.strip()).resolve().is_relative_to(first_venv)
    # The live venv holds what the service runs, not the tools that built it.
    find = "import importlib.util as u; print(u.find_spec('pip'), u.find_spec('setuptools'))"
    trimmed = subprocess.run(
        [python, "-c", find],
        env={**box.env, "PYTHONPATH": ""}, cwd=box.base, capture_output=True, text=True,
        timeout=60, check=True,
    )  # fmt: skip
    assert trimmed.stdout.split() == ["None", "None"], trimmed.stdout

    # An upgrade that turns sync on without a token anywhere: the new version refuses the
    # config, so it never goes live, and its half-made venv is removed.
    refused = box.install("--sync-url", "https://customers.example.com", str(wheel))
    assert refused.returncode != 0
    assert "sync.token" in refused.stderr
    assert box.active == first_venv
    assert box.venvs() == [first_venv.name]
    assert _systemctl(box.take_calls()) == []

    # With the token as a file: it becomes the sync-token credential, the check sees it as
    # the service will, the technician's config is kept, the user is not made again, a new
    # venv goes live, the old one stays for a rollback, the service restarts.
    token = box.base / "token.txt"
    token.write_text("from-a-file\n")
    second = box.install(
        "--sync-url", "https://customers.example.com", "--token-file", str(token), str(wheel)
    )
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert config.read_bytes() == (REPO / "deploy/agent.toml").read_bytes()
    assert "store_id=store-041" in second.stdout  # the first install's drop-in still counts
    assert "sync=on" in second.stdout
    assert (credentials / "sync-token").read_text() == "from-a-file\n"
    assert (credentials / "sync-token").stat().st_mode & 0o777 == 0o600
    assert 'url = "https://customers.example.com"' in (dropins / "50-sync-url.toml").read_text()
    calls = box.take_calls()
    assert ["systemctl", "show", "--property=Environment", "--value", "edge-agent"] in calls
    assert [call for call in calls if call[0] == "useradd"] == []
    assert _systemctl(calls) == [
        ["daemon-reload"],
        ["enable", "--now", "edge-agent"],
        ["try-restart", "edge-agent"],
    ]
    second_venv = box.active
    assert second_venv != first_venv
    assert box.venvs() == sorted([first_venv.name, second_venv.name])

    # Rollback: back to the first venv, restarted.
    back = box.install("--rollback")
    assert back.returncode == 0, back.stdout[-3000:] + back.stderr[-3000:]
    assert box.active == first_venv
    assert _systemctl(box.take_calls()) == [["daemon-reload"], ["try-restart", "edge-agent"]]

    # A config that falls back to the example's id (its drop-in removed) is refused too.
    (dropins / "50-store-id.toml").unlink()
    example_id = box.install(str(wheel))
    assert example_id.returncode != 0
    assert "store_id is the example's store-001" in example_id.stderr
    assert box.active == first_venv
    assert _systemctl(box.take_calls()) == []


def test_under_a_root_system_commands_are_skipped_by_default(tmp_path: Path) -> None:
    """Without --system, --root DIR never runs getent, useradd, chown or systemctl.

    A rollback between two stand-in venvs (an ``edge-agent`` that answers like the real one)
    keeps this fast; the full install is the test above."""
    box = Box(tmp_path)
    nothing = subprocess.run(
        ["bash", str(SCRIPT), "--root", str(box.root), "--rollback"],
        env=box.env, cwd=box.base, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert nothing.returncode == 1
    assert "nothing installed" in nothing.stderr
    assert os.listdir(box.root) == []

    venvs = box.root / "opt/edge-agent/venvs"
    for name in ("20260101T000000Z.aaaa", "20260201T000000Z.bbbb"):
        command = venvs / name / "bin/edge-agent"
        command.parent.mkdir(parents=True)
        command.write_text("#!/bin/sh\necho 0.1.0\n")
        command.chmod(0o755)
    (box.root / "opt/edge-agent/venv").symlink_to("venvs/20260201T000000Z.bbbb")

    back = subprocess.run(
        ["bash", str(SCRIPT), "--root", str(box.root), "--rollback"],
        env=box.env, cwd=box.base, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert back.returncode == 0, back.stderr
    assert box.active.name == "20260101T000000Z.aaaa"
    assert "skipped (--no-system): systemctl try-restart edge-agent" in back.stdout
    assert box.calls() == []


def test_an_unknown_extra_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    """``--with`` takes the store box's extras only (awscrt, nats); a typo or a heavy extra
    (train: 80 MB) stops the install before a directory or venv is made."""
    box = Box(tmp_path)
    for extra in ("train", "awscrt;rm", ""):
        refused = subprocess.run(
            ["bash", str(SCRIPT), "--root", str(box.root), "--store-id", "s-1",
             "--with", extra, str(box.base)],
            env=box.env, cwd=box.base, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert refused.returncode == 1, refused.stdout
        assert f"--with {extra}: the store box's extras are awscrt and nats" in refused.stderr
        assert os.listdir(box.root) == []
