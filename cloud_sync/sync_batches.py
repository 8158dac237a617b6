"""Turning buffered rows into request bodies (governed, gzipped).

The rows are read on the buffer's owner thread (``sync_claims``); the governance rewrite and
the gzip run in a worker thread, so neither the event loop nor the buffer writer waits on
them. The upload rule asks the agent's ``ConsentLedger`` (``edge_agent.governance``) about the
row's ``customer_id`` column, so it applies the consent in force when the row leaves the
store. Every row without that consent is parsed and governed: an envelope's text is never
searched to guess whom it names.
"""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from edge_agent.buffer.reads import PendingRow
from edge_agent.governance import ConsentLedger, pseudonymise_envelope

# Speed over ratio: JSON envelopes shrink about five times even at level 1, and the
# compression must keep up with the drain on a Raspberry Pi class CPU.
_GZIP_LEVEL: Final = 1


Row = PendingRow  # read by the buffer (``Buffer.pending``)


@dataclass(frozen=True)
class Batch:
    """A request body carrying rows, and whether it is gzipped."""

    body: bytes
    gzipped: bool


def build_batch(rows: Sequence[Row], consent: ConsentLedger, key: bytes, compress: bool) -> Batch:
    """The request body: a JSON array of the governed envelopes (blocking; use a thread)."""
    envelopes = governed_envelopes(rows, consent, key)
    # Envelopes are stored as compact JSON already: joining them is the whole encoding.
    body = ("[" + ",".join(envelopes) + "]").encode("utf-8")
    if compress:
        body = gzip.compress(body, compresslevel=_GZIP_LEVEL)
    return Batch(body, compress)


def governed_envelopes(rows: Sequence[Row], consent: ConsentLedger, key: bytes) -> list[str]:
    """Each row as it may leave the store (the upload rule; every transport goes through
    here): blocking, use a thread."""
    return [_upload_form(row, consent, key) for row in rows]


def _upload_form(row: Row, consent: ConsentLedger, key: bytes) -> str:
    if consent.shares_profile(row.customer_id, row.seq):
        return row.envelope
    if not row.customer and row.customer_id is None:
        # Telemetry that names nobody (the buffer's columns say so): its type declares no
        # identity field and its values are numbers, so there is nothing to hide.
        return row.envelope
    # Parsed, never searched as text: only the envelope's structure says whom it names.
    return pseudonymise_envelope(row.envelope, key)


def split(rows: Sequence[Row]) -> tuple[Sequence[Row], Sequence[Row]]:
    middle = len(rows) // 2
    return rows[:middle], rows[middle:]
