"""The web UI in real headless Chromium against the real stack (tiny profile, loopback).

The tests run in file order on one stack: the first sees its first start, the last deletes
specialists. Each test opens the page in a fresh browser context (empty localStorage).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import time
from pathlib import Path

import grpc
import pytest
from playwright.sync_api import Page, expect

from sma.v1 import training_pb2 as T
from sma.v1 import training_pb2_grpc
from tests.conftest import synthetic_documents, write_domain
from tests.e2e.conftest import Stack, job_processes, wait_for
from tests.ui.conftest import Console, SlowLink, descendants, signal_all

pytestmark = pytest.mark.slow

MESSAGE = "the list"
GREEDY = {"max_new_tokens": 56, "temperature": 0.0, "top_k": 40, "top_p": 0.95}
SLOW = 120_000  # ms: a training operation on a loaded CI machine


def open_ui(page: Page, stack: Stack, url: str | None = None) -> None:
    page.goto(url or stack.url)
    expect(page.locator("#status-text")).to_contain_text("Serving", timeout=SLOW)
    expect(page.locator(".specialist").first).to_be_visible()


def settings(page: Page, max_new_tokens: int, temperature: float) -> None:
    page.locator(".settings summary").click()
    page.get_by_label("Max tokens").fill(str(max_new_tokens))
    page.get_by_label("Temperature").fill(str(temperature))


def send(page: Page, text: str) -> None:
    page.get_by_label("Message").fill(text)
    page.get_by_label("Message").press("Enter")


def last_reply(page: Page):
    return page.locator(".turn.model").last


def training_job(stack: Stack) -> list[int]:
    """The first-start training job's processes, once the training server has started it."""
    try:
        server = stack.pids()["training"]
    except (OSError, KeyError, ValueError):
        return []
    jobs = []
    for pid in descendants(server):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in command:  # a multiprocessing child, not its resource tracker
            jobs += [pid, *descendants(pid)]
    return jobs


def test_a_first_start_shows_progress_and_a_clear_message(
    page: Page, console: Console, ui_stack: Stack, shots: Path
) -> None:
    # The tiny first start trains in seconds: hold its job still (SIGSTOP) while the page looks.
    job = wait_for(lambda: training_job(ui_stack), timeout=120, every=0.02)
    signal_all(job, signal.SIGSTOP)
    try:
        wait_for(ui_stack.health, timeout=60)
        page.goto(ui_stack.url)
        status = page.locator("#status-text")
        expect(status).to_contain_text("First start: training the model")
        expect(page.locator("#status-progress")).to_be_visible()
        send(page, MESSAGE)
        error = page.locator("#chat-error")
        expect(error).to_be_visible()
        expect(error).to_contain_text(re.compile(r"Model is training \(\d+%\)"))
        expect(page.get_by_label("Message")).to_have_value(MESSAGE)  # given back to resend
        expect(page.locator(".turn")).to_have_count(0)
        page.screenshot(path=shots / "01-first-start.png")
    finally:
        signal_all(job, signal.SIGCONT)

    # The generalist serves as soon as it is written: hold the job still once it names it,
    # while the specialists train, and chat with it.
    try:
        held = hold_when_a_version_is_written(ui_stack, job)
        assert held.state == T.JOB_STATE_RUNNING and held.version_id == "v0001"
        expect(status).to_contain_text(
            re.compile(r"Serving v0001 · cpu · tiny profile · first start: .+, \d+%"), timeout=SLOW
        )
        expect(page.locator("#status-progress")).to_be_visible()
        settings(page, 4, 0.0)
        send(page, MESSAGE)
        expect(last_reply(page).locator(".meta")).to_contain_text("4 tokens", timeout=SLOW)
        assert ui_stack.http.get("/specialists").json() == []  # what serves: none yet
        page.screenshot(path=shots / "01b-generalist-serves.png")
    finally:
        signal_all(job, signal.SIGCONT)
    expect(status).to_contain_text(
        re.compile(r"Serving v\d+ · cpu · tiny profile · ready"), timeout=SLOW
    )
    expect(page.locator("#status-progress")).to_be_hidden()
    refused = "the server responded with a status of 503"  # the refused message, logged
    assert [e for e in console.errors if refused not in e] == [], console.errors


