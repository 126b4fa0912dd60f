"""The gateway's own HTTP plumbing, on the real app built in-process (no services behind it:
these requests never reach them)."""

from __future__ import annotations

import logging

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from gateway.app import create_app
from shiftable_lib.config import Settings


@pytest.fixture
def app(tmp_path) -> FastAPI:
    app = create_app(Settings(home=tmp_path, allowed_hosts="*"))

    async def broken() -> None:
        raise RuntimeError("a bug")

    app.add_api_route("/broken", broken)
    return app


def test_an_unexpected_error_is_a_500_carrying_the_request_id(
    app: FastAPI, caplog: pytest.LogCaptureFixture
) -> None:
    """Not Starlette's bare 500: the reply and the logged traceback share the request's id,
    so that a user can quote it and an operator find the line."""
    client = TestClient(app, raise_server_exceptions=False)  # no lifespan: nothing is dialled
    with caplog.at_level(logging.INFO):
        reply = client.get("/broken", headers={"X-Request-Id": "bug-1"})
    assert reply.status_code == 500
    assert reply.headers["x-request-id"] == "bug-1"
    assert reply.json() == {"detail": "internal server error (request id bug-1)"}
    errors = [r for r in caplog.records if r.name == "sma.gateway" and r.exc_info]
    assert len(errors) == 1 and "RuntimeError: a bug" in caplog.text
    access = [r for r in caplog.records if r.name == "sma.gateway.access"]
    assert access and '"GET /broken" 500' in access[-1].getMessage()
    metrics = app.state.gateway.metrics.render()[0].decode()
    assert 'route="/broken",status="500"' in metrics
