"""The export pages without JavaScript: the button's form, the Exports panel, the export's page,
and where a browser lands with a download link it cannot use.

Background exports are run by calling the runner directly, as in test_exports_api.py.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import re
import threading
import uuid
from collections.abc import Iterator
from html.parser import HTMLParser
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit
from zoneinfo import ZoneInfo

import httpx2
import pytest
from sqlalchemy import event, func, select, update
from sqlalchemy.orm import Session, sessionmaker
from starlette.applications import Starlette
from starlette.testclient import TestClient

from services.api.app import create_app
from services.api.state import state_of
from shared.db import transaction
from shared.filters import OrderFilters, parse_filters
from shared.flags import set_flag
from shared.identity import find_user
from shared.models import ExportJob, ExportState
from shared.runner import ExportRunner, RunOutcome
from shared.settings import Settings
from shared.signing import SigningKeys, download_path
from tests.integration.reportdata import TIMEZONE, Population, populate
from tests.support.jobs import make_job

THRESHOLD = 200
PASSWORD = "correct horse battery"
HTML = {"Accept": "text/html,application/xhtml+xml"}


#: What the module's app changes of the test settings (tests/integration/conftest.py).
APP_SETTINGS = {"export_async_threshold_rows": THRESHOLD, "export_max_active_per_user": 4}


@pytest.fixture(scope="module")
def population(sessions: sessionmaker[Session]) -> Population:
    return populate(sessions, orders=1500)


@pytest.fixture(scope="module")
def app(app_settings: Settings, population: Population) -> Iterator[Starlette]:
    app = create_app(app_settings, flag_cache_seconds=0)  # switches apply at once here
    with TestClient(app):
        yield app


@pytest.fixture(scope="module")
def runner(app: Starlette) -> ExportRunner:
    return state_of(app).runner


def browser(app: Starlette, email: str | None = None) -> TestClient:
    """A cookie-holding client, logged in through the form when ``email`` is given."""
    client = TestClient(app, base_url="http://127.0.0.1", headers=HTML)
    if email is not None:
        response = client.post("/login", data={"email": email, "password": PASSWORD})
        assert response.status_code == 200, response.text
    return client


class Forms(HTMLParser):
    """Every form of a page: its attributes and its fields as (name, value) pairs."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.forms: list[tuple[dict[str, str], list[tuple[str, str]]]] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.forms.append((values, []))
        elif tag == "input" and values.get("type") == "checkbox" and "checked" not in values:
            pass  # an unticked box is not sent
        elif tag == "input" and self.forms and "name" in values:
            self.forms[-1][1].append((values["name"], values.get("value", "")))

    def find(self, **attrs: str) -> list[tuple[str, str]]:
        for form, fields in self.forms:
            if all(form.get(k) == v for k, v in attrs.items()):
                return fields
        raise AssertionError(f"no form with {attrs}")


def submit(
    client: TestClient, url: str, fields: list[tuple[str, str]], **kwargs: Any
) -> httpx2.Response:
    """Post a form's fields as a browser does (repeated names kept, in order)."""
    return client.post(
        url,
        content=urlencode(fields),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        **kwargs,
    )


def flash_of(text: str) -> str:
    """The one-shot message a form's redirect left for the page ("" when none)."""
    match = re.search(r'<p id="export-message"[^>]*>(.*?)</p>', text, re.S)
    return match.group(1) if match else ""


def config_of(text: str) -> dict[str, Any]:
    match = re.search(r'<script type="application/json" id="exports-config">(.*?)</script>', text)
    assert match, "no exports config on the page"
    return json.loads(match.group(1))  # type: ignore[no-any-return]


def item_states(text: str) -> dict[str, str]:
    return dict(
        re.findall(r'<li class="export" id="export-([0-9a-f-]+)"[^>]*data-state="(\w+)"', text)
    )


def count_jobs(sessions: sessionmaker[Session]) -> int:
    with sessions() as session:
        return session.scalar(select(func.count()).select_from(ExportJob)) or 0


def user_id(sessions: sessionmaker[Session], email: str) -> int:
    with sessions() as session:
        user = find_user(session, email)
        assert user is not None
        return user.id


def admin_job(sessions: sessionmaker[Session], population: Population, **values: Any) -> uuid.UUID:
    """An export of the account's admin, inserted directly (``values``: state and columns)."""
    return make_job(
        sessions,
        account_id=population.account_id,
        user_id=user_id(sessions, "admin@acme.test"),
        **values,
    )


