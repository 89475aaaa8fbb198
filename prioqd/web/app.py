"""The dashboard's Starlette application: pages, actions, and their guards."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import os
import secrets
import shlex
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import jinja2
from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from prioqd import __version__
from prioqd.admin import Admin, age_text, describe, when_text
from prioqd.broker import Broker, wrap_errors
from prioqd.config import Config, parse_listen
from prioqd.errors import BrokerError, PrioqdError
from prioqd.jobs import valid_id

HERE = Path(__file__).resolve().parent
CSRF_COOKIE = "prioqd_csrf"
AUTH_COOKIE = "prioqd_auth"
FLASH_COOKIE = "prioqd_flash"

#: No inline script or style, nothing from elsewhere, no framing.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; "
    "object-src 'none'"
)
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}

#: Entries of each queue, of the schedule and of the dead letters a job page reads
#: looking for its job: a page refreshed every few seconds on an id that is nowhere
#: (or deep in a backlog of millions) must not read the whole backlog each time.
#: ``prioqd inspect`` searches to the end.
SEARCH_MAX = 10_000


class SecurityHeaders:
    """Adds ``SECURITY_HEADERS`` to every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for k, v in SECURITY_HEADERS.items():
                    if k not in headers:
                        headers[k] = v
            await send(message)

        await self.app(scope, receive, send_with_headers)


class Throughput:
    """Outcomes per minute, as the daemons count them in Redis: the script call that
    publishes outcomes on ``P:events`` adds them to ``P:throughput:<minute>`` (kept an
    hour). So the table has the last minutes from the first view on, and a dashboard
    nobody has open reads nothing. Prometheus keeps the longer history."""

    STATUSES = ("succeeded", "failed", "dead", "cancelled")

    def __init__(self, broker: Broker, *, minutes: int = 10) -> None:
        self.broker = broker
        self.minutes = minutes

    async def rows(self) -> list[dict[str, Any]]:
        """The last minutes, newest first: {"minute": "12:34", status: count, "total"}."""
        r: Any = self.broker.redis
        with wrap_errors("read throughput"):
            now_s, _ = await r.time()
            now = int(now_s) // 60
            minutes = range(now, now - self.minutes, -1)
            async with r.pipeline(transaction=False) as pipe:
                for m in minutes:
                    pipe.hgetall(self.broker.keys.throughput(m))
                replies = await pipe.execute(raise_on_error=False)
        out = []
        for m, counts in zip(minutes, replies, strict=True):
            row: dict[str, Any] = {"minute": time.strftime("%H:%M", time.gmtime(m * 60))}
            for status in self.STATUSES:
                raw = counts.get(status.encode()) if isinstance(counts, dict) else None
                row[status] = int(raw) if raw is not None and raw.isdigit() else 0
            row["total"] = sum(row[s] for s in self.STATUSES)
            out.append(row)
        return out


def _sign(secret: bytes, *parts: str) -> str:
    return hmac.new(secret, "\0".join(parts).encode(), hashlib.sha256).hexdigest()


