"""Real headless Chromium (Debian's `chromium`, driven by Playwright) against a real stack.

The stack is `sma up` with the tiny profile on loopback, as in tests/e2e. Screenshots of the
main states go to tests/ui/output/ (ignored by git) for a person to look at.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, sync_playwright

from tests.e2e.conftest import Stack, tiny_home

CHROMIUM = "/usr/bin/chromium"
OUTPUT = Path(__file__).resolve().parent / "output"
# Chromium, as root in a closed network: no sandbox, and no calls home that would fail.
ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-gpu", "--no-first-run"]


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `make install` installs Debian's chromium")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="session")
def shots() -> Path:
    shutil.rmtree(OUTPUT, ignore_errors=True)
    OUTPUT.mkdir(parents=True)
    return OUTPUT


@pytest.fixture(scope="module")
def ui_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack on its first start: the first test sees it training, later ones wait for it."""
    running = Stack(tiny_home(tmp_path_factory.mktemp("ui"))).start()
    try:
        yield running
    finally:
        running.stop()


class SlowLink:
    """A loopback TCP relay to the gateway that delivers Server-Sent Events one every `gap`
    seconds, as a real link from a model decoding at 1/gap tokens per second (20) would.

    The tiny test model decodes a whole reply in a few milliseconds, inside one painted frame,
    and Chromium's own network throttling holds a streamed body back until it ends; this relay
    is how a test sees a reply arrive over time. Bytes pass through unchanged.
    """

    def __init__(self, target_port: int, gap: float = 0.05) -> None:
        self.target_port = target_port
        self.gap = gap
        self.loop = asyncio.new_event_loop()
        self.port = 0
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._relay, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()
        server.close()
        self.loop.run_until_complete(server.wait_closed())

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        await asyncio.gather(
            self._pipe(client_r, server_w, paced=False),
            self._pipe(server_r, client_w, paced=True),
            return_exceptions=True,
        )

    async def _pipe(self, reader, writer, paced: bool) -> None:
        streaming, head = False, b""
        try:
            while chunk := await reader.read(65536):
                if paced and not streaming:  # the header may come over several reads
                    head = (head + chunk)[-4096:]
                    streaming = b"text/event-stream" in head
                if not streaming:
                    writer.write(chunk)
                    await writer.drain()
                    continue
                *whole, rest = chunk.split(b"\n\n")  # whole events, then a part of one
                for event in whole:
                    writer.write(event + b"\n\n")
                    await writer.drain()
                    await asyncio.sleep(self.gap)
                writer.write(rest)
                await writer.drain()
        finally:
            writer.close()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def slow_link(ui_stack: Stack) -> Iterator[SlowLink]:
    link = SlowLink(ui_stack.port)
    try:
        yield link
    finally:
        link.close()


class Console:
    """Every console error and uncaught exception of a page."""

    def __init__(self, page: Page) -> None:
        self.errors: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(message.text)


@contextlib.contextmanager
def fresh_page(browser: Browser) -> Iterator[Page]:
    """A page in a fresh browser context (empty localStorage) at 1280x800."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    try:
        yield context.new_page()
    finally:
        context.close()


@contextlib.contextmanager
def ready_stack(home: Path, env: dict | None = None) -> Iterator[Stack]:
    """A stack on `home`, once it serves; stopped afterwards."""
    running = Stack(home, env=env).start()
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()


@pytest.fixture
def page(browser: Browser, ui_stack: Stack) -> Iterator[Page]:
    with fresh_page(browser) as page:
        yield page


@pytest.fixture
def console(page: Page) -> Console:
    return Console(page)


def descendants(pid: int) -> list[int]:
    """Every process under `pid` (Linux /proc), children first."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            found += [child, *descendants(child)]
    return found


def signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