def hold_when_a_version_is_written(stack: Stack, job: list[int]) -> T.Job:
    """SIGSTOP the first start's job the moment it names a version it wrote; that job."""
    with grpc.insecure_channel(stack.grpc_address("training")) as channel:
        stub = training_pb2_grpc.TrainingStub(channel)
        jobs = stub.ListJobs(T.ListJobsRequest(), timeout=10).jobs
        (first,) = [j for j in jobs if j.kind == T.JOB_KIND_TRAIN_ALL]
        for reply in stub.WatchJob(T.WatchJobRequest(id=first.id), timeout=120):
            if reply.job.version_id:
                signal_all(job, signal.SIGSTOP)
                return reply.job
    raise AssertionError("the first start's job ended without naming a version")


def test_the_page_loads_offline_with_no_console_errors(
    page: Page, console: Console, ui_stack: Stack
) -> None:
    ui_stack.wait_ready()
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    open_ui(page, ui_stack)
    names = page.locator(".specialist .name").all_inner_texts()
    assert sorted(names) == sorted(ui_stack.http.get("/specialists").json()) == ["dl", "ds"]
    for label in ("Message", "Max tokens", "Temperature", "Top-k", "Top-p", "Add a specialist"):
        expect(page.get_by_label(label, exact=True)).to_have_count(1)
    expect(page.get_by_role("button", name="Delete specialist ds")).to_be_enabled()
    assert all(url.startswith(ui_stack.url) or url.startswith("data:") for url in requests)
    assert console.errors == [], console.errors


def test_the_api_docs_render_offline_from_this_server_alone(
    page: Page, console: Console, ui_stack: Stack
) -> None:
    """Swagger UI (`/docs`) loads its script, style and icon from the gateway (FastAPI's
    default page fetches them from a CDN and is blank offline) and renders the schema; there
    is no ReDoc page, whose logo comes from a CDN whatever it is given."""
    ui_stack.wait_ready()
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.goto(ui_stack.url + "/docs")
    expect(page.locator(".opblock").first).to_be_visible(timeout=30_000)
    assert any(url.endswith("/openapi.json") for url in requests)
    outside = [u for u in requests if not u.startswith((ui_stack.url, "data:", "blob:"))]
    assert outside == []
    assert console.errors == [], console.errors
    assert ui_stack.http.get("/redoc").status_code == 404


# Records the reply's length at every DOM change and at every painted frame until it completes.
WATCH_GROWTH = """() => {
  const log = document.getElementById('log');
  const seen = window.growth = {changes: [], frames: []};
  const text = () => log.querySelector('.turn.model:last-child .text');
  new MutationObserver(() => { if (text()) seen.changes.push(text().textContent.length); })
    .observe(log, {subtree: true, childList: true, characterData: true});
  const frame = () => {
    const reply = log.querySelector('.turn.model:last-child');
    if (reply) seen.frames.push([reply.classList.contains('streaming'), text().textContent.length]);
    if (!reply || reply.classList.contains('streaming')) requestAnimationFrame(frame);
  };
  requestAnimationFrame(frame);
}"""


def test_a_reply_streams_token_by_token_and_draws_the_gate(
    page: Page, console: Console, ui_stack: Stack, slow_link: SlowLink, shots: Path
) -> None:
    open_ui(page, ui_stack, slow_link.url)
    settings(page, GREEDY["max_new_tokens"], GREEDY["temperature"])
    page.evaluate(WATCH_GROWTH)
    send(page, MESSAGE)
    reply = last_reply(page)
    expect(reply.locator(".meta")).to_contain_text("56 tokens · ended by length", timeout=SLOW)

    expected = ui_stack.http.post("/generate", json={"prompt": MESSAGE, **GREEDY}).json()
    text = reply.locator(".text").inner_text()
    assert text == expected["completion"]
    growth = page.evaluate("window.growth")
    assert len(set(growth["changes"])) >= 10, growth  # rendered as the tokens came
    partial = {n for streaming, n in growth["frames"] if streaming and 0 < n < len(text)}
    assert len(partial) >= 2, growth["frames"]  # painted part-way, more than once

    layers = ui_stack.health()["model"]["n_layer"]
    rows = page.locator("#gates svg g.layer")
    expect(rows).to_have_count(layers)
    for i in range(layers):
        assert rows.nth(i).locator("rect").count() >= 1
    expect(page.locator("#gates-caption")).to_contain_text("over the last reply (56 tokens")
    page.screenshot(path=shots / "02-chat-streamed.png")
    assert console.errors == [], console.errors


