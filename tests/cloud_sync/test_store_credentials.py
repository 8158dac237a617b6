"""Credentials: list without secrets, revoke and rotate against a running store process."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from sync_helpers import StoreProcess, store_cli


@pytest.fixture
def store(db_url: str, tmp_path: Path) -> Iterator[StoreProcess]:
    process = StoreProcess(db_url, tmp_path / "store.log")
    process.start()
    yield process
    process.stop()


def cli_lines(db_url: str, *args: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-m", "cloud_sync.store", *args, "--db", db_url],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.splitlines()


def listed(db_url: str, group: str, *extra: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in cli_lines(db_url, group, "list", *extra) if line]


async def status_with(store: StoreProcess, token: str) -> int:
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{store.url}/v1/erasures", headers=headers) as response,
    ):
        return response.status


async def test_revoke_takes_effect_on_the_running_store_and_list_shows_no_secret(
    store: StoreProcess,
) -> None:
    token = store_cli(store.db_url, "token", "create", "--store", "store-001")
    other = store_cli(store.db_url, "token", "create", "--store", "store-002")
    assert await status_with(store, token) == 200
    output = "\n".join(cli_lines(store.db_url, "token", "list"))
    assert token not in output
    assert other not in output
    rows = listed(store.db_url, "token")
    assert [r["store_id"] for r in rows] == ["store-001", "store-002"]
    assert all(r["revoked_at"] is None for r in rows)

    store_cli(store.db_url, "token", "revoke", "--id", str(rows[0]["id"]))
    assert await status_with(store, token) == 401  # the next request, no restart
    assert await status_with(store, other) == 200
    assert [r["store_id"] for r in listed(store.db_url, "token")] == ["store-002"]
    assert len(listed(store.db_url, "token", "--all")) == 2
    with pytest.raises(subprocess.CalledProcessError):
        store_cli(store.db_url, "token", "revoke", "--id", str(rows[0]["id"]))


async def test_rotate_revokes_the_old_secret_at_once_or_after_the_grace(
    store: StoreProcess,
) -> None:
    first = store_cli(store.db_url, "admin", "create", "--name", "ops")
    (row,) = listed(store.db_url, "admin")
    second = store_cli(store.db_url, "admin", "rotate", "--id", str(row["id"]))
    assert await status_with(store, first) == 401
    assert await status_with(store, second) == 200
    (renewed,) = listed(store.db_url, "admin")
    assert renewed["name"] == "ops"
    assert renewed["id"] != row["id"]

    key = store_cli(store.db_url, "partner", "create", "--name", "acme", "--scope", "profiles:read")
    (partner,) = listed(store.db_url, "partner")
    command = ["partner", "rotate", "--id", str(partner["id"]), "--grace-s", "3600"]
    fresh = store_cli(store.db_url, *command)
    both = listed(store.db_url, "partner")
    assert len(both) == 2  # the old key still works during the grace period
    assert both[0]["revoked_at"] is not None
    assert both[1]["scopes"] == ["profiles:read"]
    async with aiohttp.ClientSession() as session:
        for secret in (key, fresh):
            headers = {"Authorization": f"Bearer {secret}"}
            async with session.get(f"{store.url}/v1/customers/nobody", headers=headers) as answer:
                assert answer.status == 404  # authenticated: an unknown customer, not a 401
