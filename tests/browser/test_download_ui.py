"""Export options and Delete file in a real browser against the real local stack: tick both
options, export, download and check the file; delete a ready export's file from its page."""

from __future__ import annotations

import csv
import gzip
import io
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
from playwright.sync_api import Dialog, Page, expect

from tests.support.browser import ADMIN, log_in
from tests.support.reports import guarded, report_rows
from tests.support.stack import LiveStack, running

pytestmark = pytest.mark.browser

#: Orders of the demo account; the exports below select a few hundred to a few thousand.
ORDERS = 5_000


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    live = LiveStack(Path(tmp_path_factory.mktemp("download-stack")), orders=ORDERS)
    yield from running(live)


def test_both_options_give_a_gzipped_excel_friendly_file_of_the_report(
    page: Page, stack: LiveStack, api: httpx2.Client
) -> None:
    log_in(page, stack, ADMIN, "/accounts/acme/orders?status=refunded&sort=number")
    # Given the admin ticks both options next to Export CSV
    page.get_by_label("Excel-friendly (UTF-8 BOM)").check()
    page.get_by_label("Compress (.csv.gz)").check()
    # When they export (a small export: ready in the request)
    page.get_by_role("button", name="Export CSV").click()
    expect(page.locator("#export-message")).to_contain_text("Your export is ready")
    item = page.locator("#export-list li.export").first
    expect(item).to_have_attribute("data-state", "ready")
    expect(item.locator(".export-options")).to_have_text(
        "Excel-friendly (UTF-8 BOM), Compressed (.csv.gz)"
    )
    # Then the download is a .csv.gz: gunzipped, a BOM and exactly the report's rows
    with page.expect_download() as download_info:
        item.get_by_role("link", name="Download CSV").click()
    download = download_info.value
    assert download.suggested_filename.startswith("orders-acme-")
    assert download.suggested_filename.endswith(".csv.gz")
    data = gzip.decompress(Path(download.path()).read_bytes())
    assert data.startswith(b"\xef\xbb\xbf")
    rows = list(csv.reader(io.StringIO(data[3:].decode("utf-8"), newline="")))
    expected = report_rows(api, {"status": ["refunded"], "sort": "number"})
    assert len(rows) > 100
    assert rows[0] == expected[0] and rows[1:] == [guarded(r) for r in expected[1:]]


def test_an_admin_deletes_a_ready_export_from_its_page(
    page: Page, stack: LiveStack, api: httpx2.Client
) -> None:
    created = api.post(
        "/api/v1/accounts/acme/order-exports", json={"filters": {"status": ["canceled"]}}
    )
    assert created.status_code == 201
    export_id = created.json()["export"]["id"]
    log_in(page, stack, ADMIN, f"/exports/{export_id}")
    item = page.locator(f"#export-{export_id}")
    expect(item).to_have_attribute("data-state", "ready")
    # When the admin clicks Delete file, is asked to confirm, and confirms
    asked: list[str] = []

    def confirm(dialog: Dialog) -> None:
        asked.append(dialog.message)
        dialog.accept()

    page.once("dialog", confirm)
    item.get_by_role("link", name="Delete file").click()
    # Then the export is expired with the reason, without a reload, and its link is gone
    expect(item).to_have_attribute("data-state", "expired")
    expect(item.locator(".badge")).to_have_text("Expired")
    expect(item.locator('[data-field="deleted"]')).to_contain_text(
        "The file was deleted by admin at"
    )
    expect(page.locator("#export-message")).to_have_text("File deleted.")
    assert asked and "cannot be undone" in asked[0]
    expect(item.get_by_role("link", name="Download CSV")).to_have_count(0)
    # And after a reload the page still says who deleted it
    page.reload()
    expect(page.locator(f'#export-{export_id} [data-field="deleted"]')).to_contain_text(
        "deleted by admin at"
    )
    assert api.get(f"/api/v1/order-exports/{export_id}").json()["export"]["state"] == "expired"


def test_dismissing_the_confirmation_keeps_the_file(
    page: Page, stack: LiveStack, api: httpx2.Client
) -> None:
    created = api.post(
        "/api/v1/accounts/acme/order-exports", json={"filters": {"channel": ["phone"]}}
    )
    export_id = created.json()["export"]["id"]
    log_in(page, stack, ADMIN, f"/exports/{export_id}")
    page.once("dialog", lambda dialog: dialog.dismiss())
    page.locator(f"#export-{export_id}").get_by_role("link", name="Delete file").click()
    expect(page.locator(f"#export-{export_id}")).to_have_attribute("data-state", "ready")
    assert api.get(f"/api/v1/order-exports/{export_id}").json()["export"]["state"] == "ready"
