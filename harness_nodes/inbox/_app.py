"""The inbox web application: routes, rendering, and the request guard."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

try:
    import jinja2
    import markupsafe
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import MutableHeaders
    from starlette.requests import Request
    from starlette.responses import (
        HTMLResponse,
        JSONResponse,
        PlainTextResponse,
        RedirectResponse,
        Response,
    )
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles
    from starlette.types import ASGIApp, Message, Receive, Scope, Send
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        'The review inbox needs the inbox extra: pip install "langgraph-harness[inbox]"'
    ) from e

from harness_nodes.errors import AlreadyDecided, HarnessError, InvalidDecision, ReviewNotFound
from harness_nodes.inbox import _view
from harness_nodes.inbox._forms import FormError
from harness_nodes.inbox._security import (
    CSRF_FIELD,
    CSRF_HEADER,
    SECURITY_HEADERS,
    SESSION_COOKIE,
    InboxAuth,
    new_session,
    same_origin,
)

_HERE = Path(__file__).parent
_log = logging.getLogger("harness_nodes.inbox")
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


_MAX_PAGE = 1_000_000
"""The last page number the list serves (a larger one shows that page: empty)."""


class _Guard:
    """ASGI middleware: Host check, authentication, Origin check, session cookie, headers.

    The CSRF *token* is checked by the decision endpoints (it lives in the form body);
    everything that can be decided from headers alone is refused here, before routing.
    """

    def __init__(self, app: ASGIApp, auth: InboxAuth) -> None:
        self.app = app
        self.auth = auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        refusal = self._refusal(request)
        session = request.cookies.get(SESSION_COOKIE)
        new_cookie = None
        if refusal is None and not session:
            session = new_cookie = new_session()
        scope.setdefault("state", {})["session"] = session

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for k, v in SECURITY_HEADERS.items():
                    headers.setdefault(k, v)
                if new_cookie:
                    secure = "; Secure" if scope.get("scheme") == "https" else ""
                    headers.append(
                        "set-cookie",
                        f"{SESSION_COOKIE}={new_cookie}; Path=/; HttpOnly; SameSite=Strict{secure}",
                    )
            await send(message)

        if refusal is not None:
            await refusal(scope, receive, send_with_headers)
            return
        await self.app(scope, receive, send_with_headers)

    def _refusal(self, request: Request) -> Response | None:
        if not self.auth.host_ok(request.headers.get("host")):
            return _error(request, 421, "misdirected", "This inbox does not serve that host name")
        if request.url.path.startswith("/static/"):
            return None
        authz = request.headers.get("authorization")
        reviewer = self.auth.reviewer_for(authz)
        if reviewer is None:
            response = _error(request, 401, "unauthenticated", "Sign in as a reviewer")
            response.headers["www-authenticate"] = 'Basic realm="harness review inbox"'
            return response
        request.scope["state"]["reviewer"] = reviewer
        request.scope["state"]["bearer"] = bool(authz and authz.lower().startswith("bearer "))
        if request.method not in _SAFE_METHODS and not same_origin(
            request.headers.get("origin"),
            request.headers.get("sec-fetch-site"),
            request.url.scheme,
            request.headers.get("host", ""),
        ):
            return _error(request, 403, "cross_site", "Cross-site request refused")
        return None


class _BodyTooSlow(Exception):
    """The request body did not arrive within the inbox's body timeout."""


class _BodyDeadline:
    """ASGI middleware: a request must send its whole body within *timeout* seconds, else 408.

    The server bounds the headers (`harness_nodes.inbox._serve.ServerLimits`); this bounds the
    body, which only the app reads: one byte a second on a decision POST held the request open
    for as long as the client liked. The clock starts when the handler first asks for the body.
    """

    def __init__(self, app: ASGIApp, timeout: float) -> None:
        self.app = app
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        body_done = False
        started = False

        async def receive_in_time() -> Message:
            nonlocal deadline, body_done
            if body_done:
                return await receive()  # waiting for a disconnect: not a body read
            if deadline is None:
                deadline = loop.time() + self.timeout
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise _BodyTooSlow from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        async def send_tracking(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive_in_time, send_tracking)
        except _BodyTooSlow:
            if started:
                raise
            response = PlainTextResponse(
                "Request body too slow", status_code=408, headers={"connection": "close"}
            )
            await response(scope, receive, send)


_FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


