"""The web UI against a stack that checks API keys: it asks for the key once (again only if the
server refuses it), keeps it in the browser, and shows a user key's refusal to change the
model as the server's sentence."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, Page, expect

from tests.e2e.conftest import Stack, tiny_home
from tests.ui.conftest import Console, fresh_page, ready_stack
from tests.ui.test_ui import SLOW, last_reply, send

pytestmark = pytest.mark.slow

USER_KEY = "ui-user-key-0123456789"
ADMIN_KEY = "ui-admin-key-0123456789"


@pytest.fixture(scope="module")
def keyed_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    keys = {"SMA_API_KEY": USER_KEY, "SMA_ADMIN_KEY": ADMIN_KEY}
    with ready_stack(tiny_home(tmp_path_factory.mktemp("ui-keys")), keys) as running:
        yield running


@pytest.fixture
def keyed_page(browser: Browser, keyed_stack: Stack) -> Iterator[Page]:
    with fresh_page(browser) as page:
        yield page


def test_the_page_asks_for_the_key_once_and_keeps_it(keyed_page: Page, keyed_stack: Stack) -> None:
    page, console = keyed_page, Console(keyed_page)
    page.goto(keyed_stack.url)
    dialog = page.locator("#key-dialog")
    expect(dialog).to_be_visible(timeout=SLOW)  # the list of specialists needs a key
    expect(page.get_by_label("Key", exact=True)).to_be_focused()
    page.get_by_label("Key", exact=True).fill("not-the-key-0123456789")
    page.get_by_role("button", name="Use this key").click()
    expect(dialog).to_be_visible()  # refused: asked again, saying why
    expect(page.locator("#key-error")).to_contain_text("that API key is not valid")
    page.get_by_label("Key", exact=True).fill(USER_KEY)
    page.keyboard.press("Enter")
    expect(dialog).to_be_hidden()
    expect(page.locator(".specialist").first).to_be_visible(timeout=SLOW)

    send(page, "the list")
    expect(last_reply(page).locator(".meta")).to_contain_text("tokens", timeout=SLOW)

    # a user key may not change the model: the server's sentence, under the add field
    page.get_by_label("Add a specialist").fill("ds")
    page.get_by_role("button", name="Add specialist").click()
    expect(page.locator("#add-error")).to_contain_text("needs an admin key")

    page.reload()  # the key stays in this browser: no dialog
    expect(page.locator(".specialist").first).to_be_visible(timeout=SLOW)
    expect(dialog).to_be_hidden()
    assert page.evaluate("localStorage.getItem('sma-api-key')") == USER_KEY
    assert [e for e in console.errors if "401" not in e and "403" not in e] == []