def cancel_all(sessions: sessionmaker[Session]) -> None:
    with transaction(sessions) as session:
        session.execute(
            update(ExportJob)
            .where(ExportJob.state.in_([ExportState.QUEUED, ExportState.RUNNING]))
            .values(state=ExportState.CANCELED)
        )


def test_button_form_carries_the_applied_filters(app: Starlette) -> None:
    admin = browser(app, "admin@acme.test")
    query = "status=paid&status=refunded&channel=web&min_total=10.50&sort=-total&limit=20"
    page = admin.get(f"/accounts/acme/orders?{query}")
    assert page.status_code == 200 and page.headers["cache-control"] == "no-store"
    fields = Forms(page.text).find(id="export-form")
    assert fields[0][0] == "csrf_token"
    applied = parse_filters(
        {k: [v for n, v in parse_qsl(query) if n == k] for k, _ in parse_qsl(query)},
        ignore=("limit",),
    )
    assert fields[1:] == applied.to_query()  # the applied filters, not paging
    assert config_of(page.text)["filters"] == applied.to_snapshot()
    assert "Exports the applied filters: <strong>status paid, refunded; channel web" in page.text
    assert 'aria-labelledby="exports-heading"' in page.text


def test_export_form_needs_the_csrf_token(app: Starlette, sessions: sessionmaker[Session]) -> None:
    admin = browser(app, "admin@acme.test")
    before = count_jobs(sessions)
    for data in ({"status": "paid"}, {"status": "paid", "csrf_token": "forged"}):
        refused = admin.post("/accounts/acme/exports", data=data, follow_redirects=False)
        assert refused.status_code == 403
        assert "text/html" in refused.headers["content-type"]
    anonymous = browser(app).post("/accounts/acme/exports", data={}, follow_redirects=False)
    assert anonymous.status_code == 303  # log in, then back to the report (not to the POST)
    assert anonymous.headers["location"] == "/login?next=%2Faccounts%2Facme%2Forders"
    assert count_jobs(sessions) == before


def test_member_sees_why_and_is_refused(app: Starlette, sessions: sessionmaker[Session]) -> None:
    member = browser(app, "member@acme.test")
    page = member.get("/accounts/acme/orders")
    assert page.status_code == 200
    assert '<button type="button" disabled aria-describedby="export-note">Export CSV</button>' in (
        page.text
    )
    assert "Only admins of Acme can export orders" in page.text
    assert 'id="export-form"' not in page.text and 'id="export-list"' not in page.text
    csrf = Forms(page.text).find(action="/logout")[0][1]
    before = count_jobs(sessions)
    refused = member.post(
        "/accounts/acme/exports", data={"csrf_token": csrf}, follow_redirects=False
    )
    assert refused.status_code == 403
    assert count_jobs(sessions) == before


def test_no_js_request_cancel_retry_and_download(
    app: Starlette, sessions: sessionmaker[Session], runner: ExportRunner
) -> None:
    cancel_all(sessions)
    admin = browser(app, "admin@acme.test")
    # Given the report shows (applied) filters that select more rows than the threshold
    page = admin.get("/accounts/acme/orders?channel=web&channel=pos&sort=number")
    fields = Forms(page.text).find(id="export-form")
    # When the Export CSV form is posted as the page rendered it
    done = submit(admin, "/accounts/acme/exports", fields, follow_redirects=False)
    # Then it redirects back to the report with those filters, the export queued in the panel
    assert done.status_code == 303
    assert done.headers["location"] == "/accounts/acme/orders?channel=web&channel=pos&sort=number"
    back = admin.get(done.headers["location"])
    assert flash_of(back.text).startswith("Export requested.")
    (export_id, state), *_ = item_states(back.text).items()
    assert state == "queued"
    with sessions() as session:
        job = session.get_one(ExportJob, uuid.UUID(export_id))
        assert job.filters == OrderFilters(channel=("web", "pos"), sort="number").to_snapshot()
    assert flash_of(admin.get(done.headers["location"]).text) == ""  # said once
    # Cancel through its form, back to the page the button was on
    cancel = Forms(back.text).find(action=f"/exports/{export_id}/cancel")
    assert dict(cancel)["next"] == "/accounts/acme/orders?channel=web&channel=pos&sort=number"
    canceled = submit(admin, f"/exports/{export_id}/cancel", cancel, follow_redirects=False)
    assert canceled.status_code == 303 and canceled.headers["location"] == dict(cancel)["next"]
    after = admin.get(canceled.headers["location"]).text
    assert item_states(after)[export_id] == "canceled" and flash_of(after) == "Export canceled."
    # Export again (retry) from the export's own page, then a worker makes the file
    own = admin.get(f"/exports/{export_id}")
    assert own.status_code == 200
    retry = Forms(own.text).find(action=f"/exports/{export_id}/retry")
    assert dict(retry)["next"] == f"/exports/{export_id}"
    retried = submit(admin, f"/exports/{export_id}/retry", retry, follow_redirects=False)
    assert retried.headers["location"] == f"/exports/{export_id}"
    assert item_states(admin.get(f"/exports/{export_id}").text)[export_id] == "queued"
    assert runner.run(uuid.UUID(export_id)).outcome is RunOutcome.READY
    ready = admin.get(f"/exports/{export_id}").text
    assert item_states(ready)[export_id] == "ready"
    link = re.search(r'data-field="download" href="([^"]+)"', ready)
    assert link, ready
    file = admin.get(link.group(1).replace("&amp;", "&"))
    assert file.status_code == 200 and file.headers["content-type"] == "text/csv; charset=utf-8"