class Dashboard:
    def __init__(self, cfg: Config, *, token: str | None, read_only: bool) -> None:
        self.cfg = cfg
        self.token = token
        self.read_only = read_only or token is None
        self.base = cfg.web.root_path
        #: Signs the CSRF and sign-in cookies; a restart signs everyone out.
        self.secret = os.urandom(32)
        self.broker = Broker.from_config(cfg)
        self.admin = Admin(self.broker, cfg, rescan_queues_s=cfg.web.queues_scan_s)
        self.throughput = Throughput(self.broker)
        env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        env.filters["age"] = age_text
        env.filters["when"] = when_text
        env.filters["describe"] = describe
        env.filters["job_url"] = lambda v: job_url(str(v))
        env.filters["cancel_url"] = lambda v: job_url(str(v), "/cancel")
        self.templates = Jinja2Templates(env=env)

    # --- cookies and guards ----------------------------------------------------------

    def _csrf_cookie(self, request: Request) -> str:
        value = request.cookies.get(CSRF_COOKIE, "")
        if len(value) == 43 and value.replace("-", "").replace("_", "").isalnum():
            return value
        return ""

    def csrf_token(self, request: Request) -> str:
        cookie = request.state.csrf_cookie
        return _sign(self.secret, "csrf", cookie)

    def signed_in(self, request: Request) -> bool:
        if self.read_only:
            return False
        cookie = request.state.csrf_cookie
        value = request.cookies.get(AUTH_COOKIE, "")
        expiry, _, sig = value.partition(".")
        if not cookie or not expiry.isdigit() or int(expiry) < time.time():
            return False
        return hmac.compare_digest(sig, _sign(self.secret, "auth", cookie, expiry))

    def _cookie(self, response: Response, request: Request, name: str, value: str,
                max_age: int | None) -> None:  # fmt: skip
        response.set_cookie(
            name,
            value,
            max_age=max_age,
            path=self.base or "/",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )

    async def guard(self, request: Request, *, auth: bool = True) -> dict[str, str]:
        """The form of a POST that passed every check; raises 403 otherwise."""
        if self.read_only:
            raise HTTPException(403, "the dashboard is read-only")
        form = await request.form()
        sent = str(form.get("csrf", ""))
        cookie = request.state.csrf_cookie
        if not cookie or not hmac.compare_digest(sent, _sign(self.secret, "csrf", cookie)):
            raise HTTPException(403, "missing or wrong CSRF token: reload the page and try again")
        if auth and not self.signed_in(request):
            raise HTTPException(403, "sign in with the dashboard token first")
        return {k: str(v) for k, v in form.items()}

    # --- rendering ----------------------------------------------------------------------

    def error_page(self, request: Request, status: int, message: str) -> Response:
        return self.templates.TemplateResponse(
            request,
            "error.html",
            {
                "request": request,
                "base": self.base,
                "version": __version__,
                "message": message,
                "status": status,
            },
            status_code=status,
        )

    def render(self, request: Request, name: str, **context: Any) -> Response:
        fragment = request.query_params.get("fragment") == "1"
        flash = "" if fragment else request.cookies.get(FLASH_COOKIE, "")
        signed_in = self.signed_in(request)
        context.update(
            request=request,
            base=self.base,
            version=__version__,
            read_only=self.read_only,
            signed_in=signed_in,
            can_act=signed_in,
            csrf=self.csrf_token(request),
            refresh_ms=int(self.cfg.web.refresh_s * 1000),
            flash=urllib.parse.unquote(flash)[:500],
            fragment=fragment,
            prefix=self.cfg.queues.prefix,
        )
        params = [(k, v) for k, v in request.query_params.multi_items() if k != "fragment"]
        context["live_src"] = (
            f"{self.base}{request.url.path}?{urllib.parse.urlencode([*params, ('fragment', '1')])}"
        )
        template = f"_{name}.html" if fragment else f"{name}.html"
        response = self.templates.TemplateResponse(request, template, context)
        if flash:
            response.delete_cookie(FLASH_COOKIE, path=self.base or "/")
        return response

    def back(self, request: Request, path: str, message: str) -> Response:
        """303 to ``path`` with a message for the next page."""
        response = RedirectResponse(self.base + path, status_code=303)
        self._cookie(response, request, FLASH_COOKIE, urllib.parse.quote(message[:500]), 30)
        return response

    # --- pages ------------------------------------------------------------------------------

    async def overview(self, request: Request) -> Response:
        status = await self.admin.status()
        rows = await self.throughput.rows()
        peak = max([row["total"] for row in rows] + [1])
        return self.render(request, "overview", status=status, throughput=rows, peak=peak)

    async def running(self, request: Request) -> Response:
        return self.render(request, "running", jobs=await self.admin.running())

    async def job(self, request: Request) -> Response:
        return await self._job_page(request, request.path_params["job_id"])

    async def _job_page(self, request: Request, job_id: str) -> Response:
        if not valid_id(job_id):
            raise HTTPException(404, "not a job id")
        info = await self.admin.inspect(job_id, search_max=SEARCH_MAX)
        journal = f"journalctl -u prioqd {shlex.quote('JOB_ID=' + job_id)}"
        status = 200 if info.found else 404
        response = self.render(
            request, "job", info=info, journal=journal, job_id=job_id, search_max=f"{SEARCH_MAX:,}"
        )
        response.status_code = status
        return response

    async def find_job(self, request: Request) -> Response:
        job_id = request.query_params.get("id", "").strip()
        if not valid_id(job_id):
            return self.back(request, "/", "not a job id")
        if job_id in DOT_SEGMENTS:
            return await self._job_page(request, job_id)  # its page lives here
        return RedirectResponse(f"{self.base}{job_url(job_id)}", status_code=303)

    async def dead(self, request: Request) -> Response:
        try:
            offset = max(0, int(request.query_params.get("offset", "0")))
        except ValueError:
            offset = 0
        limit = 50
        letters = await self.admin.dead_letters(limit=limit, offset=offset)
        r: Any = self.broker.redis
        with wrap_errors("count dead letters"):
            total = int(await r.llen(self.broker.keys.dead))
        return self.render(
            request, "dead", letters=letters, offset=offset, limit=limit, total=total
        )

    async def purge_confirm(self, request: Request) -> Response:
        r: Any = self.broker.redis
        with wrap_errors("count dead letters"):
            total = int(await r.llen(self.broker.keys.dead))
        return self.render(request, "purge", total=total)

    async def scheduled(self, request: Request) -> Response:
        jobs = await self.admin.scheduled(limit=200)
        r: Any = self.broker.redis
        with wrap_errors("count scheduled jobs"):
            total = int(await r.zcard(self.broker.keys.scheduled))
        return self.render(request, "scheduled", jobs=jobs, total=total, now=await self.admin.now())

    async def login_page(self, request: Request) -> Response:
        return self.render(request, "login")

    # --- actions ------------------------------------------------------------------------------

    async def login(self, request: Request) -> Response:
        form = await self.guard(request, auth=False)
        assert self.token is not None  # not read-only
        if not hmac.compare_digest(form.get("token", "").encode(), self.token.encode()):
            await asyncio.sleep(1.0)  # a guess a second, at most, per connection
            raise HTTPException(403, "wrong token")
        expiry = str(int(time.time() + self.cfg.web.session_max_age_s))
        value = f"{expiry}.{_sign(self.secret, 'auth', request.state.csrf_cookie, expiry)}"
        response = self.back(request, "/", "signed in")
        self._cookie(response, request, AUTH_COOKIE, value, self.cfg.web.session_max_age_s)
        return response

    async def logout(self, request: Request) -> Response:
        await self.guard(request, auth=False)
        response = self.back(request, "/", "signed out")
        response.delete_cookie(AUTH_COOKIE, path=self.base or "/")
        return response

    async def pause(self, request: Request) -> Response:
        form = await self.guard(request)
        priority = form.get("priority", "")
        if form.get("action") == "resume":
            await self.admin.resume([priority])
            return self.back(request, "/", f"resumed {priority}")
        await self.admin.pause([priority])
        return self.back(request, "/", f"paused {priority}: no daemon claims from it")

    async def cancel(self, request: Request) -> Response:
        form = await self.guard(request)
        job_id = request.path_params.get("job_id") or request.query_params.get("id", "")
        if not valid_id(job_id):
            raise HTTPException(404, "not a job id")
        (result,) = await self.admin.cancel([job_id])
        back = form.get("back", "")
        path = back if back in ("/running", "/scheduled") else job_url(job_id)
        return self.back(request, path, f"{job_id}: {result.outcome} ({result.detail})")

    async def requeue(self, request: Request) -> Response:
        form = await self.guard(request)
        if form.get("all") == "1":
            result = await self.admin.requeue(everything=True)
        else:
            result = await self.admin.requeue(keys=[form.get("letter", "")])
        text = f"requeued {result.moved} dead letter(s)"
        if result.missing:
            text += "; already gone: " + ", ".join(result.missing)[:200]
        if result.gone:
            text += "; payload gone for: " + ", ".join(result.gone)[:200]
        if result.duplicates:
            text += (
                "; left (a unique job of that id is live): " + ", ".join(result.duplicates)[:200]
            )
        return self.back(request, "/dead", text)

    async def purge(self, request: Request) -> Response:
        form = await self.guard(request)
        if form.get("confirm") != "yes":
            return self.back(request, "/dead/purge", "tick the box to confirm")
        n = await self.admin.purge()
        return self.back(request, "/dead", f"purged {n} dead letter(s)")

    async def healthz(self, request: Request) -> Response:
        await self.broker.ping()
        return PlainTextResponse("ok\n")