def test_the_stop_button_stops_the_stream(
    page: Page, ui_stack: Stack, slow_link: SlowLink, shots: Path
) -> None:
    open_ui(page, ui_stack, slow_link.url)
    settings(page, GREEDY["max_new_tokens"], GREEDY["temperature"])
    full = ui_stack.http.post("/generate", json={"prompt": MESSAGE, **GREEDY}).json()
    send(page, MESSAGE)
    reply = last_reply(page)
    expect(reply.locator(".text")).not_to_have_text("")  # the reply has begun
    page.get_by_role("button", name="Stop").click()
    expect(page.locator("#stop")).to_be_hidden()
    expect(reply).to_have_class(re.compile(r"\bstopped\b"))
    expect(reply.locator(".meta")).to_have_text("Stopped.")
    text = reply.locator(".text").inner_text()
    assert 0 < len(text) < len(full["completion"]) and full["completion"].startswith(text)
    time.sleep(0.5)
    assert reply.locator(".text").inner_text() == text  # nothing more arrives
    expect(page.get_by_role("button", name="Send")).to_be_enabled()
    wait_for(lambda: ui_stack.health()["model"]["active_streams"] == 0, timeout=10)
    page.screenshot(path=shots / "03-stopped.png")


def test_history_goes_in_the_prompt_survives_a_reload_and_can_be_cleared(
    page: Page, ui_stack: Stack
) -> None:
    open_ui(page, ui_stack)
    settings(page, 8, 0.0)
    box = page.get_by_label("Message")
    box.fill("the")
    box.press("Shift+Enter")  # a new line, not a send
    box.type("list")
    expect(box).to_have_value("the\nlist")
    expect(page.locator(".turn")).to_have_count(0)
    send(page, MESSAGE)
    expect(last_reply(page).locator(".meta")).to_contain_text("8 tokens")
    first = last_reply(page).locator(".text").inner_text()
    with page.expect_request("**/generate/stream") as request:
        send(page, "open the file")
    assert request.value.post_data_json["prompt"] == f"{MESSAGE}{first}\n\nopen the file"
    expect(page.locator(".turn")).to_have_count(4)
    expect(last_reply(page).locator(".meta")).to_contain_text("8 tokens")

    page.reload()
    expect(page.locator(".turn")).to_have_count(4)  # kept in the browser

    # A reply that takes most of the context leaves room for the newest message only.
    settings(page, 60, 0.0)
    with page.expect_request("**/generate/stream") as request:
        send(page, "json")
    assert request.value.post_data_json["prompt"] == "json"
    expect(last_reply(page).locator(".meta")).to_contain_text("left out to fit the context")

    page.get_by_role("button", name="New conversation").click()
    expect(page.locator(".turn")).to_have_count(0)
    with page.expect_request("**/generate/stream") as request:
        send(page, "the dict")
    assert request.value.post_data_json["prompt"] == "the dict"


def test_a_new_conversation_during_a_reply_drops_that_reply(
    page: Page, ui_stack: Stack, slow_link: SlowLink
) -> None:
    open_ui(page, ui_stack, slow_link.url)
    send(page, MESSAGE)
    expect(last_reply(page).locator(".text")).not_to_have_text("")
    page.get_by_role("button", name="New conversation").click()
    expect(page.locator("#stop")).to_be_hidden()
    expect(page.locator(".turn")).to_have_count(0)
    page.reload()
    expect(page.locator(".specialist").first).to_be_visible()
    expect(page.locator(".turn")).to_have_count(0)  # not kept either