def test_small_export_is_ready_when_the_page_comes_back(
    app: Starlette, sessions: sessionmaker[Session]
) -> None:
    admin = browser(app, "admin@acme.test")
    fields = Forms(admin.get("/accounts/acme/orders?status=canceled&channel=phone").text).find(
        id="export-form"
    )
    page = submit(admin, "/accounts/acme/exports", fields)
    assert page.status_code == 200 and flash_of(page.text).startswith("Your export is ready")
    assert next(iter(item_states(page.text).values())) == "ready"


def test_refusals_are_shown_on_the_page(app: Starlette, sessions: sessionmaker[Session]) -> None:
    admin = browser(app, "admin@acme.test")
    fields = Forms(admin.get("/accounts/acme/orders?status=pending").text).find(id="export-form")
    with transaction(sessions) as session:
        set_flag(session, "exports_enabled", False)
    try:
        # The switch went off after the page was shown: the click explains, nothing is made
        before = count_jobs(sessions)
        page = submit(admin, "/accounts/acme/exports", fields)
        assert page.status_code == 200 and count_jobs(sessions) == before
        assert flash_of(page.text).startswith("exports are switched off for now")
        assert 'class="flash flash-error" role="alert"' in page.text
        # And the page no longer offers the button, but says why
        assert 'id="export-form"' not in page.text
        assert "Exports are switched off for now." in page.text
    finally:
        with transaction(sessions) as session:
            set_flag(session, "exports_enabled", True)
    assert 'id="export-form"' in admin.get("/accounts/acme/orders").text


def test_bad_filters_offer_no_export(app: Starlette) -> None:
    admin = browser(app, "admin@acme.test")
    page = admin.get("/accounts/acme/orders?min_total=lots")
    assert page.status_code == 422
    assert 'id="export-form"' not in page.text and "Fix the filters above" in page.text


@pytest.mark.parametrize(
    ("code", "retryable", "says", "retry_button"),
    [
        ("storage_unavailable", True, "temporary problem", True),
        ("query_timeout", False, "Narrow the filters", False),
        ("too_many_rows", False, "Narrow the filters", False),
        ("internal_error", False, "contact support", False),
    ],
)
def test_export_page_explains_failures(
    app: Starlette,
    sessions: sessionmaker[Session],
    population: Population,
    code: str,
    retryable: bool,
    says: str,
    retry_button: bool,
) -> None:
    export_id = admin_job(
        sessions,
        population,
        state=ExportState.FAILED,
        filters=OrderFilters(status=("paid",), placed_from=dt.date(2025, 1, 1)),
        error_code=code,
        error_message=f"Reason for {code}.",
        error_class="retryable"
        if retryable
        else ("user" if code != "internal_error" else "engineering"),
    )
    page = browser(app, "admin@acme.test").get(f"/exports/{export_id}")
    assert page.status_code == 200
    assert f"Reason for {code}." in page.text and says in page.text
    assert '<span class="badge badge-failed">Failed</span>' in page.text
    assert (f'action="/exports/{export_id}/retry"' in page.text) is retry_button
    if says == "Narrow the filters":
        assert (
            "Change the filters" in page.text
            and "status=paid&amp;placed_from=2025-01-01" in page.text
        )
    if code == "internal_error":
        assert str(export_id) in page.text.split("contact support")[1][:80]


