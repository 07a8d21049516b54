"""The email templates: text and HTML alternatives, local times with the zone's name, advice."""

from __future__ import annotations

import datetime as dt
import uuid
from email.message import EmailMessage

import pytest

from shared.emails import KIND_FAILED, KIND_READY, MAX_NAME_CHARS, EmailComposer, EmailFacts
from shared.failures import ADVICE_TEXT, Advice
from shared.models import Account, ErrorClass, ExportJob, ExportState, User
from shared.signing import SigningKeys

NOW = dt.datetime(2026, 6, 8, 12, 0, tzinfo=dt.UTC)
COMPOSER = EmailComposer(
    public_url="https://exports.example.test/",
    sender="Orders export <exports@example.test>",
    signing_keys=SigningKeys("k1", {"k1": b"k" * 32}),
    link_ttl_seconds=86_400,
)


def facts(
    *, timezone: str = "Europe/Berlin", name: str = "Acme & <Co>", **job: object
) -> EmailFacts:
    values: dict[str, object] = {
        "id": uuid.uuid4(),
        "requested_by": 7,
        "filters": {"status": ["paid"]},
        "state": ExportState.READY,
        "row_count": 1234,
        "size_bytes": 5_600_000,
        "expires_at": NOW + dt.timedelta(days=7),
        "utf8_bom": False,
        "compression": "none",
    }
    values.update(job)
    return EmailFacts(
        job=ExportJob(**values),
        account=Account(name=name, slug="acme", timezone=timezone),
        user=User(email="ada@example.test", display_name="Ada"),
    )


def parts(message: EmailMessage) -> tuple[str, str]:
    text, html = (message.get_body(preferencelist=(kind,)) for kind in ("plain", "html"))
    assert text is not None and html is not None
    return str(text.get_content()), str(html.get_content())


def test_the_ready_email_has_a_text_and_an_html_part_with_the_same_link() -> None:
    message = COMPOSER.compose(facts(), kind=KIND_READY, now=NOW)
    assert message.get_content_type() == "multipart/alternative"
    assert message["Subject"] == "Your orders export is ready (acme, 1,234 rows)"
    text, html = parts(message)
    [link] = [line for line in text.splitlines() if line.startswith("https://")]
    assert link.startswith("https://exports.example.test/exports/") and "signature=" in link
    assert f'href="{link.replace("&", "&amp;")}"' in html and ">Download CSV</a>" in html
    assert "Size:      5.6 MB" in text and "5.6 MB" in html


def test_moments_are_in_the_accounts_time_zone_with_its_name() -> None:
    text, html = parts(COMPOSER.compose(facts(), kind=KIND_READY, now=NOW))
    assert "Available until: 2026-06-15 14:00 Europe/Berlin" in text
    assert "until 2026-06-09 14:00 Europe/Berlin" in text.replace("\n", " ")
    assert "2026-06-15 14:00 Europe/Berlin" in html
    text, _ = parts(COMPOSER.compose(facts(timezone="UTC"), kind=KIND_READY, now=NOW))
    assert "Available until: 2026-06-15 12:00 UTC" in text


def test_the_html_part_escapes_names_and_loads_nothing_remote() -> None:
    _, html = parts(COMPOSER.compose(facts(), kind=KIND_READY, now=NOW))
    assert "Acme &amp; &lt;Co&gt;" in html and "<Co>" not in html
    assert "<img" not in html and "src=" not in html and "url(" not in html
    assert "<link" not in html and "<script" not in html


@pytest.mark.parametrize(
    ("code", "error_class", "advice"),
    [
        ("query_timeout", ErrorClass.USER, Advice.NARROW),
        ("storage_unavailable", ErrorClass.RETRYABLE, Advice.RETRY),
        ("internal_error", ErrorClass.ENGINEERING, Advice.SUPPORT),
    ],
)
def test_the_failed_email_gives_the_advice_of_the_failure_table(
    code: str, error_class: ErrorClass, advice: Advice
) -> None:
    about = facts(
        state=ExportState.FAILED, error_code=code, error_class=error_class, error_message="Why."
    )
    message = COMPOSER.compose(about, kind=KIND_FAILED, now=NOW)
    assert message["Subject"] == "Your orders export failed (acme)"
    text, html = parts(message)
    words = ADVICE_TEXT[advice].format(id=about.job.id)
    assert "Reason:    Why." in text and words in text and words in html
    page = f"https://exports.example.test/exports/{about.job.id}"
    assert page in text.splitlines() and f'href="{page}"' in html and "download" not in text


def test_long_names_are_capped_and_every_line_fits_the_mail_limit() -> None:
    about = facts(name="N" * 5000, filters={"q": "x" * 100})
    message = COMPOSER.compose(about, kind=KIND_READY, now=NOW)
    _, html = parts(message)
    assert "N" * MAX_NAME_CHARS not in html and "N" * (MAX_NAME_CHARS - 1) + "…" in html
    assert max(len(line) for line in message.as_bytes().splitlines()) < 998