def test_a_setting_out_of_range_gets_a_message_not_a_request(page: Page, ui_stack: Stack) -> None:
    open_ui(page, ui_stack)
    settings(page, 500, 0.75)  # the tiny model's context is 64; 0.75 is fine
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    send(page, MESSAGE)
    expect(page.locator("#chat-error")).to_have_text(
        "Max tokens must be a whole number from 1 to 63."
    )
    expect(page.get_by_label("Message")).to_have_value(MESSAGE)
    assert not [url for url in requests if "/generate" in url]
    page.get_by_label("Max tokens").fill("8")
    send(page, MESSAGE)
    expect(last_reply(page).locator(".meta")).to_contain_text("8 tokens")
    expect(page.locator("#chat-error")).to_be_hidden()


def test_forcing_a_specialist_routes_the_next_message_to_it(page: Page, ui_stack: Stack) -> None:
    open_ui(page, ui_stack)
    settings(page, 8, 0.0)
    choice = page.get_by_label("Routing for ds", exact=True)
    choice.select_option("force")
    expect(page.locator("#routing-note")).to_have_text("Next message: only ds")
    with page.expect_request("**/generate/stream") as request:
        send(page, MESSAGE)
    assert request.value.post_data_json["routing"] == {"force": ["ds"], "exclude": []}
    expect(last_reply(page).locator(".meta")).to_contain_text("forced ds")
    chart = page.locator("#gates svg")
    expect(chart).to_have_attribute("aria-label", re.compile("ds 1.00"))
    label = chart.get_attribute("aria-label") or ""
    assert label.count("ds 1.00") == ui_stack.health()["model"]["n_layer"], label
    expect(choice).to_have_value("auto")  # for the next message only
    expect(page.locator("#routing-note")).to_have_text("")


def test_an_invalid_name_shows_the_servers_message(
    page: Page, ui_stack: Stack, shots: Path
) -> None:
    open_ui(page, ui_stack)
    before = ui_stack.http.get("/v1/specialists").json()
    for name, hint in (("Bad Name", "invalid specialist name"), ("nosuch", "data/nosuch")):
        server = ui_stack.http.post("/specialists?wait=false", json={"name": name})
        assert server.status_code == 400
        page.get_by_label("Add a specialist").fill(name)
        page.get_by_role("button", name="Add specialist").click()
        error = page.locator("#add-error")
        expect(error).to_have_text(server.json()["detail"])
        assert hint in error.inner_text()
    page.screenshot(path=shots / "04-invalid-name.png")
    assert ui_stack.http.get("/v1/specialists").json() == before
    expect(page.locator(".operation")).to_have_count(0)


# Records every text the operation rows show.
WATCH_OPERATIONS = """() => {
  const ops = document.getElementById('operations');
  window.opTexts = [];
  new MutationObserver(() => window.opTexts.push(ops.innerText))
    .observe(ops, {subtree: true, childList: true, characterData: true});
}"""


