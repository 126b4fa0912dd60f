"""The FastAPI gateway: the original REST surface, SSE streams, metrics and the web UI, over gRPC.

Routes (gateway/routes/, one module per resource) stay thin: they validate the body, call one
service (or the lifecycle coordinator) and translate the answer. gRPC status codes become HTTP
statuses in one exception handler here.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.resources import files

import grpc
from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.backends import error_status, http_status
from gateway.deps import FRONTEND, Gateway
from gateway.metrics import Metrics
from gateway.openai import OpenAIError, error_body
from gateway.routes import generate, health, openai, operations, specialists, versions
from shiftable_lib import logs
from shiftable_lib.auth import Keys
from shiftable_lib.auth import Scope as KeyScope
from shiftable_lib.config import Settings
from shiftable_lib.errors import ShiftableError
from shiftable_lib.sampling import MAX_PROMPT_CHARS

log = logging.getLogger("sma.gateway")
access = logging.getLogger("sma.gateway.access")

# room for the longest prompt as JSON may spell it: a character outside the BMP escaped as a
# surrogate pair is 12 bytes (\ud83d\ude00); the rest of a body (stop strings, ...) fits the
# margin. Whole KiB, as the Ingress's proxy-body-size (deploy/) says it.
MAX_BODY = (-(-12 * MAX_PROMPT_CHARS // 1024) + 256) * 1024
TOO_LARGE = f"request body over {MAX_BODY} bytes"


class LimitBody:
    """413 for a body over MAX_BODY bytes, whatever its framing: a declared Content-Length over
    the limit is refused before anything is read, and any other body (chunked) is counted as
    it arrives and refused the moment it passes the limit, so it is never read whole."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            response = _refusal(scope.get("path", ""), 413, TOO_LARGE)
            await response(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > MAX_BODY:  # the route reading the body answers it, as a 413
                    raise HTTPException(status_code=413, detail=TOO_LARGE)
            return message

        await self.app(scope, counted, send)


# what anyone may read: the page itself (it asks for a key), probes, metrics, the API's schema
OPEN_PATHS = frozenset({"/", "/health", "/livez", "/readyz", "/metrics", "/docs", "/openapi.json"})
OPEN_PREFIXES = ("/static/", "/docs-assets/")  # the page's files, the API docs' files
# what changes the model: an admin key's only
ADMIN_ROUTES = [
    ("POST", re.compile(r"/specialists")),
    ("DELETE", re.compile(r"/specialists/[^/]+")),
    ("POST", re.compile(r"/operations/[^/]+/cancel")),
    ("POST", re.compile(r"/versions/[^/]+/rollback")),
]


PROBES = frozenset({"/livez", "/readyz"})  # a kubelet's probe names the pod's IP as its Host


class AllowHosts:
    """400 for a request whose Host header is not one of `hosts` (settings.hosts()): a page
    elsewhere cannot reach a local gateway by pointing a name of its own at 127.0.0.1 (DNS
    rebinding). The probes answer any Host."""

    def __init__(self, app: ASGIApp, hosts: list[str]) -> None:
        self.app = app
        self.any = "*" in hosts
        self.exact = {h for h in hosts if not h.startswith("*.")}
        self.suffixes = tuple(h[1:] for h in hosts if h.startswith("*."))

    def allowed(self, host: str) -> bool:
        if host.startswith("["):  # [v6 address] or [v6 address]:port
            name = host[1 : host.find("]")]
        else:  # name, name:port, or a bare v6 address
            name = host.split(":")[0] if host.count(":") == 1 else host
        name = name.lower()
        return name in self.exact or name.endswith(self.suffixes)  # () matches nothing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.any or scope["type"] != "http" or scope.get("path") in PROBES:
            await self.app(scope, receive, send)
            return
        host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
        if self.allowed(host):
            await self.app(scope, receive, send)
            return
        detail = "this server does not answer to that Host header (SMA_ALLOWED_HOSTS)"
        await JSONResponse({"detail": detail}, status_code=400)(scope, receive, send)


class RequireKey:
    """With API keys configured, every route but OPEN_PATHS and /static needs `Authorization:
    Bearer <key>`: 401 without a valid key, 403 for a user key on an ADMIN_ROUTES route.
    Checked before the body is read."""

    def __init__(self, app: ASGIApp, keys: Keys) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            await self.app(scope, receive, send)
            return
        admin = any(scope["method"] == m and r.fullmatch(path) for m, r in ADMIN_ROUTES)
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        refusal = self.keys.check(header, KeyScope.ADMIN if admin else KeyScope.USER)
        if refusal is None:
            await self.app(scope, receive, send)
            return
        response = _refusal(
            path,
            403 if refusal.forbidden else 401,
            refusal.message,
            None if refusal.forbidden else {"WWW-Authenticate": "Bearer"},
        )
        await response(scope, receive, send)


class RequestIds:
    """Give every request an id: the caller's `X-Request-Id` (if usable), else a new one. It
    is in the reply's `X-Request-Id`, in each gRPC call made for the request (and so in the
    services' log lines), and in the access log line written when the reply is sent."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request = logs.accept_request_id(given)
        token = logs.request_id.set(request)
        started, status, started_reply = time.perf_counter(), 500, False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started_reply
            if message["type"] == "http.response.start":
                status, started_reply = message["status"], True
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request.encode()),
                ]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            # a bug: logged here with the request's id, and answered here, so that the reply
            # carries the id the user can quote (Starlette's own 500 would come without it)
            log.exception("unexpected error serving %s %s", scope["method"], scope.get("path"))
            if not started_reply:  # (status is still 500)
                message = f"internal server error (request id {request})"
                await _refusal(scope.get("path", ""), 500, message)(scope, receive, send_with_id)
        finally:
            access.info(
                '%s "%s %s" %d %.1f ms',
                (scope.get("client") or ("-",))[0],
                scope["method"],
                scope.get("path", ""),
                status,
                1000 * (time.perf_counter() - started),
            )
            logs.request_id.reset(token)


class CountRequests:
    """Count every HTTP request by method, route template and status.

    A plain ASGI middleware: Starlette's `@app.middleware("http")` (BaseHTTPMiddleware) would
    pass every chunk of a streamed response, one per SSE event, through an extra task and
    memory stream."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what the server answers if the app fails before it starts a response

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")  # the router puts the matched route in the scope
            self.metrics.request(scope["method"], getattr(route, "path", "unmatched"), status)


def create_app(settings: Settings) -> FastAPI:
    gw = Gateway(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await gw.start()
        yield
        await gw.stop()

    app = FastAPI(
        title="Shiftable",
        version="1",
        summary="A language model that grows domain specialists at runtime",
        lifespan=lifespan,
        docs_url=None,  # served below from a packaged copy, not a CDN: it works offline
        redoc_url=None,  # ReDoc's page loads its logo from a CDN whatever it is given
    )
    app.state.gateway = gw
    app.add_middleware(LimitBody)
    app.add_middleware(RequireKey, keys=settings.keys())  # before any body is read
    if origins := [o.strip() for o in settings.cors_origins.split(",") if o.strip()]:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(AllowHosts, hosts=settings.hosts())
    app.add_middleware(CountRequests, metrics=gw.metrics)
    app.add_middleware(RequestIds)  # added last: outermost, so every reply has its id

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        """FastAPI's 422, without the `input` each error would echo: a reply never repeats
        what was sent (a megabyte of prompt, or a secret pasted in the wrong field). The
        OpenAI-compatible routes answer 400 in OpenAI's shape, naming the first bad field."""
        errors = [{k: v for k, v in e.items() if k not in ("input", "ctx")} for e in exc.errors()]
        if request.url.path in openai.PATHS:
            return JSONResponse(_openai_invalid(errors), status_code=400)
        return JSONResponse({"detail": jsonable_encoder(errors)}, status_code=422)

    @app.exception_handler(grpc.aio.AioRpcError)
    async def grpc_error(request: Request, exc: grpc.aio.AioRpcError) -> JSONResponse:
        return _refusal(request.url.path, http_status(exc.code()), exc.details() or "")

    @app.exception_handler(ShiftableError)
    async def domain_error(request: Request, exc: ShiftableError) -> JSONResponse:
        return _refusal(request.url.path, error_status(exc), str(exc))

    @app.exception_handler(ValueError)
    async def value_error(request: Request, exc: ValueError) -> JSONResponse:
        return _refusal(request.url.path, 400, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """FastAPI's own refusals (a body that is not JSON, one over the limit while read)."""
        return _refusal(request.url.path, exc.status_code, str(exc.detail), exc.headers)

    @app.exception_handler(OpenAIError)
    async def openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        body = error_body(exc.status, exc.message, exc.param, exc.code)
        return JSONResponse(body, status_code=exc.status)

    for module in (health, specialists, generate, operations, versions, openai):
        app.include_router(module.router)
    _serve_api_docs(app)
    if FRONTEND.is_dir():
        app.mount("/static", StaticFiles(directory=FRONTEND), name="static")
    return app


DOCS_ASSETS = "/docs-assets"  # Swagger UI's files, from the fastapi-offline package


def _serve_api_docs(app: FastAPI) -> None:
    """`/docs` (Swagger UI), whose script, style and icon come from this server: FastAPI's
    default page loads them from a CDN, and is blank without internet."""
    app.mount(
        DOCS_ASSETS,
        StaticFiles(directory=str(files("fastapi_offline") / "static")),
        name="docs-assets",
    )
    openapi = app.openapi_url or "/openapi.json"

    @app.get("/docs", include_in_schema=False)
    async def swagger() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi,
            title=f"{app.title} API",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon.png",
        )


_TYPES = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def _refusal(path: str, status: int, message: str, headers: dict | None = None) -> JSONResponse:
    """A refusal as the route's API shapes it: `{"detail"}`, or OpenAI's `{"error"}`."""
    body = error_body(status, message) if path in openai.PATHS else {"detail": message}
    return JSONResponse(body, status_code=status, headers=headers)


def _openai_invalid(errors: list[dict]) -> dict:
    """OpenAI's 400 for a body that fails the schema: the first error, naming its field (the
    field names of its location, without list positions or the union member tried)."""
    first = errors[0] if errors else {}
    loc = first.get("loc", ())
    where = [p for p in loc[1:] if isinstance(p, str) and p.isidentifier() and p not in _TYPES]
    param = ".".join(where) or None
    if first.get("type") == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {param}"
    else:
        message = f"{param}: {first.get('msg', 'invalid value')}" if param else "invalid body"
    return error_body(400, message, param)


def main(settings: Settings) -> None:
    """`sma serve gateway`: run the app with uvicorn on settings.host:settings.port."""
    import uvicorn

    tls = settings.tls()  # HTTPS with the same certificate as the services' gRPC
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="warning",
        timeout_graceful_shutdown=5,
        ssl_certfile=str(tls.cert_path) if tls else None,
        ssl_keyfile=str(tls.key_path) if tls else None,
    )
