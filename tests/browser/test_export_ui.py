"""The export as an account admin sees it, in a real browser against the real local stack:
log in, filter, Export CSV, watch queued -> running -> ready without a reload, download; a
member; a storage outage and Retry; the kill switch; a download link that has expired."""

from __future__ import annotations

import csv
import datetime as dt
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
from playwright.sync_api import Locator, Page, Route, expect

from shared.db import make_engine, make_sessionmaker, transaction
from shared.flags import CACHE_SECONDS, set_flag
from shared.signing import SigningKeys, download_path
from tests.support.browser import ADMIN, MEMBER, log_in
from tests.support.reports import guarded, report_rows
from tests.support.stack import LiveStack, running

pytestmark = pytest.mark.browser

#: Orders of the demo account; the exports below select 10,000 to 27,000 of them.
ORDERS = 30_000
#: ~1.5 MB/s: a 27,000-row export runs about two seconds, long enough to watch it run.
STACK_ENV = {"EXPORT_MAX_BYTES_PER_SECOND": "1500000"}
#: Longest wait for an export to change state (milliseconds).
STATE_TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    live = LiveStack(Path(tmp_path_factory.mktemp("browser-stack")), orders=ORDERS, env=STACK_ENV)
    yield from running(live)


def mark_window(page: Page) -> None:
    page.evaluate("window.__notReloaded = true")


def assert_not_reloaded(page: Page) -> None:
    assert page.evaluate("window.__notReloaded === true"), "the page was reloaded"


def click_export(page: Page) -> Locator:
    """Click Export CSV; the export the click made (the panel's first item)."""
    page.get_by_role("button", name="Export CSV").click()
    expect(page.locator("#export-message")).to_contain_text("Export requested")
    export_id = page.locator("#export-list li.export").first.get_attribute("data-id")
    return page.locator(f"#export-{export_id}")


def test_admin_exports_the_applied_filters_and_watches_it_live(
    page: Page, stack: LiveStack, api: httpx2.Client
) -> None:
    log_in(page, stack, ADMIN, "/accounts/acme/orders")
    # Given the admin filters the report (three channels, by order number) and applies it
    form = page.get_by_role("form", name="Report filters")
    for channel in ("web", "pos", "marketplace"):
        form.get_by_label(channel, exact=True).check()
    page.get_by_label("Sort").select_option("number")
    page.get_by_role("button", name="Apply filters").click()
    expect(page).to_have_url(
        f"{stack.api_url}/accounts/acme/orders?channel=web&channel=pos&channel=marketplace"
        "&sort=number"
    )  # the URL holds the filters: the page can be shared and reloaded
    # And then changes a filter on screen without applying it
    form.get_by_label("phone", exact=True).check()
    expect(page.locator("#unapplied-note")).to_be_visible()
    mark_window(page)
    # When they click Export CSV
    item = click_export(page)
    # Then the export of the APPLIED filters appears and goes queued -> running -> ready live
    expect(item.locator(".export-title")).to_have_text("channel web, pos, marketplace")
    expect(item).to_have_attribute("data-state", "queued")
    expect(item.locator(".badge")).to_have_text("Queued")
    expect(item).to_have_attribute("data-state", "running", timeout=STATE_TIMEOUT_MS)
    expect(item.locator("progress")).to_be_visible()
    expect(item.locator('[data-field="progress"]')).to_contain_text(" rows")
    expect(item).to_have_attribute("data-state", "ready", timeout=STATE_TIMEOUT_MS)
    expect(item.locator(".badge")).to_have_text("Ready")
    expect(item.locator(".export-detail")).to_contain_text("available until")
    assert_not_reloaded(page)
    # And the downloaded file holds exactly the report's rows for the applied filters
    with page.expect_download() as download_info:
        item.get_by_role("link", name="Download CSV").click()
    download = download_info.value
    assert download.suggested_filename.startswith("orders-acme-")
    with open(download.path(), encoding="utf-8", newline="") as file:
        rows = list(csv.reader(file))
    expected = report_rows(api, {"channel": ["web", "pos", "marketplace"], "sort": "number"})
    assert len(rows) > 20_000
    assert rows[0] == expected[0] and rows[1:] == [guarded(r) for r in expected[1:]]
    assert not any(row[5] == "phone" for row in rows[1:])  # the unapplied filter is not in it
    assert_not_reloaded(page)


def test_member_sees_why_there_is_no_export(page: Page, stack: LiveStack) -> None:
    log_in(page, stack, MEMBER, "/accounts/acme/orders")
    button = page.get_by_role("button", name="Export CSV")
    expect(button).to_be_disabled()
    expect(page.locator("#export-note")).to_have_text(
        "Only admins of Acme Inc. can export orders. Ask an admin if you need a file."
    )
    expect(page.locator("#export-list")).to_have_count(0)