def test_adding_a_specialist_shows_a_progress_bar_then_the_entry(
    page: Page, ui_stack: Stack, shots: Path
) -> None:
    write_domain(ui_stack.home / "data", "apps", synthetic_documents("dl", 30, seed=5))
    open_ui(page, ui_stack)
    expect(page.get_by_label("Routing for ds", exact=True)).to_have_count(1)
    before = swatches(page)
    assert len(set(before.values())) == len(before) == 3  # general, dl, ds
    page.evaluate(WATCH_OPERATIONS)
    page.get_by_label("Add a specialist").fill("apps")
    page.get_by_role("button", name="Add specialist").click()
    bar = page.locator(".operation progress")
    expect(bar).to_be_visible()
    expect(page.locator(".operation .op-title")).to_contain_text("Adding apps")
    corpus = page.locator(".operation .op-corpus")  # what was read, before it trains
    expect(corpus).to_contain_text("Read 1 file, 30 documents")
    expect(corpus).to_contain_text("tokens to train on")
    expect(corpus).to_contain_text("held out")
    expect(page.get_by_role("button", name="Add specialist")).to_be_disabled()
    page.screenshot(path=shots / "05-adding.png")

    entry = page.locator('.specialist[data-name="apps"]')
    expect(entry.locator(".badge")).to_have_text("ready", timeout=SLOW)
    # the outcome stays: the version now serving, the gain on its own text, the others
    outcome = page.locator(".operation.outcome")
    version = ui_stack.health()["serving_version"]
    expect(outcome.locator(".op-title")).to_have_text(f"Adding apps: done, {version} serves")
    detail = outcome.locator(".op-detail")
    expect(detail).to_contain_text("apps: perplexity ")
    expect(detail).to_contain_text("of its documents routed to it")
    for other in ("general", "dl", "ds"):
        expect(detail).to_contain_text(re.compile(rf"{other} [+−]\d+\.\d\d%"))
    page.screenshot(path=shots / "06a-outcome.png")
    outcome.get_by_role("button", name="Dismiss").click()
    expect(page.locator(".operation")).to_have_count(0)
    texts = page.evaluate("window.opTexts")
    assert any(re.search(r"training apps · \d+% · loss \d", t) for t in texts), texts  # live
    assert "apps" in ui_stack.http.get("/specialists").json()
    expect(page.get_by_label("Routing for apps", exact=True)).to_have_count(1)
    page.screenshot(path=shots / "06-added.png")
    # "apps" sorts before every other name: no expert takes another's colour, now or reloaded
    page.reload()
    expect(page.get_by_label("Routing for apps", exact=True)).to_have_count(1)
    after = swatches(page)
    assert {name: after[name] for name in before} == before
    assert after["apps"] not in before.values()


def swatches(page: Page) -> dict[str, str]:
    """Each expert's colour in the routing control."""
    return page.evaluate(
        """() => Object.fromEntries([...document.querySelectorAll("#routing label.route")]
            .map((l) => [l.querySelector("select").dataset.expert,
                         l.querySelector(".swatch").style.background]))"""
    )


def test_an_add_can_be_cancelled_while_it_trains(page: Page, ui_stack: Stack) -> None:
    write_domain(ui_stack.home / "data", "halted", synthetic_documents("ds", 20, seed=13))
    open_ui(page, ui_stack)
    page.get_by_label("Add a specialist").fill("halted")
    page.get_by_role("button", name="Add specialist").click()
    expect(page.locator(".operation .op-title")).to_contain_text("Adding halted")
    page.get_by_role("button", name="Cancel Adding halted").click()
    expect(page.locator(".operation")).to_have_count(0, timeout=SLOW)
    expect(page.locator('.specialist[data-name="halted"]')).to_have_count(0)
    expect(page.get_by_role("button", name="Add specialist")).to_be_enabled()
    assert "halted" not in ui_stack.http.get("/specialists").json()
    assert list((ui_stack.home / "data" / "halted").glob("*.txt"))  # the corpus stays


def test_an_unusable_corpus_is_refused_at_once_with_its_reason(page: Page, ui_stack: Stack) -> None:
    folder = ui_stack.home / "data" / "latin"
    folder.mkdir()
    (folder / "bad.txt").write_bytes(b"caf\xe9 " * 50)
    open_ui(page, ui_stack)
    page.get_by_label("Add a specialist").fill("latin")
    page.get_by_role("button", name="Add specialist").click()
    expect(page.locator("#add-error")).to_contain_text("bad.txt is not valid UTF-8 text (byte 3)")
    expect(page.locator(".operation")).to_have_count(0)  # nothing was started
    expect(page.locator('.specialist[data-name="latin"]')).to_have_count(0)