#: Ids that a path cannot carry: a browser (and any URL library) resolves a "." or
#: ".." segment, encoded or not, so /jobs/.. would be /. Their pages take the id in
#: the query instead.
DOT_SEGMENTS = (".", "..")


def job_url(job_id: str, under: str = "/jobs") -> str:
    """Where job ``job_id``'s page (or, under "/cancel", its cancel) is, below the
    base: the id is one path segment (a "/" in it encoded), or the query for the
    ids a path cannot carry."""
    if job_id in DOT_SEGMENTS:
        return f"{under}?{urllib.parse.urlencode({'id': job_id})}"
    return f"{under}/{urllib.parse.quote(job_id, safe='')}"


def _with_state(dash: Dashboard, handler: Callable[[Request], Awaitable[Response]]) -> Any:
    """Every page and action: the browser's CSRF cookie (made on its first visit),
    and Redis errors shown as a page, not a traceback."""

    async def endpoint(request: Request) -> Response:
        cookie = dash._csrf_cookie(request)
        fresh = not cookie
        request.state.csrf_cookie = cookie or secrets.token_urlsafe(32)
        if fresh and request.method == "POST":
            # No cookie, so no CSRF token can match: refuse before reading anything.
            request.state.csrf_cookie = ""
        try:
            response = await handler(request)
        except BrokerError as exc:
            response = dash.error_page(request, 503, f"Redis: {exc}")
        except PrioqdError as exc:
            response = dash.back(request, "/", str(exc))
        if fresh and request.state.csrf_cookie:
            dash._cookie(response, request, CSRF_COOKIE, request.state.csrf_cookie, None)
        return response

    return endpoint