def test_expired_link_lands_on_the_export_page_with_a_fresh_link(
    page: Page, stack: LiveStack, api: httpx2.Client
) -> None:
    # Given a small export (made inside the request) and a link to it that has expired
    response = api.post(
        "/api/v1/accounts/acme/order-exports",
        json={"filters": {"status": ["refunded"], "channel": ["web"]}},
    )
    assert response.status_code == 201, response.text
    export = response.json()["export"]
    admin_id = stack.sql("SELECT id FROM users WHERE email = %s", ADMIN[0])[0][0]
    stale = download_path(
        SigningKeys.from_settings(stack.settings()),
        export_id=export["id"],
        user_id=admin_id,
        expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5),
    )
    log_in(page, stack, ADMIN, f"/exports/{export['id']}")
    # When the admin opens it in the browser
    landed = page.goto(f"{stack.api_url}{stale}")
    # Then they land on the export's page, told why, with a fresh link that works
    assert landed is not None and landed.status == 410
    expect(page.get_by_role("alert")).to_have_text(
        "This download link has expired. Use the fresh download link below; it is made for you."
    )
    expect(page.get_by_role("heading", level=1)).to_have_text("Export of Acme Inc. orders")
    with page.expect_download() as download_info:
        page.get_by_role("link", name="Download CSV").click()
    with open(download_info.value.path(), encoding="utf-8", newline="") as file:
        assert len(list(csv.reader(file))) == export["row_count"] + 1


def test_a_new_export_is_in_the_list_when_it_is_announced(
    page: Page, stack: LiveStack, api: httpx2.Client
) -> None:
    # Given an earlier export at the top of the panel
    earlier = api.post("/api/v1/accounts/acme/order-exports", json={"filters": {"q": "a"}})
    assert earlier.status_code in {200, 201, 202}, earlier.text
    log_in(page, stack, ADMIN, "/accounts/acme/orders?sort=-number")
    expect(page.locator("#export-list li.export").first).to_have_attribute(
        "data-id", earlier.json()["export"]["id"]
    )

    # And the panel the server draws is slow to arrive (1.5 s)
    def slow_panel(route: Route) -> None:
        time.sleep(1.5)
        route.continue_()

    page.route("**/accounts/acme/exports/panel**", slow_panel)
    # When the admin clicks Export CSV
    with page.expect_response("**/api/v1/accounts/acme/order-exports") as posted:
        page.get_by_role("button", name="Export CSV").click()
    export_id = posted.value.json()["export"]["id"]
    # Then by the time the page says so, the new export is the first item of the list
    expect(page.locator("#export-message")).to_contain_text("Export requested")
    assert page.locator("#export-list li.export").first.get_attribute("data-id") == export_id
    page.unroute("**/accounts/acme/exports/panel**")


def test_storage_outage_fails_with_its_reason_and_retry_works(page: Page, stack: LiveStack) -> None:
    log_in(page, stack, ADMIN, "/accounts/acme/orders?status=paid&sort=-total")
    mark_window(page)
    # Given object storage is down when the export runs
    stack.stop_s3()
    try:
        item = click_export(page)
        # Then the export fails for real and says why, with a Retry button
        expect(item).to_have_attribute("data-state", "failed", timeout=STATE_TIMEOUT_MS)
    finally:
        stack.start_s3()
    expect(item.locator(".badge")).to_have_text("Failed")
    expect(item.locator(".reason")).to_have_text(
        "The file could not be stored on any attempt. Retry the export in a few minutes."
    )
    expect(item.locator(".hint")).to_contain_text("retry the export")
    expect(item.locator(".verdict")).to_have_text("you can fix it")  # support's verdict, drawn live
    expect(page.locator("#export-message")).to_contain_text("Export failed")
    # When storage is back and the admin clicks Retry
    item.get_by_role("button", name="Retry").click()
    # Then the same export runs again and becomes ready, still without a reload
    expect(item).to_have_attribute("data-state", "ready", timeout=STATE_TIMEOUT_MS)
    expect(item.get_by_role("link", name="Download CSV")).to_be_visible()
    expect(item.locator(".verdict")).to_have_text("fine")
    assert_not_reloaded(page)


def test_kill_switch_hides_the_button_and_explains(page: Page, stack: LiveStack) -> None:
    log_in(page, stack, ADMIN, "/accounts/acme/orders")
    expect(page.get_by_role("button", name="Export CSV")).to_be_enabled()
    engine = make_engine(stack.database_url, pool_size=1)
    sessions = make_sessionmaker(engine)
    try:
        with transaction(sessions) as session:
            set_flag(session, "exports_enabled", False)
        time.sleep(CACHE_SECONDS + 0.2)  # the API trusts its cached switches this long
        page.reload()
        expect(page.get_by_role("button", name="Export CSV")).to_have_count(0)
        expect(page.locator("#export-note")).to_have_text(
            "Exports are switched off for now. Files that are already made stay downloadable."
        )
        expect(page.locator("#export-list")).to_be_visible()  # earlier files stay reachable
    finally:
        with transaction(sessions) as session:
            set_flag(session, "exports_enabled", True)
        engine.dispose()
