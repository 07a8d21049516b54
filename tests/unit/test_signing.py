"""Signed download links: bound to export, recipient and expiry; key ids for rotation."""

from __future__ import annotations

import datetime as dt
from urllib.parse import parse_qs, urlsplit

import pytest

from shared.errors import BadSignature, LinkExpired
from shared.signing import SigningKeys, download_path, parse_keys, sign, verify

NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)
OLD = SigningKeys("k1", {"k1": b"old-secret-0123456789"})
NEW = SigningKeys("k2", {"k2": b"new-secret-0123456789", "k1": b"old-secret-0123456789"})


def link(keys: SigningKeys, *, export_id: str = "e-1", user_id: int = 7) -> tuple[str, str]:
    path = download_path(
        keys, export_id=export_id, user_id=user_id, expires_at=NOW + dt.timedelta(hours=1)
    )
    query = parse_qs(urlsplit(path).query)
    assert urlsplit(path).path == f"/exports/{export_id}/download"
    return query["expires"][0], query["signature"][0]


def test_a_link_verifies_for_its_recipient_only() -> None:
    expires, signature = link(OLD)
    verify(OLD, export_id="e-1", user_id=7, expires=expires, signature=signature, now=NOW)
    for export_id, user_id in (("e-2", 7), ("e-1", 8)):
        with pytest.raises(BadSignature):
            verify(OLD, export_id=export_id, user_id=user_id, expires=expires,
                   signature=signature, now=NOW)  # fmt: skip


@pytest.mark.parametrize(
    ("expires", "signature"),
    [
        ("{expires}1", "{signature}"),  # a later expiry
        ("{expires}", "{signature}0"),  # a changed MAC
        ("{expires}", "k9.{mac}"),  # an unknown key id
        ("-1", "{signature}"),
        ("1e9", "{signature}"),
        ("9" * 13, "{signature}"),
    ],
)
def test_tampering_is_a_bad_signature(expires: str, signature: str) -> None:
    real_expires, real_signature = link(OLD)
    values = {"expires": real_expires, "signature": real_signature,
              "mac": real_signature.partition(".")[2]}  # fmt: skip
    with pytest.raises(BadSignature):
        verify(OLD, export_id="e-1", user_id=7, expires=expires.format(**values),
               signature=signature.format(**values), now=NOW)  # fmt: skip


def test_a_genuine_link_past_its_expiry_is_expired_not_bad() -> None:
    expires, signature = link(OLD)
    later = NOW + dt.timedelta(hours=2)
    with pytest.raises(LinkExpired):
        verify(OLD, export_id="e-1", user_id=7, expires=expires, signature=signature, now=later)


def test_rotation_signs_with_the_first_key_and_still_verifies_the_old_one() -> None:
    expires, old_signature = link(OLD)
    assert old_signature.startswith("k1.") and link(NEW)[1].startswith("k2.")
    verify(NEW, export_id="e-1", user_id=7, expires=expires, signature=old_signature, now=NOW)
    assert sign(NEW, export_id="e", user_id=1, expires=5) != sign(OLD, export_id="e", user_id=1,
                                                                  expires=5)  # fmt: skip


@pytest.mark.parametrize(
    "setting",
    ["k1", "k1:short", "k-1:0123456789abcdef", "k1:0123456789abcdef,k1:fedcba9876543210"],
)
def test_malformed_or_repeated_keys_are_refused(setting: str) -> None:
    with pytest.raises(ValueError):
        parse_keys(setting)


def test_keys_parse_in_order() -> None:
    assert parse_keys("a1:0123456789abcdef, b2:fedcba9876543210") == [
        ("a1", b"0123456789abcdef"),
        ("b2", b"fedcba9876543210"),
    ]