def test_a_failed_training_shows_its_reason_and_can_be_retried(
    page: Page, ui_stack: Stack, shots: Path
) -> None:
    write_domain(ui_stack.home / "data", "broken", synthetic_documents("ds", 200, seed=8))
    open_ui(page, ui_stack)
    page.get_by_label("Add a specialist").fill("broken")
    page.get_by_role("button", name="Add specialist").click()
    training = ui_stack.pids()["training"]
    child = wait_for(lambda: next(iter(job_processes(training)), None), timeout=60, every=0.05)
    os.kill(child, signal.SIGKILL)  # the job's process dies: the add fails, with the reason
    failure = page.locator(".operation.failed")
    expect(failure).to_contain_text("killed by signal 9", timeout=SLOW)
    entry = page.locator('.specialist[data-name="broken"]')
    expect(entry.locator(".badge")).to_have_text("failed")
    expect(entry.locator(".error")).to_contain_text("signal 9")
    expect(page.get_by_role("button", name="Delete specialist broken")).to_have_count(0)
    page.screenshot(path=shots / "07-failed.png")
    page.get_by_role("button", name="Dismiss").click()
    expect(failure).to_have_count(0)

    page.get_by_role("button", name="Retry specialist broken").click()
    expect(entry.locator(".badge")).to_have_text("ready", timeout=SLOW)
    expect(entry.locator(".error")).to_have_count(0)


def test_an_add_over_the_drift_limit_can_be_made_anyway(page: Page, ui_stack: Stack) -> None:
    """An add whose model would make another domain worse than the limit fails with the
    figures, and the UI offers to add it anyway: the same add, published whatever it does.
    The page's request is given a limit of 0% (none at all), so that any domain made worse
    refuses it; a specialist of general's own kind of text moves the others a little."""
    write_domain(ui_stack.home / "data", "mirror", synthetic_documents("general", 40, seed=21))
    open_ui(page, ui_stack)
    sent: list[dict] = []

    def strict(route) -> None:
        body = json.loads(route.request.post_data or "{}")
        body.setdefault("max_drift", 0)
        sent.append(body)
        route.continue_(post_data=json.dumps(body))

    page.route(re.compile(r".*/specialists\?wait=false$"), strict)
    page.get_by_label("Add a specialist").fill("mirror")
    page.get_by_role("button", name="Add specialist").click()
    failure = page.locator(".operation.failed")
    expect(failure).to_contain_text("worse than the 0% limit", timeout=SLOW)
    expect(failure).to_contain_text(re.compile(r"(general|dl|ds) \+\d+\.\d\d% \("))  # figures
    assert "mirror" not in ui_stack.http.get("/specialists").json()  # nothing published

    failure.get_by_role("button", name="Add mirror anyway").click()
    entry = page.locator('.specialist[data-name="mirror"]')
    expect(entry.locator(".badge")).to_have_text("ready", timeout=SLOW)
    assert [b["max_drift"] for b in sent] == [0, 1000]
    assert "mirror" in ui_stack.http.get("/specialists").json()
    # the later tests count the specialists as they were
    assert ui_stack.http.delete("/specialists/mirror").status_code == 200


def phrases(n: int, seed: int) -> list[str]:
    """Documents of one small, regular kind of text: a few phrases in a fixed order, which a
    branch learns far better than the base predicts them."""
    rng = random.Random(seed)
    lines = ("alpha beta gamma delta", "one two three four five", "red green blue", "x y z")
    return [" ; ".join(lines[(i + k) % 4] for k in range(rng.randint(8, 16))) for i in range(n)]


