"""The chat on an imported instruct model, in real headless Chromium against the real stack:
the conversation goes to the server as `messages`, which the model's own chat template renders
(a model trained here gets one prompt of paragraphs instead: test_ui.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, Page, expect

from tests.conftest import synthetic_documents, write_domain
from tests.e2e.conftest import Stack
from tests.hf_models import hf_model, save_hf
from tests.ui.conftest import Console, fresh_page, ready_stack
from tests.ui.test_ui import last_reply, open_ui, send, settings

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def instruct_stack(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Iterator[Stack]:
    """A stack whose first start imports a tiny Qwen2 with a chat template of its own
    (`SMA_BASE`, as `sma up --base` passes it to the training service) and grows one
    specialist on it, a rank-4 delta on its attention (`SMA_BRANCH_RANK`)."""
    root = tmp_path_factory.mktemp("ui-instruct")
    folder = save_hf(hf_model("qwen2", tokenizer.get_vocab_size()), tokenizer, root / "qwen")
    home = root / "home"
    write_domain(home / "data", "general", synthetic_documents("general", 40))
    write_domain(home / "data", "ds", synthetic_documents("ds", 40))
    with ready_stack(home, {"SMA_BASE": str(folder), "SMA_BRANCH_RANK": "4"}) as running:
        yield running


@pytest.fixture
def instruct_page(browser: Browser, instruct_stack: Stack) -> Iterator[Page]:
    with fresh_page(browser) as page:
        yield page


def test_the_chat_goes_through_the_models_own_template(
    instruct_page: Page, instruct_stack: Stack
) -> None:
    page, console = instruct_page, Console(instruct_page)
    health = instruct_stack.health()
    assert health["model"]["chat_template"] == "own"
    assert health["model"]["dtype"] == "float32" and health["model"]["threads"] >= 1  # tiny
    assert health["serving_version"] == "v0002" and health["specialists"] == ["ds"]
    first = json.loads((instruct_stack.home / "artifacts/models/v0001/config.json").read_text())
    assert first["base"]["name"] == "qwen" and first["model"]["n_kv_head"] == 1
    open_ui(page, instruct_stack)
    settings(page, 6, 0.0)
    with page.expect_request("**/generate/stream") as request:
        send(page, "the array")
    assert request.value.post_data_json["messages"] == [{"role": "user", "content": "the array"}]
    assert "prompt" not in request.value.post_data_json
    expect(last_reply(page).locator(".meta")).to_contain_text("tokens")
    first = last_reply(page).locator(".text").inner_text()
    with page.expect_request("**/generate/stream") as request:
        send(page, "the list")
    assert request.value.post_data_json["messages"] == [
        {"role": "user", "content": "the array"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "the list"},
    ]
    expect(page.locator(".turn")).to_have_count(4)
    expect(last_reply(page).locator(".meta")).to_contain_text("tokens")
    # the server rendered the template: what /generate answers for the same chat
    reply = instruct_stack.http.post(
        "/generate", json={"messages": [{"role": "user", "content": "the array"}]}
    ).json()
    assert reply["prompt"] == "<|im_start|>the array<|im_end|>"
    assert reply["full_text"] == reply["prompt"] + reply["completion"]
    assert console.errors == [], console.errors


def test_a_specialist_added_at_runtime_grows_on_the_imported_base(instruct_stack: Stack) -> None:
    """An add through the API on the imported base: the training service trains the new
    branch's factors, the new version stores what it adds and names its base, and the
    inference service swaps to it and serves it, forced or mixed."""
    write_domain(instruct_stack.home / "data", "dl", synthetic_documents("dl", 40))
    reply = instruct_stack.http.post("/specialists", json={"name": "dl"}, timeout=180)
    assert reply.status_code == 200, reply.text
    assert sorted(reply.json()["specialists"]) == ["dl", "ds"]
    health = instruct_stack.wait_ready(60)
    version = health["serving_version"]
    assert version == health["loaded_version"] == "v0003"
    config = json.loads(
        (instruct_stack.home / f"artifacts/models/{version}/config.json").read_text()
    )
    assert config["model"]["branch_rank"] == 4 and config["delta_of"]["version"] == "v0001"
    assert (
        config["chat_template"]
        == json.loads((instruct_stack.home / "artifacts/models/v0001/config.json").read_text())[
            "chat_template"
        ]
    )
    chat = {"messages": [{"role": "user", "content": "the array"}], "max_new_tokens": 4}
    for routing in ({"force": ["dl"]}, {}):
        body = {**chat, **({"routing": routing} if routing else {})}
        answer = instruct_stack.http.post("/generate", json=body)
        assert answer.status_code == 200, answer.text
        assert answer.json()["prompt"] == "<|im_start|>the array<|im_end|>"