def _wants_json(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    return "application/json" in accept and "text/html" not in accept


def _error(request: Request, status: int, code: str, message: str) -> Response:
    if _wants_json(request) or request.headers.get("content-type", "").startswith(
        "application/json"
    ):
        return JSONResponse({"error": code, "message": message}, status_code=status)
    return HTMLResponse(
        "<!doctype html><title>Review inbox</title><p>" + str(markupsafe.escape(message)) + "</p>",
        status_code=status,
    )


class _Inbox:
    """The route handlers, bound to one queue."""

    def __init__(self, queue: Any, auth: InboxAuth, page_size: int, decide_wait: float) -> None:
        self.queue = queue
        self.auth = auth
        self.page_size = page_size
        self.decide_wait = decide_wait
        # Decisions resume the task in these threads; a request waits for the outcome only
        # `decide_wait` seconds, then the page shows "resuming" and polls for the outcome.
        self.resumers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="inbox-resume")
        self.failures: dict[str, str] = {}
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(_HERE / "templates"),
            autoescape=True,  # every template, whatever its name: agent text is untrusted
            undefined=jinja2.StrictUndefined,
        )

    # -- helpers --------------------------------------------------------------------------

    def _render(self, request: Request, name: str, status: int = 200, **ctx: Any) -> Response:
        def url(route: str, **params: Any) -> str:
            return str(request.app.url_path_for(route, **params))

        def static_url(path: str) -> str:
            return str(request.app.url_path_for("static", path=path))

        reviewer: str = request.state.reviewer
        html = self.env.get_template(name).render(
            url=url,
            static_url=static_url,
            reviewer=reviewer,
            csrf_token=self.auth.csrf_token(request.state.session, reviewer),
            **ctx,
        )
        return HTMLResponse(html, status_code=status)

    def _csrf_ok(self, request: Request, token: str | None) -> bool:
        if request.state.bearer:
            return True  # a browser never attaches a bearer token by itself
        token = token or request.headers.get(CSRF_HEADER)
        return self.auth.csrf_ok(request.state.session, request.state.reviewer, token)

    # -- routes ---------------------------------------------------------------------------

    async def home(self, request: Request) -> Response:
        return RedirectResponse(str(request.app.url_path_for("list")), status_code=303)

    async def list(self, request: Request) -> Response:
        q = request.query_params
        filters = {k: (q.get(k) or None) for k in ("task_type", "reason", "assignee")}
        try:
            # Bounded: an offset past what a database integer holds was a 500.
            number = min(_MAX_PAGE, max(1, int(q.get("page", "1"))))
        except ValueError:
            number = 1
        try:
            size = min(200, max(1, int(q.get("size", str(self.page_size)))))
        except ValueError:
            size = self.page_size
        items, has_next = await run_in_threadpool(
            _view.list_page, self.queue, filters, (number - 1) * size, size
        )
        base = str(request.app.url_path_for("list"))

        def page_url(n: int) -> str:
            params = {k: v for k, v in filters.items() if v}
            if size != self.page_size:
                params["size"] = str(size)
            params["page"] = str(n)
            return f"{base}?{urlencode(params)}"

        if _wants_json(request):
            return JSONResponse(
                {
                    "items": [_view.item_json(i) for i in items],
                    "page": number,
                    "next": page_url(number + 1) if has_next else None,
                }
            )
        page = {
            "number": number,
            "total_shown": len(items),
            "prev_url": page_url(number - 1) if number > 1 else None,
            "next_url": page_url(number + 1) if has_next else None,
        }
        return self._render(
            request,
            "list.html",
            items=[_view.item_row(i) for i in items],
            filters=filters,
            page=page,
        )

    async def item(self, request: Request) -> Response:
        review_id = request.path_params["review_id"]
        try:
            detail = await self._detail(review_id)
        except ReviewNotFound as e:
            return _error(request, 404, "not_found", str(e))
        if _wants_json(request):
            return JSONResponse(detail.as_json())
        notice = None
        if request.query_params.get("decided") and detail.view["status"] != "pending":
            notice = {"kind": "ok", "text": "Your decision was recorded."}
        return self._item_page(request, detail, notice=notice)

    async def _detail(self, review_id: str) -> _view.ItemDetail:
        failure = self.failures.get(review_id)
        return await run_in_threadpool(_view.item_detail, self.queue, review_id, failure)

    def _remember_failure(self, review_id: str, fut: Future[None]) -> None:
        e = fut.exception()
        if e is not None:
            _log.error("resuming review %s failed: %s", review_id, e)
            self.failures[review_id] = f"{type(e).__name__}: {e}"

    def _item_page(
        self,
        request: Request,
        detail: _view.ItemDetail,
        *,
        status: int = 200,
        notice: Mapping[str, str] | None = None,
        form_errors: Mapping[str, str] | None = None,
    ) -> Response:
        api_url = str(request.app.url_path_for("item", review_id=detail.view["id"]))
        return self._render(
            request,
            "item.html",
            status,
            item=detail.view,
            notice=notice,
            form_errors=form_errors,
            api_url=api_url,
        )

    async def decide(self, request: Request) -> Response:
        review_id = request.path_params["review_id"]
        content_type = request.headers.get("content-type", "")
        as_json = content_type.startswith("application/json")
        token: str | None
        if not as_json and not content_type.startswith(_FORM_TYPES):
            return _error(
                request,
                415,
                "unsupported_media_type",
                "Send the decision as JSON (Content-Type: application/json) or as the page's form",
            )
        if as_json:
            try:
                body = json.loads(await request.body())
            except (ValueError, RecursionError):  # nested past the parser's depth: not data
                return _error(request, 400, "bad_json", "The request body is not JSON")
            if not isinstance(body, dict):
                return _error(request, 400, "bad_json", "The decision must be a JSON object")
            token = None
            form: dict[str, str] = {}
        else:
            async with request.form(max_files=0, max_fields=500) as raw:
                form = {k: v for k, v in raw.items() if isinstance(v, str)}
            token = form.get(CSRF_FIELD)
            body = {}
        if not self._csrf_ok(request, token):
            return _error(request, 403, "csrf", "Missing or wrong CSRF token; reload the page")
        reviewer: str = request.state.reviewer
        try:
            detail = await self._detail(review_id)
        except ReviewNotFound as e:
            return _error(request, 404, "not_found", str(e))
        try:
            decision = (
                _view.unmasked_decision(detail, body)
                if as_json
                else _view.decision_from_form(detail, form)
            )
            fut = self.resumers.submit(_view.decide, self.queue, review_id, decision, reviewer)
            try:
                await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(fut)), self.decide_wait)
            except TimeoutError:
                fut.add_done_callback(lambda f: self._remember_failure(review_id, f))
        except FormError as e:
            return self._item_page(
                request,
                detail,
                status=422,
                form_errors=e.problems,
                notice={"kind": "error", "text": f"Some arguments are invalid: {e}"},
            )
        except InvalidDecision as e:
            if as_json:
                return JSONResponse(
                    {"error": "invalid_decision", "message": str(e), "reason": e.reason},
                    status_code=422,
                )
            return self._item_page(
                request, detail, status=422, notice={"kind": "error", "text": str(e)}
            )
        except AlreadyDecided as e:
            if as_json:
                return JSONResponse(
                    {
                        "error": "already_decided",
                        "message": _view.already_decided_text(e),
                        "decided_by": e.decided_by,
                        "decided_at": e.decided_at,
                        "decision": e.decision,
                    },
                    status_code=409,
                )
            fresh = await self._detail(review_id)
            return self._item_page(
                request,
                fresh,
                status=409,
                notice={"kind": "conflict", "text": _view.already_decided_text(e)},
            )
        except HarnessError as e:  # the resumed run failed: the decision itself stands
            self.failures[review_id] = f"{type(e).__name__}: {e}"
        if as_json:
            fresh = await self._detail(review_id)
            return JSONResponse(fresh.as_json())
        target = str(request.app.url_path_for("item", review_id=review_id)) + "?decided=1"
        return RedirectResponse(target, status_code=303)


def create_app(
    queue: Any,
    auth: InboxAuth,
    *,
    page_size: int = 50,
    decide_wait: float = 5.0,
    max_body_size: int = 1 << 20,
    body_timeout: float = 30.0,
) -> Starlette:
    """Build the inbox ASGI app over *queue* (see `harness_nodes.inbox`).

    A request body over *max_body_size* bytes is refused with 413 (at once when its
    Content-Length says so, else as soon as that many bytes have come), one slower than
    *body_timeout* seconds with 408.
    """
    inbox = _Inbox(queue, auth, page_size, decide_wait)
    routes = [
        Route("/", inbox.home, name="home"),
        Route("/reviews", inbox.list, name="list"),
        Route("/reviews/{review_id:str}", inbox.item, name="item"),
        Route("/reviews/{review_id:str}/decision", inbox.decide, methods=["POST"], name="decide"),
        Mount("/static", StaticFiles(directory=_HERE / "static"), name="static"),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        inbox.resumers.shutdown(wait=True)  # let decided tasks finish resuming

    app = Starlette(routes=routes, lifespan=lifespan, max_body_size=max_body_size)
    app.add_middleware(_Guard, auth=auth)
    app.add_middleware(_BodyDeadline, timeout=body_timeout)
    return app
