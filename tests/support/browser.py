"""What the browser tests share: logging in through the login form of a live stack."""

from __future__ import annotations

from urllib.parse import quote

from playwright.sync_api import Page, expect

from shared.seeding import DEMO_ADMIN as ADMIN
from shared.seeding import DEMO_MEMBER as MEMBER
from tests.support.stack import LiveStack

__all__ = ["ADMIN", "MEMBER", "log_in"]


def log_in(page: Page, stack: LiveStack, who: tuple[str, str], path: str) -> None:
    """Open ``path`` logged out: the login form, then back to ``path`` as ``who``."""
    page.goto(f"{stack.api_url}{path}")
    expect(page).to_have_url(f"{stack.api_url}/login?next={quote(path, safe='')}")
    page.get_by_label("Email").fill(who[0])
    page.get_by_label("Password").fill(who[1])
    page.get_by_role("button", name="Log in").click()
    expect(page).to_have_url(f"{stack.api_url}{path}")
