"""What the server needs besides routes: tokens and cookies, CSRF, security headers, safe Markdown,
and turning a Task into what a page or the JSON API shows.

Authentication: every request carries a person's secret token, as `Authorization: Bearer TOKEN`
(scripts) or as the HttpOnly, SameSite=Strict cookie that `/login?token=...` sets (browsers). A
request that changes something with the cookie must also carry the CSRF value of the page it came from
(a form field or the `X-CSRF-Token` header): an HMAC of the token under the project's secret, which a
page on another site can neither read nor compute. Bearer requests need none (browsers never add that
header by themselves).
"""

from __future__ import annotations

import hashlib
import hmac
import time
import uuid
from typing import Any

from markdown_it import MarkdownIt

from rlhfkit.label.assign import Task
from rlhfkit.label.items import MEDIA_TYPES, Settings
from rlhfkit.label.store import Store, hash_token

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; media-src 'self'; "
       "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # the login link holds a token: never send it on
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}

_markdown = MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False})


def render_markdown(text: str) -> str:
    """Markdown -> HTML with raw HTML escaped (html=False) and unsafe link schemes (javascript:,
    vbscript:, file:, most data:) refused by markdown-it's validateLink: safe to insert as markup."""
    return _markdown.render(text or "")


def cookie_name(store: Store) -> str:
    """One cookie per project, so two servers on one host (different ports) keep their own sessions."""
    return "rlhfkit_label_" + hashlib.sha256(store.secret.encode()).hexdigest()[:10]


def csrf_value(store: Store, token: str) -> str:
    return hmac.new(store.secret.encode(), b"csrf:" + token.encode(), hashlib.sha256).hexdigest()[:32]


def csrf_ok(store: Store, token: str, given: str | None) -> bool:
    return bool(given) and hmac.compare_digest(csrf_value(store, token), given or "")


class PeopleCache:
    """token -> person for a few seconds: every request authenticates, most need no extra query.
    A deactivated or rotated token stops working within `ttl` seconds."""

    def __init__(self, store: Store, ttl: float = 5.0) -> None:
        self.store, self.ttl = store, ttl
        self._cache: dict[str, tuple[float, dict[str, Any] | None]] = {}

    def get(self, token: str) -> dict[str, Any] | None:
        if not token or len(token) > 200:
            return None
        key = hash_token(token)
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        person = self.store.who(token)
        if len(self._cache) > 10000:
            self._cache.clear()
        self._cache[key] = (now + self.ttl, person)
        return person


def prompt_view(prompt: Any) -> list[dict[str, str]]:
    """A prompt as messages to show: a string is one user message."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": str(m.get("role", "")), "content": str(m.get("content", ""))} for m in prompt]


def candidate_view(task: Task, position: int, cand: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"position": position, "index": cand["index"]}
    if "media" in cand:
        suffix = "." + cand["media"].rsplit(".", 1)[-1].lower()
        out.update(media_url=f"/media/{task.item_id}/{cand['index']}", media_type=MEDIA_TYPES.get(suffix, ""),
                   caption=cand.get("caption", ""))
    else:
        out["text"] = cand["text"]
    return out


def task_json(task: Task, settings: Settings) -> dict[str, Any]:
    """The JSON API's task: candidates in the order shown; answers refer to `index` (or left/right)."""
    return {
        "assignment_id": task.assignment_id, "item_id": task.item_id, "item": task.key, "kind": settings.kind,
        "prompt": task.prompt,
        "candidates": [candidate_view(task, pos, c) for pos, c in enumerate(task.candidates)],
        "submission_id": uuid.uuid4().hex,
        "options": {"scale": list(settings.scale), "criteria": settings.criteria, "strength": settings.strength,
                    "rewrite": settings.rewrite},
    }


def form_answer(settings: Settings, form: dict[str, str], task_candidates: int) -> dict[str, Any]:
    """A page's form fields -> the API's answer body (checked later by assign.parse_answer)."""
    body: dict[str, Any] = {"assignment_id": _int(form.get("assignment_id")),
                            "submission_id": form.get("submission_id", "")}
    if form.get("choice"):
        body["choice"] = form["choice"]
    if form.get("strength") and body.get("choice") in ("left", "right"):  # picked, then tie/skip chosen: dropped
        body["strength"] = form["strength"]
    if form.get("comment", "").strip():
        body["comment"] = form["comment"]
    if form.get("duration_ms"):
        body["duration_ms"] = _int(form["duration_ms"])
    if body.get("choice") != "skip":
        if settings.kind == "rank":
            positions = {i: _int(form.get(f"rank_{i}")) for i in range(task_candidates)}
            body["ranking"] = [i for i, _ in sorted(positions.items(), key=lambda kv: (kv[1] is None, kv[1] or 0))] \
                if sorted(p for p in positions.values() if p is not None) == list(range(1, task_candidates + 1)) \
                else None
        if settings.kind == "rate":
            body["ratings"] = {c: [_int(form.get(f"rate_{c}_{i}")) for i in range(task_candidates)]
                               for c in settings.criteria}
    if settings.rewrite and form.get("rewrite_text", "").strip():
        body["rewrite"] = {"index": _int(form.get("rewrite_index")), "text": form["rewrite_text"]}
    return body


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