def test_export_page_is_for_admins_of_the_account(
    app: Starlette, sessions: sessionmaker[Session], population: Population
) -> None:
    export_id = admin_job(sessions, population)
    assert browser(app, "member@acme.test").get(f"/exports/{export_id}").status_code == 404
    assert browser(app, "admin@globex.test").get(f"/exports/{export_id}").status_code == 404
    assert browser(app, "admin@acme.test").get("/exports/not-a-uuid").status_code == 404
    anonymous = browser(app).get(f"/exports/{export_id}", follow_redirects=False)
    assert anonymous.status_code == 303
    assert anonymous.headers["location"] == f"/login?next=%2Fexports%2F{export_id}"


class Links:
    """Download links for the admin, made by hand so their expiry can be anything."""

    def __init__(self, app_settings: Settings, sessions: sessionmaker[Session]) -> None:
        self.keys = SigningKeys.from_settings(app_settings)
        self.admin = user_id(sessions, "admin@acme.test")

    def make(self, export_id: str, *, seconds: int) -> str:
        moment = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)
        return download_path(self.keys, export_id=export_id, user_id=self.admin, expires_at=moment)


@pytest.fixture(scope="module")
def ready_export(app: Starlette, sessions: sessionmaker[Session]) -> str:
    admin = browser(app, "admin@acme.test")
    fields = Forms(admin.get("/accounts/acme/orders?status=refunded&channel=pos").text).find(
        id="export-form"
    )
    page = submit(admin, "/accounts/acme/exports", fields)
    (export_id, state), *_ = item_states(page.text).items()
    assert state == "ready"
    return export_id


def test_expired_link_lands_on_the_export_page_with_a_fresh_link(
    app: Starlette,
    app_settings: Settings,
    sessions: sessionmaker[Session],
    population: Population,
    ready_export: str,
) -> None:
    stale = Links(app_settings, sessions).make(ready_export, seconds=-5)
    # A browser: the export's page, 410, the reason, and a fresh link that works
    page = browser(app, "admin@acme.test").get(stale)
    assert page.status_code == 410 and "text/html" in page.headers["content-type"]
    assert page.headers["cache-control"] == "no-store"
    assert "This download link has expired. Use the fresh download link below" in page.text
    fresh = re.search(r'data-field="download" href="([^"]+)"', page.text)
    assert fresh and fresh.group(1).replace("&amp;", "&") != stale
    assert urlsplit(fresh.group(1)).path == f"/exports/{ready_export}/download"
    again = browser(app, "admin@acme.test").get(fresh.group(1).replace("&amp;", "&"))
    assert again.status_code == 200 and again.headers["content-type"].startswith("text/csv")
    # An API client: exactly the JSON error it always got
    api = TestClient(app, base_url="http://127.0.0.1")
    response = api.get(stale, headers={"Authorization": f"Bearer {population.tokens['admin']}"})
    assert response.status_code == 410
    assert response.json()["error"]["code"] == "link_expired"


def test_tampered_link_lands_on_the_export_page_as_403(
    app: Starlette, app_settings: Settings, sessions: sessionmaker[Session], population: Population,
    ready_export: str,
) -> None:  # fmt: skip
    link = Links(app_settings, sessions).make(ready_export, seconds=600)
    tampered = link[:-1] + ("0" if link[-1] != "0" else "1")
    page = browser(app, "admin@acme.test").get(tampered)
    assert page.status_code == 403
    assert "This download link is not valid for you" in page.text
    assert 'data-field="download"' in page.text
    api = TestClient(app, base_url="http://127.0.0.1")
    response = api.get(tampered, headers={"Authorization": f"Bearer {population.tokens['admin']}"})
    assert response.status_code == 403 and response.json()["error"]["code"] == "bad_signature"
    member = browser(app, "member@acme.test").get(link)
    assert member.status_code == 403 and "Not allowed" in member.text  # no page for members


