"""Model signatures: ed25519 over the manifest, which names the artifact's sha256.

Shared by the store (``customer-store model publish --signing-key`` signs, ``model keygen``
makes a key pair) and the agent (verifies a model that arrives, before its sha256 and golden
checks). The signed bytes are the manifest without its ``signature`` field as canonical JSON
(sorted keys, no spaces, UTF-8), so the signature survives any re-encoding of the document
(the store keeps it as JSON, PostgreSQL as jsonb). Since the manifest carries the sha256 of
``model.onnx``, one signature covers both files.

The manifest's ``signature`` field::

    {"alg": "ed25519", "key_id": "<16 hex: sha256 of the public key>", "value": "<base64>"}
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

# cryptography maps about 6 MB of native code: imported by the functions that sign or verify,
# so an agent without ``[model] public_key`` never loads it (issue 11, memory).
if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

SIGNATURE_FIELD: Final = "signature"
ALGORITHM: Final = "ed25519"
_SIGNATURE_BYTES: Final = 64
_KEY_FILE_MAX_BYTES: Final = 16 * 1024


class ModelSignatureError(ValueError):
    """A model signature is missing, malformed or wrong, or a key cannot be used.

    ``reason`` is a short token for logs and status (``unsigned``, ``malformed_signature``,
    ``unknown_key``, ``bad_signature``, ``bad_key``).
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def canonical_bytes(manifest: Mapping[str, Any]) -> bytes:
    """What is signed: the manifest minus ``signature``, as canonical JSON."""
    body = {key: value for key, value in manifest.items() if key != SIGNATURE_FIELD}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text.encode("utf-8")


def key_id(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).hexdigest()[:16]


def public_raw(key: Ed25519PrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def sign_manifest(manifest: Mapping[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    """The manifest with a fresh ``signature`` field (any earlier one is replaced)."""
    value = key.sign(canonical_bytes(manifest))
    signature = {
        "alg": ALGORITHM,
        "key_id": key_id(public_raw(key)),
        "value": base64.b64encode(value).decode("ascii"),
    }
    return {**manifest, SIGNATURE_FIELD: signature}


def verify_manifest(manifest: Any, public_keys: Sequence[bytes]) -> str:
    """Check the manifest's signature against any of ``public_keys``; return the key id.

    Total: whatever the document holds, the answer is a key id or ModelSignatureError.
    """
    if not isinstance(manifest, Mapping):
        raise ModelSignatureError("malformed_signature", "the manifest is not a JSON object")
    signature = manifest.get(SIGNATURE_FIELD)
    if signature is None:
        raise ModelSignatureError("unsigned", "the manifest carries no signature")
    if not isinstance(signature, Mapping) or signature.get("alg") != ALGORITHM:
        raise ModelSignatureError("malformed_signature", f"signature.alg must be {ALGORITHM!r}")
    text = signature.get("value")
    try:
        value = base64.b64decode(text, validate=True) if isinstance(text, str) else b""
    except (binascii.Error, ValueError):
        value = b""
    if len(value) != _SIGNATURE_BYTES:
        raise ModelSignatureError("malformed_signature", "signature.value is not 64 base64 bytes")
    try:
        signed = canonical_bytes(manifest)
    except (TypeError, ValueError, RecursionError) as exc:
        raise ModelSignatureError("malformed_signature", f"unserialisable manifest: {exc}") from exc
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    for raw in public_keys:
        try:
            Ed25519PublicKey.from_public_bytes(raw).verify(value, signed)
        except InvalidSignature:
            continue
        except ValueError as exc:
            raise ModelSignatureError("bad_key", f"configured public key: {exc}") from exc
        return key_id(raw)
    claimed = signature.get("key_id")
    known = {key_id(raw) for raw in public_keys}
    if isinstance(claimed, str) and claimed not in known:
        raise ModelSignatureError(
            "unknown_key", f"signed by key {claimed[:16]!r}, not by a configured key"
        )
    raise ModelSignatureError("bad_signature", "the signature does not match the manifest")


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """A PEM (PKCS#8) ed25519 private key, as ``model keygen`` writes it."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        data = path.read_bytes()[:_KEY_FILE_MAX_BYTES]
    except OSError as exc:
        raise ModelSignatureError("bad_key", f"cannot read {path}: {exc.strerror}") from exc
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ModelSignatureError("bad_key", f"{path}: not a PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ModelSignatureError("bad_key", f"{path}: not an ed25519 key")
    return key


def write_new_key(path: Path) -> str:
    """Create a key pair: the private key to ``path`` (0600, never overwritten); returns the
    public key as base64 (what the agents' ``[model] public_key`` holds)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise ModelSignatureError("bad_key", f"{path} exists; keygen never overwrites") from exc
    except OSError as exc:
        raise ModelSignatureError("bad_key", f"cannot create {path}: {exc.strerror}") from exc
    try:
        os.write(descriptor, pem)
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    return base64.b64encode(public_raw(key)).decode("ascii")