def test_a_delete_over_the_drift_limit_can_be_made_anyway(page: Page, ui_stack: Stack) -> None:
    """The same for a delete: a branch can carry part of another domain's text, so removing it
    can make that domain worse. `pair-b` learns `pair-a`'s kind of text from five times as
    much of it, `pair-a`'s own included, so `pair-a`'s held-out text leans on it; under a
    limit of 0% (any domain made worse at all), removing `pair-b` is refused with the figures
    and nothing changes. **Delete anyway** removes it without asking to confirm again."""
    data = ui_stack.home / "data"
    write_domain(data, "pair-a", phrases(40, seed=31))
    shutil.copytree(data / "pair-a", data / "pair-b")
    write_domain(data, "pair-b", phrases(160, seed=32), file="more.txt")
    for name in ("pair-a", "pair-b"):
        added = ui_stack.http.post(
            "/specialists", json={"name": name, "max_drift": 1000}, timeout=SLOW / 1000
        )
        assert added.status_code == 200, added.text
    sent: list[str] = []

    def strict(route) -> None:
        sent.append(route.request.url)
        route.continue_(url=route.request.url + "&max_drift=0")

    try:
        open_ui(page, ui_stack)
        page.route(re.compile(r".*/specialists/pair-b\?wait=false$"), strict)
        page.get_by_role("button", name="Delete specialist pair-b").click()
        page.locator("#confirm-ok").click()
        failure = page.locator(".operation.failed")
        expect(failure).to_contain_text("worse than the 0% limit", timeout=SLOW)
        expect(failure).to_contain_text(re.compile(r"pair-a \+\d+\.\d\d% \("))  # figures
        assert "pair-b" in ui_stack.http.get("/specialists").json()  # nothing published
        assert list((data / "pair-b").glob("*.txt"))  # the corpus stays

        failure.get_by_role("button", name="Delete pair-b anyway").click()
        expect(page.locator("#confirm")).to_be_hidden()
        expect(page.locator('.specialist[data-name="pair-b"]')).to_have_count(0, timeout=SLOW)
        outcome = page.locator(".operation.outcome")
        expect(outcome.locator(".op-title")).to_contain_text("Deleting pair-b: done")
        assert len(sent) == 1  # the second request carried its own limit, not the test's
        assert "pair-b" not in ui_stack.http.get("/specialists").json()
        assert list((data / ".deleted").glob("pair-b-*"))
        outcome.get_by_role("button", name="Dismiss").click()  # later tests count operations
    finally:  # the later tests count the specialists as they were
        for name in ("pair-b", "pair-a"):
            if name in ui_stack.http.get("/specialists").json():
                ui_stack.http.delete(
                    f"/specialists/{name}", params={"max_drift": 1000}, timeout=SLOW / 1000
                )


def test_deleting_specialists_removes_them_and_keeps_the_last(
    page: Page, console: Console, ui_stack: Stack, shots: Path
) -> None:
    open_ui(page, ui_stack)
    dialog = page.locator("#confirm")
    delete = page.get_by_role("button", name="Delete specialist apps")
    delete.focus()
    page.keyboard.press("Enter")  # by keyboard alone
    expect(dialog).to_be_visible()
    expect(dialog).to_contain_text("data/.deleted/")
    expect(page.get_by_role("button", name="Cancel")).to_be_focused()
    page.screenshot(path=shots / "08-delete-confirm.png")
    page.keyboard.press("Escape")  # cancel: nothing happens
    expect(dialog).to_be_hidden()
    time.sleep(3.5)  # a status poll or two: the list must not take the focus away
    expect(delete).to_be_focused()
    expect(page.locator(".operation")).to_have_count(0)

    for name in ("apps", "broken", "dl"):
        page.get_by_role("button", name=f"Delete specialist {name}").click()
        page.locator("#confirm-ok").click()
        expect(page.locator(".operation .op-title")).to_contain_text(f"Deleting {name}")
        expect(page.locator(f'.specialist[data-name="{name}"]')).to_have_count(0, timeout=SLOW)
        outcome = page.locator(".operation.outcome")
        expect(outcome.locator(".op-title")).to_contain_text(f"Deleting {name}: done")
        outcome.get_by_role("button", name="Dismiss").click()
        expect(page.locator(".operation")).to_have_count(0)
        assert name not in ui_stack.http.get("/specialists").json()
        assert list((ui_stack.home / "data" / ".deleted").glob(f"{name}-*"))
    last = page.get_by_role("button", name="Delete specialist ds")
    expect(last).to_be_disabled()
    expect(last).to_have_attribute("title", "The model keeps at least one specialist")
    page.screenshot(path=shots / "09-last-specialist.png")
    assert console.errors == [], console.errors


def test_a_phone_width_screen_gets_one_column(page: Page, ui_stack: Stack, shots: Path) -> None:
    page.set_viewport_size({"width": 390, "height": 844})
    open_ui(page, ui_stack)
    send(page, MESSAGE)
    expect(last_reply(page).locator(".meta")).to_be_visible(timeout=SLOW)
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0
    chat = page.locator(".chat").bounding_box()
    side = page.locator(".side").bounding_box()
    assert chat and side and side["y"] >= chat["y"] + chat["height"]  # stacked, not side by side
    page.screenshot(path=shots / "10-phone.png", full_page=True)
