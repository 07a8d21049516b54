"""Signed download links: HMAC-SHA256 over (export id, recipient user id, expiry), with key ids.

The link carries ``expires`` and ``signature=<kid>.<hex>``; the recipient is not in the URL but
in the MAC, so a link verifies only for the user it was made for. Keys rotate by putting a new
key first in DOWNLOAD_SIGNING_KEYS and keeping the old one listed until its links have expired;
the key derived from SECRET_KEY stays verify-only until DOWNLOAD_SIGNING_KEEP_DERIVED=false.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
from dataclasses import dataclass
from urllib.parse import urlencode

from shared.errors import BadSignature, ConfigurationError, LinkExpired
from shared.settings import Settings

#: Key id of the key derived from SECRET_KEY when no DOWNLOAD_SIGNING_KEYS are set.
DERIVED_KEY_ID = "k0"


@dataclass(frozen=True)
class SigningKeys:
    """The active key (signs) and every key still accepted (verify)."""

    active: str
    keys: dict[str, bytes]

    @classmethod
    def from_settings(cls, settings: Settings) -> SigningKeys:
        """The keys of DOWNLOAD_SIGNING_KEYS, the first active; the key derived from SECRET_KEY
        (kid ``k0``) stays listed as verify-only until DOWNLOAD_SIGNING_KEEP_DERIVED is turned
        off, so the first rotation does not break the links already emailed."""
        derived = hmac.new(settings.secret_key.encode(), b"download-links", hashlib.sha256)
        if not settings.download_signing_keys:
            return cls(DERIVED_KEY_ID, {DERIVED_KEY_ID: derived.digest()})
        try:
            pairs = parse_keys(settings.download_signing_keys)
        except ValueError as exc:
            raise ConfigurationError(f"invalid setting DOWNLOAD_SIGNING_KEYS: {exc}") from None
        keys = dict(pairs)
        if settings.download_signing_keep_derived:
            if DERIVED_KEY_ID in keys:
                raise ConfigurationError(
                    f"invalid setting DOWNLOAD_SIGNING_KEYS: key id {DERIVED_KEY_ID!r} repeated "
                    "(it is the key derived from SECRET_KEY, kept while "
                    "DOWNLOAD_SIGNING_KEEP_DERIVED is true)"
                )
            keys[DERIVED_KEY_ID] = derived.digest()
        return cls(pairs[0][0], keys)


def parse_keys(setting: str) -> list[tuple[str, bytes]]:
    """``kid:secret[,kid:secret...]`` as (kid, secret) pairs; ValueError when malformed or when
    a key id is repeated (which key would verify would be a guess)."""
    pairs: list[tuple[str, bytes]] = []
    for item in setting.split(","):
        kid, sep, secret = item.strip().partition(":")
        if not sep or not kid.isascii() or not kid.isalnum() or len(secret) < 16:
            raise ValueError(
                "expected kid:secret pairs, alphanumeric kid, secret of 16+ characters"
            )
        if any(kid == seen for seen, _ in pairs):
            raise ValueError(f"key id {kid!r} repeated")
        pairs.append((kid, secret.encode()))
    return pairs


def _mac(key: bytes, export_id: str, user_id: int, expires: int) -> str:
    message = f"{export_id}\n{user_id}\n{expires}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def sign(keys: SigningKeys, *, export_id: str, user_id: int, expires: int) -> str:
    return f"{keys.active}.{_mac(keys.keys[keys.active], export_id, user_id, expires)}"


def download_path(
    keys: SigningKeys, *, export_id: str, user_id: int, expires_at: dt.datetime
) -> str:
    """``/exports/{id}/download?expires=...&signature=...`` for one recipient."""
    expires = int(expires_at.timestamp())
    query = urlencode(
        {
            "expires": expires,
            "signature": sign(keys, export_id=export_id, user_id=user_id, expires=expires),
        }
    )
    return f"/exports/{export_id}/download?{query}"


def verify(
    keys: SigningKeys,
    *,
    export_id: str,
    user_id: int,
    expires: str,
    signature: str,
    now: dt.datetime | None = None,
) -> None:
    """Raise BadSignature for any tampering, LinkExpired for a genuine link past its expiry."""
    kid, _, mac = signature.partition(".")
    key = keys.keys.get(kid)
    if key is None or not (expires.isascii() and expires.isdigit()) or len(expires) > 12:
        raise BadSignature("invalid download link")
    expected = _mac(key, export_id, user_id, int(expires))
    if not hmac.compare_digest(expected.encode(), mac.encode()):
        raise BadSignature("invalid download link")
    moment = now or dt.datetime.now(dt.UTC)
    if int(expires) < moment.timestamp():
        raise LinkExpired("this download link has expired")
