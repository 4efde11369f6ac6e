"""The label server: server-rendered pages for people, a JSON API for scripts, one FastAPI app.

Pages (a browser with the cookie from /login):     JSON API (Authorization: Bearer TOKEN, or the cookie):
    GET  /login?token=T   sets the cookie              GET  /api/next            the caller's next task
    GET  /label           the next item                POST /api/labels          an answer (+ the next task)
    POST /label           an answer from the form      POST /api/undo            retract the last label
    POST /label/undo      undo the last label          GET  /api/me              who, progress
    GET  /guidelines      the project's guidelines     GET  /api/status          dashboard numbers (admin)
    GET  /admin           dashboard (admin)            POST /api/items           add items (admin)
    POST /admin/annotators  add a person (admin)       GET  /api/labels          raw labels, paged (admin)
    GET  /admin/export/W  download an export (admin)   GET  /api/export/W        export rows (admin)
    GET  /media/ITEM/I    a media candidate            POST /api/annotators      add a person (admin)
                                                       GET  /api/openapi.json    this API (admin)
Nothing answers without a valid token but /login, /favicon.ico and /static (the app's own CSS and JS).
Endpoints are plain functions: they run in the server's thread pool, and every answer that stores a
label is sent after its transaction has committed.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio.to_thread
from fastapi import Body, Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException as StarletteHTTPException

from rlhfkit.data.sources import Row
from rlhfkit.errors import DataError
from rlhfkit.label import web
from rlhfkit.label.assign import Queue, SubmitError
from rlhfkit.label.export import WHAT, export_rows, raw_rows
from rlhfkit.label.items import MEDIA_TYPES, RowProblem, check_media_path, parse_rows
from rlhfkit.label.stats import project_status
from rlhfkit.label.store import LabelError, Store

HERE = Path(__file__).parent
THREADS_SQLITE, THREADS_PG = 4, 8
STATIC = {"app.js": "text/javascript", "style.css": "text/css"}


class Denied(Exception):
    def __init__(self, status: int, message: str) -> None:
        self.status, self.message = status, message


def create_app(store: Store, *, public_url: str = "") -> FastAPI:
    """The app for one project. `public_url` is how people reach it (for the links it prints)."""
    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # Endpoints run in anyio's thread pool (40 threads by default). Database work is the bottleneck
        # and SQLite writers take turns anyway: fewer threads queue less and answer sooner (measured:
        # 4 threads gave the most labels/s on 2 cores; PostgreSQL 8, within its pool of 20 connections).
        anyio.to_thread.current_default_thread_limiter().total_tokens = THREADS_SQLITE if store.sqlite else THREADS_PG
        yield

    app = FastAPI(title="rlhfkit label", version="1", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan,
                  description="The label app's JSON API: tasks, labels, status, items, exports.")
    templates = Jinja2Templates(directory=str(HERE / "templates"))  # autoescape is on for .html
    templates.env.globals["settings"] = store.settings
    queue = Queue(store, free_ttl=2.0)
    people = web.PeopleCache(store)
    cookie = web.cookie_name(store)
    settings = store.settings
    guidelines_html = web.render_markdown(settings.guidelines)

    @app.exception_handler(Denied)
    async def _denied(request: Request, exc: Denied) -> Response:
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": exc.message}, status_code=exc.status)
        return templates.TemplateResponse(request, "message.html", {"title": "Not allowed", "message": exc.message,
                                                                    "me": None}, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)
        return templates.TemplateResponse(request, "message.html", {"title": str(exc.status_code),
                                                                    "message": str(exc.detail), "me": None},
                                          status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        # FastAPI reads the body before the dependencies run: answer 401 to a caller without a valid
        # token before telling them anything about their body.
        if people.get(_token(request)[0]) is None:
            return JSONResponse({"error": "a valid token is needed (Authorization: Bearer TOKEN)"}, status_code=401)
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'body'}: {e.get('msg', '')}"
                             for e in exc.errors()[:5])
        return JSONResponse({"error": f"invalid request: {problems}"}, status_code=422)

    def _token(request: Request) -> tuple[str, bool]:
        """(token, from_cookie)."""
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            return auth[7:].strip(), False
        return request.cookies.get(cookie, ""), True

    async def me(request: Request) -> dict[str, Any]:  # async: no thread hop for a cache lookup
        token, from_cookie = _token(request)
        person = people.get(token)
        if person is None:
            raise Denied(401, "This page needs your personal link (it holds your token). Ask the project owner "
                              "for one: rlhfkit label add-annotator DB NAME.")
        if from_cookie and request.method not in ("GET", "HEAD"):
            origin = request.headers.get("origin")
            if origin and origin not in ("null",) and origin.rstrip("/") != f"{request.url.scheme}://{request.url.netloc}":
                raise Denied(403, "cross-site request refused")
            given = request.headers.get("x-csrf-token") or getattr(request.state, "form_csrf", None)
            if not web.csrf_ok(store, token, given):
                raise Denied(403, "missing or wrong CSRF token: reload the page and try again")
        return {**person, "csrf": web.csrf_value(store, token)}

    async def admin(person: dict[str, Any] = Depends(me)) -> dict[str, Any]:
        if person["role"] != "admin":
            raise Denied(403, "only the project's admin may do this")
        return person

    async def form_of(request: Request) -> dict[str, str]:
        form = await request.form()
        data = {k: v for k, v in form.items() if isinstance(v, str)}
        request.state.form_csrf = data.get("csrf")
        return data

    # --- entry ---------------------------------------------------------------------------------------

    @app.get("/login", include_in_schema=False)
    def login(request: Request, token: str = "") -> Response:
        person = people.get(token)
        if person is None:
            raise Denied(401, "This link is not valid (wrong, old or deactivated token).")
        target = "/admin" if person["role"] == "admin" else "/label"
        response = RedirectResponse(target, status_code=303)
        # Secure when reached over HTTPS (a TLS proxy that sends X-Forwarded-Proto, see docs/label.md)
        response.set_cookie(cookie, token, httponly=True, samesite="strict", path="/", max_age=30 * 86400,
                            secure=request.url.scheme == "https")
        return response

    @app.get("/", include_in_schema=False)
    def root(person: dict = Depends(me)) -> Response:
        return RedirectResponse("/admin" if person["role"] == "admin" else "/label", status_code=303)

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        return Response(status_code=204)

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:  # public: the message pages for a bad link need them too
        if name not in STATIC:
            raise HTTPException(404, "no such file")
        return FileResponse(HERE / "static" / name, media_type=STATIC[name], headers={"Cache-Control": "private, max-age=300"})

    # --- annotator pages -----------------------------------------------------------------------------

    def _page(request: Request, person: dict, error: str = "", status: int = 200) -> Response:
        task = queue.next_for(person["id"])
        progress = queue.progress(person["id"])
        if task is None:
            return templates.TemplateResponse(request, "done.html", {"me": person, "progress": progress})
        view = web.task_json(task, settings)
        return templates.TemplateResponse(request, f"label_{settings.kind}.html", {
            "me": person, "task": view, "messages": web.prompt_view(task.prompt), "progress": progress,
            "error": error, "scores": list(range(settings.scale[0], settings.scale[1] + 1))}, status_code=status)

    @app.get("/label", include_in_schema=False)
    def label_page(request: Request, person: dict = Depends(me)) -> Response:
        return _page(request, person)

    @app.post("/label", include_in_schema=False)
    def label_submit(request: Request, form: dict = Depends(form_of), person: dict = Depends(me)) -> Response:
        n = min(int(form["n_candidates"]), 20) if form.get("n_candidates", "").isdigit() else 0
        body = web.form_answer(settings, form, n)
        try:
            queue.submit(person["id"], body)
        except SubmitError as exc:
            if exc.status == 409:  # already stored (a double submit): show what comes next
                return RedirectResponse("/label", status_code=303)
            return _page(request, person, error=str(exc), status=exc.status)
        return RedirectResponse("/label", status_code=303)

    @app.post("/label/undo", include_in_schema=False)
    def label_undo(request: Request, form: dict = Depends(form_of), person: dict = Depends(me)) -> Response:
        queue.undo(person["id"])
        return RedirectResponse("/label", status_code=303)

    @app.get("/guidelines", include_in_schema=False)
    def guidelines(request: Request, person: dict = Depends(me)) -> Response:
        return templates.TemplateResponse(request, "guidelines.html", {"me": person, "html": guidelines_html})

    @app.get("/media/{item_id}/{index}", include_in_schema=False)
    def media(item_id: int, index: int, person: dict = Depends(me)) -> Response:
        from sqlalchemy import select

        from rlhfkit.label import schema as S

        with store.read() as conn:
            cands = conn.scalar(select(S.items.c.candidates).where(S.items.c.id == item_id))
            shown = conn.scalar(select(S.assignments.c.id).where(
                S.assignments.c.item_id == item_id, S.assignments.c.annotator_id == person["id"]))
        if cands is None or not 0 <= index < len(cands) or "media" not in cands[index] \
                or (shown is None and person["role"] != "admin") or not settings.media_dir:
            raise HTTPException(404, "no such media file")
        try:
            path = check_media_path(Path(settings.media_dir), cands[index]["media"])
        except RowProblem:
            raise HTTPException(404, "no such media file") from None
        return FileResponse(path, media_type=MEDIA_TYPES[path.suffix.lower()],
                            headers={"Cache-Control": "private, max-age=3600"})

    # --- admin pages ---------------------------------------------------------------------------------

    @app.get("/admin", include_in_schema=False)
    def admin_page(request: Request, person: dict = Depends(admin), new: str = "", link: str = "") -> Response:
        return templates.TemplateResponse(request, "admin.html", {
            "me": person, "status": project_status(store), "new_name": new, "new_link": link})

    @app.post("/admin/annotators", include_in_schema=False)
    def admin_add(request: Request, form: dict = Depends(form_of), person: dict = Depends(admin)) -> Response:
        name = form.get("name", "")
        try:
            token = store.add_annotator(name)
        except LabelError as exc:
            return templates.TemplateResponse(request, "admin.html", {
                "me": person, "status": project_status(store), "error": str(exc)}, status_code=422)
        return templates.TemplateResponse(request, "admin.html", {
            "me": person, "status": project_status(store), "new_name": name.strip(),
            "new_link": f"{_base(request)}/login?token={token}"})

    @app.get("/admin/export/{what}", include_in_schema=False)
    def admin_export(what: str, person: dict = Depends(admin)) -> Response:
        rows = _export(what, {})
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        return Response(text, media_type="application/x-ndjson",
                        headers={"Content-Disposition": f'attachment; filename="{what}.jsonl"'})

    def _base(request: Request) -> str:
        return public_url.rstrip("/") or f"{request.url.scheme}://{request.url.netloc}"

    def _export(what: str, options: dict[str, Any]) -> list[dict[str, Any]]:
        if what not in WHAT:
            raise HTTPException(404, f"no export {what!r}; expected one of {', '.join(WHAT)}")
        try:
            rows, _, _ = export_rows(store, what, **options)
        except LabelError as exc:
            raise HTTPException(422, str(exc)) from None
        return rows

    # --- JSON API ------------------------------------------------------------------------------------

    @app.get("/api/next")
    def api_next(person: dict = Depends(me)) -> dict[str, Any]:
        """The caller's next task (the same one again until it is answered), or `{"task": null}`."""
        task = queue.next_for(person["id"])
        return {"task": web.task_json(task, settings) if task else None, "progress": queue.progress(person["id"])}

    @app.post("/api/labels", openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"type": "object", "required": ["assignment_id", "submission_id"]}}}}})
    async def api_label(request: Request, next: bool = True, person: dict = Depends(me)) -> Response:
        """Store an answer to a task. Body: assignment_id, submission_id (yours, unique: a retry with the
        same id is answered with the first result and stores nothing), and by kind: `choice` (left,
        right, tie, both_bad, skip) + optional `strength` (slightly, clearly); `ranking` (candidate
        indices, best first); `ratings` ({criterion: [score per candidate index]}); optional `comment`,
        `rewrite` ({index, text}), `duration_ms`. Returns the label id and, unless next=false, the next task.
        The answer is committed before this returns."""
        # The hot path of every annotator: the body is parsed here (after the token check) and the
        # database work runs in the thread pool; the answer is serialized once, without pydantic.
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            return JSONResponse({"error": "the body is not valid JSON"}, status_code=422)
        if not isinstance(body, dict):
            return JSONResponse({"error": "expected a JSON object"}, status_code=422)
        try:
            if next:
                label_id, duplicate, task = await anyio.to_thread.run_sync(queue.submit_and_next, person["id"], body)
            else:
                (label_id, duplicate), task = await anyio.to_thread.run_sync(queue.submit, person["id"], body), None
        except SubmitError as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.status)
        out: dict[str, Any] = {"label_id": label_id, "duplicate": duplicate}
        if next:
            out["next"] = web.task_json(task, settings) if task else None
        return Response(json.dumps(out, ensure_ascii=False), media_type="application/json")

    @app.post("/api/undo")
    def api_undo(person: dict = Depends(me)) -> dict[str, Any]:
        """Retract the caller's last label; its item becomes their next task again."""
        return {"undone_item_id": queue.undo(person["id"])}

    @app.get("/api/me")
    def api_me(person: dict = Depends(me)) -> dict[str, Any]:
        return {"name": person["name"], "role": person["role"], "progress": queue.progress(person["id"])}

    @app.get("/api/status")
    def api_status(person: dict = Depends(admin)) -> dict[str, Any]:
        """Progress, per-annotator counts, agreement (kappa per pair, alpha), position bias, gold, disputes."""
        return project_status(store)

    @app.post("/api/items")
    def api_items(rows: list[Any] = Body(...), person: dict = Depends(admin)) -> dict[str, Any]:
        """Add items: a list of candidate rows in the candidates-file format (all are added, or none)."""
        start = store.count_items(gold=True) + 1
        parsed = [Row(f"item {i}", r) if isinstance(r, dict) else Row(f"item {i}", error="expected an object")
                  for i, r in enumerate(rows)]
        try:
            ids = store.add_items(parse_rows(parsed, settings, "the request", first_index=start))
        except (DataError, LabelError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=422)  # type: ignore[return-value]
        return {"item_ids": ids}

    @app.get("/api/labels")
    def api_labels(after: int = 0, limit: int = 1000, person: dict = Depends(admin)) -> dict[str, Any]:
        """Raw labels with label_id > after (oldest first, at most `limit`, <= 10000), retracted ones too:
        a trainer polls with the last id it has seen. A label undone later shows up again under
        `retracted_at` only in a full export (GET /api/export/raw)."""
        rows = raw_rows(store, after=after, limit=max(1, min(limit, 10000)))
        return {"labels": rows, "last": rows[-1]["label_id"] if rows else after}

    @app.get("/api/export/{what}")
    def api_export(what: str, ties: str = "drop", both_bad: str = "drop", rank_pairs: str = "all",
                   min_votes: int = 1, criterion: str = "", person: dict = Depends(admin)) -> dict[str, Any]:
        """Export rows as JSON: preferences (options ties, both_bad, rank_pairs, min_votes), ratings
        (criterion), sft, raw."""
        options: dict[str, Any] = {}
        if what == "preferences":
            options = {"ties": ties, "both_bad": both_bad, "rank_pairs": rank_pairs, "min_votes": min_votes}
        elif what == "ratings":
            options = {"criterion": criterion}
        return {"rows": _export(what, options)}

    @app.post("/api/annotators")
    def api_annotators(request: Request, body: dict[str, Any] = Body(...), person: dict = Depends(admin)
                       ) -> dict[str, Any]:
        """Add a person: {"name": ...} -> their token and personal link (shown once)."""
        try:
            token = store.add_annotator(str(body.get("name", "")))
        except LabelError as exc:
            return JSONResponse({"error": str(exc)}, status_code=422)  # type: ignore[return-value]
        return {"name": str(body["name"]).strip(), "token": token, "link": f"{_base(request)}/login?token={token}"}

    @app.get("/api/openapi.json", include_in_schema=False)
    def api_openapi(person: dict = Depends(admin)) -> dict[str, Any]:
        return app.openapi()

    return SecurityHeaders(app)  # type: ignore[return-value]


class SecurityHeaders:
    """Plain ASGI middleware adding web.SECURITY_HEADERS to every response (a fraction of the cost of
    Starlette's @app.middleware("http"), which wraps each response in a stream)."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.headers = [(k.lower().encode(), v.encode()) for k, v in web.SECURITY_HEADERS.items()]

    def __getattr__(self, name: str) -> Any:  # routes, openapi(), state ... of the wrapped app
        return getattr(self.app, name)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = [*message.get("headers", []), *(h for h in self.headers if h[0] not in present)]
            await send(message)

        await self.app(scope, receive, send_with_headers)