def allowed_hosts(cfg: Config, listen_host: str) -> list[str]:
    """The Host header values answered: localhost names, the listen host, and
    ``[web] allowed_hosts``. Reading needs no sign-in, so a page elsewhere that
    rebinds its own name to this address must not be answered (DNS rebinding)."""
    hosts = ["localhost", "127.0.0.1", "::1", "[::1]", listen_host]
    if ":" in listen_host:
        hosts.append(f"[{listen_host}]")  # an IPv6 literal, as a Host header has it
    return list(dict.fromkeys([*hosts, *cfg.web.allowed_hosts]))


def create_app(
    cfg: Config, *, token: str | None, read_only: bool, listen_host: str | None = None
) -> Starlette:
    """The dashboard; ``listen_host``: where it listens (default: ``[web] listen``)."""
    dash = Dashboard(cfg, token=token, read_only=read_only)

    def page(path: str, handler: Callable[[Request], Awaitable[Response]]) -> Route:
        return Route(path, _with_state(dash, handler), methods=["GET"])

    def action(path: str, handler: Callable[[Request], Awaitable[Response]]) -> Route:
        return Route(path, _with_state(dash, handler), methods=["POST"])

    routes = [
        page("/", dash.overview),
        page("/running", dash.running),
        page("/jobs", dash.find_job),
        page("/jobs/{job_id:path}", dash.job),
        page("/dead", dash.dead),
        page("/dead/purge", dash.purge_confirm),
        page("/scheduled", dash.scheduled),
        page("/login", dash.login_page),
        page("/healthz", dash.healthz),
        action("/login", dash.login),
        action("/logout", dash.logout),
        action("/pause", dash.pause),
        action("/cancel", dash.cancel),
        action("/cancel/{job_id:path}", dash.cancel),
        action("/dead/requeue", dash.requeue),
        action("/dead/purge", dash.purge),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return dash.error_page(request, exc.status_code, exc.detail)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await dash.broker.close()

    app = Starlette(
        routes=routes,
        exception_handlers={HTTPException: http_error},
        lifespan=lifespan,
    )
    app.add_middleware(SecurityHeaders)
    host = listen_host if listen_host is not None else parse_listen(cfg.web.listen)[0]
    # Added last, so it runs first: a refused Host costs nothing but the 400.
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts(cfg, host))
    app.state.dashboard = dash
    return app
