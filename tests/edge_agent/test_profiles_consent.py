"""Who the agent asks the central store about (personalize/profiles.py, governance)."""

from __future__ import annotations

from pathlib import Path

from edge_agent.config import config_from_dict
from edge_agent.governance import ConsentRecord
from edge_agent.personalize.profiles import CentralProfiles


def _profiles(tmp_path: Path, require_consent: bool = True) -> CentralProfiles:
    config = config_from_dict(
        {
            "agent": {"store_id": "store-001", "data_dir": str(tmp_path)},
            "sync": {"url": "http://127.0.0.1:9", "token": "t"},
            "governance": {"require_consent": require_consent},
        }
    )
    return CentralProfiles(config)


def _record(customer: str, personalization: bool, sharing: bool) -> ConsentRecord:
    return ConsentRecord(customer, personalization, sharing, False, "2026-11-27T10:00:00Z", "e")


def test_pseudonyms_and_local_refusals_are_never_asked_about(tmp_path: Path) -> None:
    profiles = _profiles(tmp_path)
    profiles.consent.load(
        [
            _record("c-no-share", True, False),
            _record("c-no-personal", False, True),
            _record("c-yes", True, True),
        ]
    )
    assert not profiles.may_fetch("ps-0123456789abcdef")
    assert not profiles.may_fetch("c-no-share")
    assert not profiles.may_fetch("c-no-personal")
    assert profiles.may_fetch("c-yes")
    assert profiles.may_fetch("c-unknown-here")  # may have consented elsewhere: the store decides
    for customer in ("ps-0123456789abcdef", "c-no-share", "c-no-personal"):
        assert profiles.lookup(customer) is None
    assert profiles.status()["profiles"]["queued"] == 0
    assert profiles.lookup("c-yes") is None  # not there yet: one fetch queued
    assert profiles.lookup("c-yes") is None  # single flight: not queued twice
    assert profiles.status()["profiles"]["queued"] == 1


def test_without_require_consent_the_store_decides_for_everyone_but_pseudonyms(
    tmp_path: Path,
) -> None:
    profiles = _profiles(tmp_path, require_consent=False)
    profiles.consent.load([_record("c-no-share", True, False)])
    assert profiles.may_fetch("c-no-share")
    assert not profiles.may_fetch("ps-0123456789abcdef")