def test_expired_file_lands_on_the_export_page_with_re_export(
    app: Starlette, app_settings: Settings, sessions: sessionmaker[Session], population: Population
) -> None:
    cancel_all(sessions)
    export_id = str(
        admin_job(
            sessions,
            population,
            state=ExportState.EXPIRED,
            filters=OrderFilters(channel=("phone",), status=("paid",)),
        )
    )
    link = Links(app_settings, sessions).make(export_id, seconds=600)
    admin = browser(app, "admin@acme.test")
    page = admin.get(link)
    assert page.status_code == 410
    assert "This export's file has expired and was deleted. Export the same filters again" in (
        html.unescape(page.text)
    )
    assert '<span class="badge badge-expired">Expired</span>' in page.text
    assert '<button type="submit" class="primary">Re-export</button>' in page.text
    fields = Forms(page.text).find(action=f"/exports/{export_id}/retry")
    requeued = submit(admin, f"/exports/{export_id}/retry", fields)
    assert requeued.status_code == 200 and item_states(requeued.text)[export_id] == "queued"
    api = TestClient(app, base_url="http://127.0.0.1")
    response = api.get(link, headers={"Authorization": f"Bearer {population.tokens['admin']}"})
    assert response.status_code == 404  # queued again: no file (JSON as before)


@pytest.mark.parametrize(
    ("state", "values", "verdict", "words"),
    [
        (ExportState.READY, {}, "fine", "fine"),
        (ExportState.QUEUED, {}, "fine", "fine"),
        (
            ExportState.FAILED,
            {"error_code": "query_timeout", "error_class": "user"},
            "user_can_fix",
            "you can fix it",
        ),
        (
            ExportState.FAILED,
            {"error_code": "storage_unavailable", "error_class": "retryable"},
            "user_can_fix",
            "you can fix it",
        ),
        (
            ExportState.FAILED,
            {"error_code": "internal_error", "error_class": "engineering"},
            "needs_engineering",
            "we are on it",
        ),
    ],
)
def test_page_and_api_give_the_support_verdict_in_the_users_words(
    app: Starlette,
    sessions: sessionmaker[Session],
    population: Population,
    state: ExportState,
    values: dict[str, Any],
    verdict: str,
    words: str,
) -> None:
    from shared import support

    # Given an export in some state
    export_id = admin_job(
        sessions,
        population,
        state=state,
        **values,
    )
    with sessions() as session:
        job = session.get_one(ExportJob, export_id)
        expected = support.diagnose(job, now=dt.datetime.now(dt.UTC)).verdict
    assert expected.value == verdict  # the one verdict support reads
    admin = browser(app, "admin@acme.test")
    # When the admin looks at its page and at the JSON API the script draws from
    page = admin.get(f"/exports/{export_id}")
    body = admin.get(f"/api/v1/order-exports/{export_id}", headers={"Accept": "application/json"})
    # Then both carry the same verdict, in the user's words
    assert body.json()["export"]["verdict"] == verdict
    assert f'<span class="verdict verdict-{verdict}">{words}</span>' in page.text
    # And so does the fragment the script polls (the panel is drawn on the server only)
    fragment = admin.get(f"/exports/{export_id}/panel")
    assert f'<span class="verdict verdict-{verdict}">{words}</span>' in fragment.text
    cancel_all(sessions)


def _ready_export(admin: TestClient, filters: str = "status=canceled&channel=phone") -> str:
    """A small export made in the request through the page's own form; its id."""
    fields = Forms(admin.get(f"/accounts/acme/orders?{filters}").text).find(id="export-form")
    page = submit(admin, "/accounts/acme/exports", fields)
    ready = [i for i, state in item_states(page.text).items() if state == "ready"]
    assert ready, page.text
    return ready[0]


