"""Screenshots of the orders report with its Exports panel in each export state, for the README.

    python scripts/screenshots.py [--out docs/screenshots]

Starts a live local stack (the end-to-end test harness: real servers and service processes on
127.0.0.1, stopped at the end), logs in as the demo admin in headless Chromium, drives exports
into each state for real (a paused worker pool, a cancel, a storage outage, an expired file) and
saves one 1280x800 PNG per state. Needs the test extras and Debian's chromium (with
``fonts-wqy-microhei`` and ``fonts-noto-color-emoji`` the demo's CJK and emoji names render too).
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Demo orders; the background exports below select 12,000 to 27,000 of them.
ORDERS = 30_000
#: Slow enough (bytes per second) that a running export can be caught mid-way.
STACK_ENV = {"EXPORT_MAX_BYTES_PER_SECOND": "400000"}
#: Longest wait for an export to reach a state (milliseconds).
STATE_TIMEOUT_MS = 90_000
ADMIN = ("admin@acme.test", "admin-password")
#: What the page says once the API has answered an Export CSV click.
ANSWERED = re.compile(r"Export requested|export is ready|already in progress")
#: The report as the admin filters it for each export (query strings).
FILTERS = {
    "expired": "status=refunded&channel=web",
    "failed": "status=paid&status=fulfilled&sort=-total",
    "canceled": "status=pending&status=paid&status=fulfilled&placed_from=2025-03-01",
    "live": "channel=web&channel=pos&channel=marketplace&sort=number",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))  # run from a checkout: the harness lives in tests/

    from playwright.sync_api import sync_playwright

    from tests.browser.conftest import CHROMIUM, CHROMIUM_ARGS, VIEWPORT
    from tests.support.stack import LiveStack

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="oex-shots-") as tmp:
        stack = LiveStack(Path(tmp), orders=ORDERS, env=STACK_ENV)
        try:
            stack.start()
            with sync_playwright() as driver:
                browser = driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                try:
                    page = browser.new_page(viewport=VIEWPORT)  # type: ignore[arg-type]
                    page.set_default_timeout(STATE_TIMEOUT_MS)
                    Shooter(stack, page, args.out).run()
                finally:
                    browser.close()
        finally:
            stack.stop()
    return 0


class Shooter:
    """Drives the admin's browser through the states and saves one PNG for each."""

    def __init__(self, stack: object, page: object, out: Path) -> None:
        from playwright.sync_api import Page

        from tests.support.stack import LiveStack

        assert isinstance(stack, LiveStack) and isinstance(page, Page)
        self.stack = stack
        self.page = page
        self.out = out

    def open(self, name: str) -> None:
        self.page.goto(f"{self.stack.api_url}/accounts/acme/orders?{FILTERS[name]}")

    def export(self, name: str) -> str:
        """Open the report with the filters of ``name``, click Export CSV, return the id."""
        self.open(name)
        self.page.get_by_role("button", name="Export CSV").click()
        self.page.locator("#export-message").filter(has_text=ANSWERED).wait_for()
        export_id = self.page.locator("#export-list li.export").first.get_attribute("data-id")
        assert export_id
        return export_id

    def wait_state(self, export_id: str, state: str) -> None:
        self.page.locator(f'#export-{export_id}[data-state="{state}"]').wait_for()

    def shoot(self, state: str) -> None:
        self.page.mouse.move(0, 0)  # no hover effects
        path = self.out / f"exports-{state}.png"
        self.page.screenshot(path=str(path))
        print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")

    def set_flag(self, name: str, value: bool) -> None:
        from shared.db import make_engine, make_sessionmaker, transaction
        from shared.flags import set_flag

        engine = make_engine(self.stack.database_url, pool_size=1)
        try:
            with transaction(make_sessionmaker(engine)) as session:
                set_flag(session, name, value)
        finally:
            engine.dispose()

    def run(self) -> None:
        from shared.signing import SigningKeys, download_path

        stack, page = self.stack, self.page
        page.goto(f"{stack.api_url}/login?next=/accounts/acme/orders")
        page.get_by_label("Email").fill(ADMIN[0])
        page.get_by_label("Password").fill(ADMIN[1])
        page.get_by_role("button", name="Log in").click()
        page.wait_for_url("**/accounts/acme/orders")

        # expired: a small export (made in the request) whose file reached its expiry
        expired = self.export("expired")
        self.wait_state(expired, "ready")
        stack.sql(
            "UPDATE export_jobs SET expires_at = now() - interval '1 second' WHERE id = %s"
            " RETURNING id",
            expired,
        )  # housekeeping deletes the file and marks the export expired within seconds
        self.wait_state(expired, "expired")
        self.open("expired")
        self.shoot("expired")

        # failed: object storage is down while the export runs (it fails for real)
        stack.stop_s3()
        try:
            self.wait_state(self.export("failed"), "failed")
        finally:
            stack.start_s3()
        self.shoot("failed")

        # canceled: workers paused, so it waits in the queue until the admin cancels it
        self.set_flag("workers_paused", True)
        canceled = self.export("canceled")
        page.locator(f"#export-{canceled}").get_by_role("button", name="Cancel").click()
        self.wait_state(canceled, "canceled")
        self.shoot("canceled")

        # queued -> running -> ready: one export, watched live
        live = self.export("live")
        time.sleep(3)  # let the waiting time show
        page.locator(f"#export-{live} [data-field=waited]").filter(has_text="s").wait_for()
        self.shoot("queued")
        self.set_flag("workers_paused", False)
        self.wait_state(live, "running")
        progress = page.locator(f"#export-{live} progress")
        deadline = time.monotonic() + 60
        while float(progress.get_attribute("value") or 0) < 35 and time.monotonic() < deadline:
            time.sleep(0.2)
        self.shoot("running")
        self.wait_state(live, "ready")
        self.shoot("ready")

        # an expired download link opened in the browser: the export's page explains
        admin_id = stack.sql("SELECT id FROM users WHERE email = %s", ADMIN[0])[0][0]
        stale = download_path(
            SigningKeys.from_settings(stack.settings()),
            export_id=live,
            user_id=admin_id,
            expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1),
        )
        page.goto(f"{stack.api_url}{stale}")
        self.shoot("link-expired")


if __name__ == "__main__":
    sys.exit(main())
