"""Checking a webhook's HMAC-SHA256 signature, as its source in ``webhooks.yaml`` describes it.

One scheme covers Stripe (``Stripe-Signature: t=<unix>,v1=<hex>``), GitHub (``X-Hub-Signature-256:
sha256=<hex>``) and Svix (``svix-signature: v1,<base64>`` over ``{svix-id}.{svix-timestamp}.{body}``):
the header is split into elements, the elements with the prefix are candidate signatures (several
while the sender rotates its key: any one of them may match), and each is compared in constant time
with the HMAC of the signed content under each configured secret (several while *we* rotate).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from collections.abc import Callable, Mapping

from meter_platform.catalog.webhooks import Signature, WebhookSource

_PARTS = re.compile(r"(\{id\}|\{timestamp\}|\{body\})")
_UNIX = re.compile(r"[0-9]{1,12}")


class SignatureError(Exception):
    """A delivery whose signature does not prove it came from the source; ``reason`` is the metric's
    label (``missing_signature``, ``bad_signature``, ``bad_timestamp``, ``stale_timestamp``)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


def secrets_of(source: WebhookSource, environ: Mapping[str, str] | None = None) -> tuple[list[bytes], str]:
    """The source's HMAC keys from the environment (variables unset or empty are skipped), and when
    there is none, why (for the 503 the source answers then)."""
    env = os.environ if environ is None else environ
    keys: list[bytes] = []
    problems: list[str] = []
    for name in source.secret_env:
        value = env.get(name, "").strip()
        if not value:
            problems.append(f"environment variable {name} is not set")
            continue
        if source.signature.secret_encoding == "text":
            keys.append(value.encode())
            continue
        try:  # Svix: whsec_<base64>
            keys.append(base64.b64decode(value.removeprefix("whsec_"), validate=True))
        except (binascii.Error, ValueError):
            problems.append(f"environment variable {name} is not base64 (whsec_<base64>)")
    return keys, "; ".join(problems)


def _elements(sig: Signature, header: Callable[[str], list[str]]) -> list[str]:
    out: list[str] = []
    for value in header(sig.header):
        parts = value.split(sig.separator) if sig.separator else [value]
        out += [p.strip() for p in parts if p.strip()]
    return out


def _decode(candidate: str, encoding: str) -> bytes | None:
    try:
        if encoding == "hex":
            return bytes.fromhex(candidate)
        return base64.b64decode(candidate, validate=True)
    except (binascii.Error, ValueError):
        return None


def _timestamp(sig: Signature, elements: list[str], header: Callable[[str], list[str]]) -> str | None:
    """The signed timestamp's text (None: the scheme has none); SignatureError when it is absent."""
    ref = sig.timestamp
    if ref is None:
        return None
    if ref.element is not None:
        found = [e[len(ref.element) :] for e in elements if e.startswith(ref.element)]
        where = f"element {ref.element!r} of {sig.header}"
    else:
        assert ref.header is not None
        found = header(ref.header)
        where = f"header {ref.header}"
    if not found or not _UNIX.fullmatch(found[0].strip()):
        raise SignatureError(
            "bad_timestamp", f"The signed timestamp ({where}) is missing or not unix seconds."
        )
    return found[0].strip()


def signed_content(template: str, delivery: str, timestamp: str | None, body: bytes) -> bytes:
    """What is signed: the template with ``{id}``, ``{timestamp}`` and ``{body}`` (raw bytes) filled in."""
    values = {"{id}": delivery.encode(), "{timestamp}": (timestamp or "").encode(), "{body}": body}
    return b"".join(values.get(part, part.encode()) for part in _PARTS.split(template))


def verify(
    source: WebhookSource,
    keys: list[bytes],
    body: bytes,
    header: Callable[[str], list[str]],
    delivery: str,
    now: float,
) -> None:
    """Raise :class:`SignatureError` unless one of the header's signatures is the HMAC-SHA256 of the
    signed content under one of ``keys`` and, when the scheme signs a timestamp, it is within the
    tolerance of ``now`` (a replayed old delivery is refused even with a valid signature)."""
    sig = source.signature
    elements = _elements(sig, header)
    candidates = [_decode(e[len(sig.prefix) :], sig.encoding) for e in elements if e.startswith(sig.prefix)]
    if not candidates:
        raise SignatureError("missing_signature", f"The delivery has no signature in header {sig.header}.")
    timestamp = _timestamp(sig, elements, header)
    content = signed_content(sig.signed, delivery, timestamp, body)
    matched = False
    for key in keys:
        expected = hmac.new(key, content, hashlib.sha256).digest()
        for candidate in candidates:
            # Every comparison is made (no early exit) and each takes the same time.
            matched |= candidate is not None and hmac.compare_digest(expected, candidate)
    if not matched:
        raise SignatureError("bad_signature", f"No signature in header {sig.header} matches the delivery.")
    if timestamp is not None and abs(now - int(timestamp)) > sig.tolerance_seconds:
        raise SignatureError(
            "stale_timestamp",
            f"The signed timestamp is more than {sig.tolerance_seconds} s away from the gateway's clock "
            "(an old delivery replayed, or a clock far off).",
        )