def test_no_js_delete_file_asks_first_then_expires_the_export(
    app: Starlette, sessions: sessionmaker[Session]
) -> None:
    admin = browser(app, "admin@acme.test")
    export_id = _ready_export(admin)
    page = admin.get(f"/exports/{export_id}").text
    link = re.search(r'href="([^"]+)"[^>]*>Delete file<', page)
    # Given the Delete file control of a ready export: a link to a confirmation step
    assert link and link.group(1) == f"/exports/{export_id}/delete-file"
    confirm = admin.get(link.group(1))
    assert confirm.status_code == 200 and confirm.headers["cache-control"] == "no-store"
    assert "cannot be undone" in confirm.text
    assert item_states(admin.get(f"/exports/{export_id}").text)[export_id] == "ready"  # not yet
    fields = Forms(confirm.text).find(action=f"/exports/{export_id}/delete-file", method="post")
    # The form needs the CSRF token
    forged = [(k, "forged" if k == "csrf_token" else v) for k, v in fields]
    refused = submit(admin, f"/exports/{export_id}/delete-file", forged, follow_redirects=False)
    assert refused.status_code == 403
    # When the user confirms
    done = submit(admin, f"/exports/{export_id}/delete-file", fields, follow_redirects=False)
    # Then the export's page shows it expired, deleted by whom and when
    assert done.status_code == 303 and done.headers["location"] == f"/exports/{export_id}"
    after = admin.get(done.headers["location"]).text
    assert item_states(after)[export_id] == "expired"
    assert flash_of(after) == "File deleted."
    with sessions() as session:
        job = session.get_one(ExportJob, uuid.UUID(export_id))
        assert job.file_deleted_at is not None
        shown = job.file_deleted_at.astimezone(ZoneInfo(TIMEZONE)).strftime("%Y-%m-%d %H:%M")
    assert f"The file was deleted by admin at {shown}." in after
    assert "Delete file" not in after
    # And a second confirmation is refused on the page (nothing left to delete)
    again = submit(admin, f"/exports/{export_id}/delete-file", fields)
    assert "only ready exports have a file to delete" in flash_of(again.text)


def test_members_cannot_reach_the_delete_step(app: Starlette) -> None:
    admin = browser(app, "admin@acme.test")
    export_id = _ready_export(admin, "status=canceled&channel=pos")
    member = browser(app, "member@acme.test")
    assert member.get(f"/exports/{export_id}/delete-file").status_code == 404


def test_the_export_page_lists_the_latest_downloads(app: Starlette) -> None:
    admin = browser(app, "admin@acme.test")
    export_id = _ready_export(admin, "status=canceled&channel=web")
    page = admin.get(f"/exports/{export_id}").text
    assert "No downloads yet." in page
    link = re.search(r'data-field="download" href="([^"]+)"', page)
    assert link
    url = link.group(1).replace("&amp;", "&")
    assert admin.get(url, headers={"Range": "bytes=0-9"}).status_code == 206
    assert browser(app, "member@acme.test").get(url).status_code == 403
    listed = admin.get(f"/exports/{export_id}").text
    section = listed.split('id="downloads"', 1)[1].split("</section>", 1)[0]
    rows = re.findall(r"<tr>(.*?)</tr>", section, re.S)[1:]
    assert len(rows) == 2
    assert "member@acme.test" in rows[0] and "Refused: not an admin" in rows[0]
    assert "admin@acme.test" in rows[1] and "Downloaded (bytes 0-9)" in rows[1]


def test_the_export_form_offers_the_two_options_and_the_panel_shows_them(
    app: Starlette, sessions: sessionmaker[Session]
) -> None:
    admin = browser(app, "admin@acme.test")
    page = admin.get("/accounts/acme/orders?status=canceled&channel=marketplace").text
    form = page.split('id="export-form"', 1)[1].split("</form>", 1)[0]
    bom = re.search(r'<input type="checkbox" name="utf8_bom" value="true" id="([\w-]+)"', form)
    gzip = re.search(r'<input type="checkbox" name="compression" value="gzip" id="([\w-]+)"', form)
    assert bom and gzip
    assert f'<label for="{bom.group(1)}">Excel-friendly (UTF-8 BOM)</label>' in form
    assert f'<label for="{gzip.group(1)}">Compress (.csv.gz)</label>' in form
    # Ticking both: the export uses both options, and the panel says so
    fields = [*Forms(page).find(id="export-form"), ("utf8_bom", "true"), ("compression", "gzip")]
    done = submit(admin, "/accounts/acme/exports", fields)
    assert flash_of(done.text).startswith("Your export is ready")
    export_id = next(iter(item_states(done.text)))
    with sessions() as session:
        job = session.get_one(ExportJob, uuid.UUID(export_id))
        assert (job.utf8_bom, job.compression) == (True, "gzip")
        assert job.file_name is not None and job.file_name.endswith(".csv.gz")
        assert (
            job.filters
            == OrderFilters(status=("canceled",), channel=("marketplace",)).to_snapshot()
        )
    item = done.text.split(f'id="export-{export_id}"', 1)[1].split("</li>", 1)[0]
    assert "Excel-friendly (UTF-8 BOM), Compressed (.csv.gz)" in item
    own = admin.get(f"/exports/{export_id}").text
    assert "<dt>Options</dt><dd>Excel-friendly (UTF-8 BOM), Compressed (.csv.gz)</dd>" in own
    # Ticking none: a plain export, shown without options
    plain = submit(admin, "/accounts/acme/exports", Forms(page).find(id="export-form"))
    plain_id = next(iter(item_states(plain.text)))
    with sessions() as session:
        job = session.get_one(ExportJob, uuid.UUID(plain_id))
        assert (job.utf8_bom, job.compression) == (False, "none")
    plain_item = plain.text.split(f'id="export-{plain_id}"', 1)[1].split("</li>", 1)[0]
    assert "export-options" not in plain_item
    assert '<label for="option-gzip">Compress (.csv.gz)</label>' in page


def test_the_script_polls_the_panel_drawn_by_the_server(
    app: Starlette, sessions: sessionmaker[Session], population: Population
) -> None:
    export_id = admin_job(sessions, population)
    admin = browser(app, "admin@acme.test")
    page = admin.get("/accounts/acme/orders?status=paid")
    poll_url = config_of(page.text)["poll_url"]
    assert poll_url.startswith("/accounts/acme/exports/panel?next=")
    # The fragment holds the very items the page drew, with their forms coming back to the page
    fragment = admin.get(poll_url)
    assert fragment.status_code == 200 and fragment.headers["cache-control"] == "no-store"
    assert item_states(fragment.text) == item_states(page.text)
    assert str(export_id) in item_states(fragment.text)
    assert 'name="next" value="/accounts/acme/orders?status=paid"' in fragment.text
    assert 'data-announce="Export queued: all orders."' in fragment.text
    assert "<html" not in fragment.text and 'id="export-list"' not in fragment.text
    # A next elsewhere is not followed; one export's page polls its item alone
    elsewhere = admin.get("/accounts/acme/exports/panel", params={"next": "//evil.test/"})
    assert 'name="next" value="/accounts/acme/orders"' in elsewhere.text
    single = admin.get(f"/exports/{export_id}/panel")
    assert list(item_states(single.text)) == [str(export_id)]
    # Members, other accounts and the logged-out get no items
    assert browser(app, "member@acme.test").get(poll_url).status_code == 403
    assert browser(app, "admin@globex.test").get(poll_url).status_code == 404
    assert TestClient(app).get(poll_url).status_code == 401
    cancel_all(sessions)


@pytest.fixture(scope="module")
def cached_switches(
    app_settings: Settings, population: Population
) -> Iterator[tuple[Starlette, str]]:
    """An app whose switches stay cached (its requests open no session of the flag cache), and
    a ready export of it."""
    app = create_app(app_settings, flag_cache_seconds=3600)
    with TestClient(app):
        yield app, _ready_export(browser(app, "admin@acme.test"))


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/accounts/acme/orders",
        "/accounts/acme/orders?placed_from=someday",  # 422: the page with the filter's error
        "/accounts/acme/exports/panel",
        "/exports/{id}",
        "/exports/{id}/panel",
        "/exports/{id}/delete-file",
        "/api/v1/accounts/acme/order-exports",
        "/api/v1/accounts/acme/orders",
    ],
)
def test_a_page_or_api_request_identifies_the_caller_in_its_one_session(
    cached_switches: tuple[Starlette, str], path: str
) -> None:
    """The caller, the page and its Exports panel share one session: one pool checkout."""
    app, export_id = cached_switches
    admin = browser(app, "admin@acme.test")
    url = path.format(id=export_id)
    assert admin.get(url).status_code in (200, 422)  # the switches are cached from here on
    engine = state_of(app).engine
    checkouts: list[str] = []

    def checked_out(*_: object) -> None:
        if threading.current_thread().name != "warm-up":  # the app's start, not a request
            checkouts.append(threading.current_thread().name)

    event.listen(engine, "checkout", checked_out)
    try:
        response = admin.get(url)
    finally:
        event.remove(engine, "checkout", checked_out)
    assert response.status_code in (200, 422), response.text
    assert len(checkouts) == 1, checkouts
