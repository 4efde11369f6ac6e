"""The label app in a real browser: real key presses, clicks and drags against a real `rlhfkit label serve`.

Each test starts its own server on a SQLite project in tmp_path and drives the system Chromium (the
`page` fixture, tests/label_services.py). What was stored is read back through the admin JSON API.
Two tests also write the screenshots in docs/images (overwritten on every run).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.label_server import LabelServer, compare_rows, make_project

try:
    from playwright.sync_api import expect
except ImportError:  # the browser fixture skips these tests (or fails them under RLHFKIT_REQUIRE_SERVICES=1)
    expect = None

DOCS_IMAGES = Path(__file__).resolve().parents[1] / "docs" / "images"


@pytest.fixture
def serve(tmp_path: Path):
    """`serve(rows, **settings) -> LabelServer` on a new SQLite project; stopped after the test."""
    servers: list[LabelServer] = []

    def start(rows: list[dict[str, Any]], **settings: Any) -> LabelServer:
        target = make_project(tmp_path / f"project{len(servers)}.db", rows, **settings)
        servers.append(LabelServer(target))
        return servers[-1]

    yield start
    for srv in servers:
        srv.__exit__(None, None, None)


def raw_labels(srv: LabelServer) -> list[dict[str, Any]]:
    with srv.client(srv.admin_token) as client:
        r = client.get("/api/export/raw")
        r.raise_for_status()
        return r.json()["rows"]


def log_in(page, srv: LabelServer, token: str) -> None:
    page.goto(srv.login_url(token))
    expect(page).to_have_url(re.compile(r"/(label|admin)$"))


def shown_texts(page) -> list[str]:
    """The candidates' texts in the order shown (A first)."""
    return [t.strip() for t in page.locator(".candidate .text").all_inner_texts()]


def progress_text(page) -> str:
    return page.inner_text(".progress span")


def bar_width(page) -> float | None:
    """The progress bar's width in percent as app.js set it (None: app.js did not run)."""
    width = page.locator(".progress .bar").evaluate("b => b.style.width")
    return float(width.rstrip("%")) if width else None


def canonical(text: str) -> str:
    """compare_rows' answers end in ' a' (candidate 0) or ' b' (candidate 1)."""
    return text.rsplit(" ", 1)[-1]


def label_via_api(srv: LabelServer, token: str, choose) -> str | None:  # noqa: ANN001
    """Answer the annotator's next task with `choose(task)` (an answer body without ids); the item key."""
    import uuid

    with srv.client(token) as client:
        task = client.get("/api/next").json()["task"]
        if task is None:
            return None
        body = {"assignment_id": task["assignment_id"], "submission_id": uuid.uuid4().hex, **choose(task)}
        client.post("/api/labels", json=body, params={"next": "false"}).raise_for_status()
        return task["item"]


def side_of(task: dict[str, Any], index: int) -> str:
    """The side (left/right) on which candidate `index` is shown in a compare task."""
    return "left" if task["candidates"][0]["index"] == index else "right"


def assert_clean(page) -> None:
    assert page.dialogs == []
    assert page.console_errors == []


# ---------------------------------------------------------------------------------------------
# compare


def test_a_compare_session_by_keys_and_mouse_stores_each_answer_and_ends_on_the_done_page(page, serve):
    srv = serve(compare_rows(5), strength=True)
    token = srv.add_annotator("alice")

    # the personal link sets the cookie and drops the token from the address bar
    page.goto(srv.login_url(token))
    expect(page).to_have_url(srv.url + "/label")
    assert token not in page.url
    cookie = [c for c in page.context.cookies() if c["value"] == token]
    assert cookie and cookie[0]["httpOnly"] and cookie[0]["sameSite"] == "Strict"

    expect(page.locator(".prompt")).to_contain_text("question 0")
    first = shown_texts(page)
    assert sorted(first) == ["answer 0 a", "answer 0 b"]
    assert progress_text(page) == "0 labeled · 5 left"
    assert bar_width(page) == 0.0  # set by app.js

    # `w` picks "clearly", `1` says A (the left answer) is better
    page.keyboard.press("w")
    assert page.is_checked("input[name=strength][value=clearly]")
    page.keyboard.press("1")
    expect(page.locator(".prompt")).to_contain_text("question 1")
    assert progress_text(page) == "1 labeled · 4 left"
    assert bar_width(page) == 20.0
    [lab] = raw_labels(srv)
    assert lab["item"] == "item-1" and lab["annotator"] == "alice"
    assert lab["choice"] == canonical(first[0]) and lab["chosen_side"] == "left"
    assert lab["strength"] == "clearly" and lab["margin"] == 1.0
    assert lab["duration_ms"] is not None and lab["duration_ms"] >= 0

    # a tie by mouse
    page.get_by_role("button", name="tie").click()
    expect(page.locator(".prompt")).to_contain_text("question 2")
    assert raw_labels(srv)[-1]["choice"] == "tie" and raw_labels(srv)[-1]["strength"] is None

    # `s` skips; `u` undoes the skip and shows that item again, in the same order
    third = shown_texts(page)
    page.keyboard.press("s")
    expect(page.locator(".prompt")).to_contain_text("question 3")
    assert raw_labels(srv)[-1]["choice"] == "skip"
    page.keyboard.press("u")
    expect(page.locator(".prompt")).to_contain_text("question 2")
    assert shown_texts(page) == third
    labels = raw_labels(srv)
    assert labels[-1]["choice"] == "skip" and labels[-1]["retracted_at"] is not None
    assert progress_text(page).startswith("2 labeled")

    # `c` opens and focuses the comment box; letters typed there are text, not shortcuts
    page.keyboard.press("c")
    assert page.evaluate("document.activeElement.name") == "comment"
    page.keyboard.type("B cites its source; A is vague")
    expect(page.locator(".prompt")).to_contain_text("question 2")  # the `s` and `u` in it did nothing
    page.keyboard.press("Escape")
    page.keyboard.press("2")
    expect(page.locator(".prompt")).not_to_contain_text("question 2")
    lab = raw_labels(srv)[-1]
    assert lab["item"] == "item-3" and lab["retracted_at"] is None
    assert lab["comment"] == "B cites its source; A is vague"
    assert lab["choice"] == canonical(third[1]) and lab["chosen_side"] == "right" and lab["strength"] is None

    # answer whatever is left; then the done page
    for _ in range(5):
        if page.locator("h1", has_text="Nothing left for you").count():
            break
        before = page.inner_text(".prompt")
        page.keyboard.press("4")
        expect(page.locator("main")).not_to_contain_text(before)
    expect(page.locator("h1")).to_have_text("Nothing left for you")
    live = [lab for lab in raw_labels(srv) if lab["retracted_at"] is None and lab["choice"] != "skip"]
    expect(page.locator(".progress span")).to_have_text(f"{len(live)} labeled · 0 left")
    assert_clean(page)


def test_a_strength_picked_before_choosing_tie_is_not_an_error(page, serve):
    srv = serve(compare_rows(2), strength=True)
    log_in(page, srv, srv.add_annotator("alice"))
    page.keyboard.press("q")
    page.get_by_role("button", name="tie").click()
    expect(page.locator(".prompt")).to_contain_text("question 1")
    assert page.locator(".error").count() == 0
    lab = raw_labels(srv)[-1]
    assert lab["choice"] == "tie" and lab["strength"] is None
    assert_clean(page)


def test_holding_a_key_down_labels_one_item_not_the_next_ones_too(page, serve):
    srv = serve(compare_rows(3))
    log_in(page, srv, srv.add_annotator("alice"))
    page.keyboard.down("1")
    expect(page.locator(".prompt")).to_contain_text("question 1")
    page.keyboard.down("1")  # the key is still held: the browser sends repeats (repeat=true) to the new page
    page.keyboard.down("1")
    page.keyboard.up("1")
    page.wait_for_timeout(300)
    expect(page.locator(".prompt")).to_contain_text("question 1")
    assert len(raw_labels(srv)) == 1
    assert_clean(page)


def test_a_skip_is_not_counted_as_labeled_in_the_progress_bar(page, serve):
    srv = serve(compare_rows(3))
    log_in(page, srv, srv.add_annotator("alice"))
    page.keyboard.press("s")
    expect(page.locator(".prompt")).to_contain_text("question 1")
    assert progress_text(page).startswith("0 labeled")


def test_the_item_put_aside_by_an_undo_comes_back_to_the_same_annotator(page, serve):
    srv = serve(compare_rows(3))
    log_in(page, srv, srv.add_annotator("alice"))
    page.keyboard.press("s")  # question 0 skipped; question 1 is now shown (and open)
    expect(page.locator(".prompt")).to_contain_text("question 1")
    page.keyboard.press("u")  # question 0 again; question 1 goes back to the queue
    expect(page.locator(".prompt")).to_contain_text("question 0")
    seen = []
    for _ in range(4):
        if page.locator("h1", has_text="Nothing left for you").count():
            break
        prompt = page.inner_text(".prompt")
        seen.append(re.search(r"question \d", prompt).group(0))
        page.keyboard.press("3")
        expect(page.locator("main")).not_to_contain_text(prompt)
    assert sorted(seen) == ["question 0", "question 1", "question 2"]


def test_a_bad_personal_link_shows_a_styled_message_without_errors(page, serve):
    srv = serve(compare_rows(1))
    page.goto(srv.login_url("not-a-token"))
    expect(page.locator("h1")).to_have_text("Not allowed")
    assert page.locator("header").evaluate("h => getComputedStyle(h).display") == "flex"  # style.css applied
    assert page.dialogs == []
    assert page.console_errors == ["Failed to load resource: the server responded with a status of 401 (Unauthorized)"]


# ---------------------------------------------------------------------------------------------
# rank


def rank_rows(n: int) -> list[dict[str, Any]]:
    return [{"prompt": f"rank question {i}", "responses": [f"answer {i}.{k}" for k in range(4)]} for i in range(n)]


def visual_ranking(page) -> list[int]:
    return [int(i) for i in page.locator("#ranklist > li").evaluate_all("lis => lis.map(li => li.dataset.index)")]


def test_ranking_by_number_keys_and_by_drag_and_drop_stores_the_order_shown(page, serve):
    srv = serve(rank_rows(2), kind="rank")
    log_in(page, srv, srv.add_annotator("rita"))
    expect(page.locator(".prompt")).to_contain_text("rank question 0")
    shown = visual_ranking(page)  # candidate indices by position
    assert sorted(shown) == [0, 1, 2, 3]

    # keys: positions 3, 1, 4, 2 from best to worst; Backspace takes one back
    for key in ("3", "1", "2", "Backspace", "4", "2"):
        page.keyboard.press(key)
    want = [shown[2], shown[0], shown[3], shown[1]]
    assert [page.locator(f"select[name=rank_{i}]").input_value() for i in want] == ["1", "2", "3", "4"]
    page.keyboard.press("Enter")
    expect(page.locator(".prompt")).to_contain_text("rank question 1")
    lab = raw_labels(srv)[-1]
    assert lab["item"] == "item-1" and lab["ranking"] == want

    # drag and drop: the last answer to the top, then the (new) second one to the bottom
    items = page.locator("#ranklist > li")
    items.nth(3).drag_to(items.nth(0))
    items.nth(1).drag_to(items.nth(3))
    order = visual_ranking(page)
    assert sorted(order) == [0, 1, 2, 3]
    start = [int(i) for i in page.locator("#ranklist > li").evaluate_all("l => l.map(x => x.dataset.position)")]
    assert start != [0, 1, 2, 3]  # the drags moved something
    assert [page.locator(f"select[name=rank_{i}]").input_value() for i in order] == ["1", "2", "3", "4"]
    page.get_by_role("button", name="submit ranking").click()
    expect(page.locator("h1")).to_have_text("Nothing left for you")
    lab = raw_labels(srv)[-1]
    assert lab["item"] == "item-2" and lab["ranking"] == order
    assert_clean(page)


# ---------------------------------------------------------------------------------------------
# rate


def test_rating_rows_take_number_keys_in_turn_and_enter_submits(page, serve):
    rows = [{"prompt": f"rate question {i}", "responses": [f"reply {i}.{k}" for k in range(3)]} for i in range(2)]
    srv = serve(rows, kind="rate", scale=(1, 5), criteria=["helpfulness", "harmlessness"])
    log_in(page, srv, srv.add_annotator("raj"))
    expect(page.locator(".prompt")).to_contain_text("rate question 0")
    fieldsets = page.locator("fieldset[data-rate-row]")
    assert fieldsets.count() == 6
    expect(fieldsets.nth(0)).to_have_class(re.compile(r"\bcurrent\b"))
    names = [fieldsets.nth(k).locator("input").first.get_attribute("name") for k in range(6)]

    keys = ["5", "4", "9", "3", "2", "1", "4"]  # 9 is off the scale: ignored; the last row takes two presses
    for key in keys:
        page.keyboard.press(key)
    expect(fieldsets.nth(5)).to_have_class(re.compile(r"\bcurrent\b"))
    scores = [5, 4, 3, 2, 1, 4]
    want: dict[str, dict[int, int]] = {}
    for name, score in zip(names, scores):
        _, crit, index = name.split("_")
        want.setdefault(crit, {})[int(index)] = score
        assert page.is_checked(f"input[name={name}][value='{score}']")
    page.keyboard.press("Enter")
    expect(page.locator(".prompt")).to_contain_text("rate question 1")
    lab = raw_labels(srv)[-1]
    assert lab["item"] == "item-1"
    assert lab["ratings"] == {crit: [want[crit][i] for i in range(3)] for crit in ("helpfulness", "harmlessness")}
    assert_clean(page)


# ---------------------------------------------------------------------------------------------
# without JavaScript


def test_compare_and_rank_pages_work_as_plain_forms_without_javascript(browser, serve):
    compare = serve(compare_rows(2), strength=True)
    rank = serve(rank_rows(1), kind="rank")
    context = browser.new_context(java_script_enabled=False)
    try:
        page = context.new_page()
        page.goto(compare.login_url(compare.add_annotator("nojs")))
        expect(page.locator(".prompt")).to_contain_text("question 0")
        first = shown_texts(page)
        page.check("input[name=strength][value=slightly]")
        page.get_by_role("button", name="B is better").click()
        expect(page.locator(".prompt")).to_contain_text("question 1")
        lab = raw_labels(compare)[-1]
        assert lab["choice"] == canonical(first[1]) and lab["strength"] == "slightly" and lab["duration_ms"] is None
        page.check("input[name=strength][value=clearly]")  # then a tie: the strength is dropped
        page.get_by_role("button", name="tie").click()
        expect(page.locator("h1")).to_have_text("Nothing left for you")
        page.get_by_role("button", name="undo last label").click()
        expect(page.locator(".prompt")).to_contain_text("question 1")

        page.goto(rank.login_url(rank.add_annotator("nojs")))
        shown = visual_ranking(page)
        want = [shown[1], shown[3], shown[0], shown[2]]
        for place, index in enumerate(want, start=1):
            page.select_option(f"select[name=rank_{index}]", str(place))
        page.get_by_role("button", name="submit ranking").click()
        expect(page.locator("h1")).to_have_text("Nothing left for you")
        assert raw_labels(rank)[-1]["ranking"] == want
    finally:
        context.close()


# ---------------------------------------------------------------------------------------------
# hostile text

LONG = "W" * 20_000
FITS = "document.documentElement.scrollWidth <= window.innerWidth + 1"  # no horizontal scrolling
HOSTILE = [
    "<script>alert(1)</script>",
    "<img src=x onerror=alert(2)>",
    "[click](javascript:alert(3))",
    '<a href="javascript:alert(4)">x</a>',
    "<b>bold</b>",
]
GUIDELINES = """# How to judge

<script>alert(6)</script>

<iframe src="javascript:alert(7)"></iframe>

Raw <img src=x onerror=alert(8)> and <a href="javascript:alert(9)">a raw link</a>.

A [javascript link](javascript:alert(10)), a [vbscript one](vbscript:msgbox(11)) and
[the label page](/label).

""" + "L" * 20_000


def test_hostile_model_text_and_guidelines_show_as_literal_text_and_run_nothing(page, serve):
    rtl = "left \u202eright-to-left override\u202c end"
    zwj = "family \U0001f469\u200d\U0001f469\u200d\U0001f467 and z\u200dw\u200dj, emoji \U0001f642\U0001f525"
    key = '<img src=x onerror=alert("key")>' + "K" * 160  # ids and names may be long, without spaces
    name = '<img src=x onerror=alert("name")>' + "N" * 60
    rows = [{
        "id": key,
        "prompt": "\n".join(HOSTILE + [rtl, zwj]),
        "responses": ["\n".join(HOSTILE) + "\n" + LONG, "\n".join(reversed(HOSTILE)) + "\n" + rtl + "\n" + zwj],
    }]
    srv = serve(rows, title="Eval <script>alert(12)</script>", guidelines=GUIDELINES, overlap=2)
    popup_dialogs = []
    page.context.on("page", lambda p: p.on("dialog", lambda d: (popup_dialogs.append(d), d.dismiss())))
    log_in(page, srv, srv.add_annotator(name))

    main = page.inner_text("main")
    for text in HOSTILE + [rtl, zwj]:
        assert text in page.inner_text(".prompt")
    for text in HOSTILE:
        assert main.count(text) == 3  # the prompt and both answers
    assert LONG in main
    assert "<script>alert(12)</script>" in page.title() and "<script>" in page.inner_text("header")
    assert name in page.inner_text("header")
    # the only script is our own; no element came from the model's text
    assert page.locator("script").evaluate_all("s => s.map(x => x.getAttribute('src'))") == ["/static/app.js"]
    assert page.locator("img, iframe, b, main a").count() == 0
    assert page.locator("[onerror], [href^='javascript']").count() == 0
    assert page.evaluate(FITS)
    assert bar_width(page) == 0.0  # app.js ran under the CSP
    page.set_viewport_size({"width": 375, "height": 700})  # a phone
    assert page.evaluate(FITS)
    page.set_viewport_size({"width": 1280, "height": 720})

    # the guidelines: Markdown rendered, raw HTML shown as text, no javascript: link
    page.goto(srv.url + "/guidelines")
    article = page.locator("article.guidelines")
    expect(article.locator("h1")).to_have_text("How to judge")
    text = article.inner_text()
    assert "<script>alert(6)</script>" in text and '<iframe src="javascript:alert(7)"></iframe>' in text
    assert "<img src=x onerror=alert(8)>" in text
    assert page.locator("script").count() == 1 and page.locator("iframe, img, [onerror]").count() == 0
    hrefs = article.locator("a").evaluate_all("l => l.map(a => a.getAttribute('href'))")
    assert hrefs == ["/label"]
    assert page.evaluate(FITS)
    links = page.locator("a").count()
    assert links >= 3  # the nav links and the one in the guidelines
    for i in range(links):
        page.goto(srv.url + "/guidelines")
        page.locator("a").nth(i).click()
        page.wait_for_load_state()
    for other in page.context.pages[1:]:
        other.wait_for_load_state()
        other.close()

    # the page still works: answer the item by key
    page.goto(srv.url + "/label")
    page.keyboard.press("3")
    expect(page.locator("h1")).to_have_text("Nothing left for you")
    assert raw_labels(srv)[-1]["choice"] == "tie"

    # the dashboard shows the key and the name as text, in a page no wider than the window
    label_via_api(srv, srv.add_annotator("second"), lambda t: {"choice": "left"})
    log_in(page, srv, srv.admin_token)
    expect(page.locator("#disputed")).to_contain_text(key)
    expect(page.locator("#annotators")).to_contain_text(name)
    expect(page.locator("#kappa")).to_contain_text(name)
    assert page.locator("main img, main script, [onerror]").count() == 0
    assert page.evaluate(FITS)
    assert page.dialogs == [] and popup_dialogs == []
    csp = [e for e in page.console_errors if "Content Security Policy" in e or "Refused to" in e]
    assert csp == []
    assert page.console_errors == []


# ---------------------------------------------------------------------------------------------
# dashboard


def test_the_dashboard_shows_agreement_and_a_new_annotators_link_works(page, browser, serve):
    srv = serve(compare_rows(5), overlap=2)
    alice, bob = srv.add_annotator("alice"), srv.add_annotator("bob")
    votes = {"alice": [0, 0, 1, "tie"], "bob": [0, 1, 1, "tie"]}  # candidate index chosen, or tie
    for name, token in (("alice", alice), ("bob", bob)):
        for vote in votes[name]:
            label_via_api(srv, token, lambda t, v=vote: {"choice": "tie"} if v == "tie" else {"choice": side_of(t, v)})
    with srv.client(srv.admin_token) as client:
        status = client.get("/api/status").json()
    [pair] = status["agreement"]["kappa"]
    assert pair["shared"] == 4

    log_in(page, srv, srv.admin_token)
    expect(page).to_have_url(srv.url + "/admin")
    expect(page.locator("#kappa tbody tr")).to_have_count(1)
    row = page.locator("#kappa tbody td").all_inner_texts()
    assert row == [f"{pair['a']} & {pair['b']}", f"{pair['kappa']:.3f}", "4"]
    assert re.fullmatch(r"-?\d\.\d{3}", row[1])
    expect(page.locator(".cards")).to_contain_text(f"{status['agreement']['alpha']:.3f}")
    expect(page.locator(".cards")).to_contain_text("4 / 5 items done")
    names = page.locator("#annotators tbody td:first-child").all_inner_texts()
    assert {"alice", "bob"} <= set(names)
    expect(page.locator("#disputed")).to_contain_text("item-2")

    # add an annotator through the form; the personal link works in a fresh browser
    page.fill("input[name=name]", "carol")
    page.get_by_role("button", name="create link").click()
    expect(page.locator(".notice")).to_contain_text("carol")
    link = page.locator(".notice input.link").input_value()
    assert link.startswith(srv.url + "/login?token=")
    expect(page.locator("#annotators")).to_contain_text("carol")
    context = browser.new_context()
    try:
        carol = context.new_page()
        errors: list[str] = []
        carol.on("console", lambda m: m.type == "error" and errors.append(m.text))
        carol.goto(link)
        expect(carol).to_have_url(srv.url + "/label")
        expect(carol.locator(".who")).to_have_text("carol")
        expect(carol.locator(".prompt")).to_contain_text("question")
        carol.keyboard.press("1")
        expect(carol.locator("h1")).to_have_text("Nothing left for you")
        assert errors == []
    finally:
        context.close()
    assert [lab["annotator"] for lab in raw_labels(srv)].count("carol") == 1
    assert_clean(page)


# ---------------------------------------------------------------------------------------------
# media


def test_animated_gif_candidates_load_in_the_page(page, serve, tmp_path):
    from PIL import Image

    media = tmp_path / "media"
    (media / "clips").mkdir(parents=True)
    for name, colors in (("a.gif", ("red", "blue")), ("b.gif", ("green", "yellow"))):
        frames = [Image.new("RGB", (24, 16), c) for c in colors]
        frames[0].save(media / "clips" / name, save_all=True, append_images=frames[1:], duration=100, loop=0)
    rows = [{"prompt": "Which episode reaches the goal?",
             "responses": [{"media": "clips/a.gif"}, {"media": "clips/b.gif", "caption": "episode <b>2</b>"}]}]
    srv = serve(rows, media_dir=str(media))
    log_in(page, srv, srv.add_annotator("mia"))
    clips = page.locator("img.clip")
    expect(clips).to_have_count(2)
    page.wait_for_function("Array.from(document.querySelectorAll('img.clip')).every(i => i.complete)")
    assert clips.evaluate_all("l => l.map(i => [i.naturalWidth, i.naturalHeight])") == [[24, 16], [24, 16]]
    expect(page.locator(".caption")).to_have_text("episode <b>2</b>")
    page.keyboard.press("2")
    expect(page.locator("h1")).to_have_text("Nothing left for you")
    assert raw_labels(srv)[-1]["chosen_side"] == "right"
    assert_clean(page)


# ---------------------------------------------------------------------------------------------
# screenshots for the docs

DOC_ROWS = [
    {"id": "basil", "prompt": "How do I keep fresh basil from wilting? I bought a bunch yesterday and it already "
                              "looks sad.",
     "responses": [
         "Treat it like cut flowers: trim the stems, stand the bunch in a glass with an inch of water and keep it on "
         "the counter, away from direct sun. Loosely cover the leaves with a plastic bag and change the water every "
         "day or two. Don't put basil in the fridge: below about 10 \u00b0C the leaves turn black within a day.",
         "Wrap the basil in a damp paper towel, put it in a zip-top bag and store it in the coldest part of the "
         "fridge. It should last about a week this way.",
     ]},
    {"id": "tides", "prompt": "Explain tides to a ten-year-old in three sentences.",
     "responses": ["Tides are caused by the gravitational interaction between the Earth, Moon and Sun, producing "
                   "periodic variations in sea level.",
                   "The Moon's gravity pulls on the oceans, making the water bulge toward it. As Earth spins, your "
                   "beach moves into and out of that bulge. That's why the sea comes in and goes out about twice a "
                   "day."]},
    {"id": "regex", "prompt": "Write a regular expression that matches a US ZIP code.",
     "responses": ["`^\\d{5}(-\\d{4})?$` matches 12345 and 12345-6789.", "`\\d+` matches any ZIP code."]},
    {"id": "haiku", "prompt": "A haiku about debugging.",
     "responses": ["Code is broken now / I will fix the code later / debugging is hard",
                   "Silent stack trace glows / one missing semicolon / dawn breaks, tests turn green"]},
    {"id": "units", "prompt": "How many tablespoons are in a cup?",
     "responses": ["16 tablespoons (US customary).", "There are 12 tablespoons in a cup."]},
    {"id": "travel", "prompt": "Is it safe to drink tap water in Lisbon?",
     "responses": ["Yes. Lisbon's tap water meets EU drinking-water standards; it can taste of chlorine, so "
                   "chill it or use a filter jug if you mind.",
                   "No, always buy bottled water in Europe."]},
]


def test_screenshot_of_the_annotator_page_for_the_docs(page, serve):
    srv = serve(DOC_ROWS[:1], title="Helpfulness comparison",
                guidelines="Pick the answer that is more **correct**, then more **useful**.")
    page.set_viewport_size({"width": 1280, "height": 800})
    log_in(page, srv, srv.add_annotator("Dana"))
    expect(page.locator(".prompt")).to_contain_text("basil")
    page.keyboard.press("w")
    DOCS_IMAGES.mkdir(parents=True, exist_ok=True)
    out = DOCS_IMAGES / "label-compare.png"
    page.screenshot(path=str(out), full_page=False)
    assert out.stat().st_size < 400_000
    assert_clean(page)


def test_screenshot_of_the_dashboard_for_the_docs(page, serve):
    srv = serve(DOC_ROWS, title="Helpfulness comparison", overlap=3)
    tokens = {name: srv.add_annotator(name) for name in ("Dana", "Kofi", "Mei")}
    better = {"basil": 0, "tides": 1, "regex": 0, "haiku": 1, "units": 0, "travel": 0}  # the index of the better one
    flips = {("Kofi", "haiku"), ("Mei", "basil")}
    for name, token in tokens.items():
        for _ in range(len(DOC_ROWS) - (1 if name == "Mei" else 0)):
            def choose(task, name=name):
                best = better[task["item"]]
                if (name, task["item"]) in flips:
                    best = 1 - best
                strength = {"strength": "clearly"} if task["item"] in ("units", "travel") else {}
                seconds = 20 + 7 * len(task["item"]) + 3 * len(name)
                return {"choice": side_of(task, best), "duration_ms": 1000 * seconds, **strength}
            label_via_api(srv, token, choose)
    page.set_viewport_size({"width": 1280, "height": 800})
    log_in(page, srv, srv.admin_token)
    expect(page.locator("#kappa tbody tr")).to_have_count(3)
    DOCS_IMAGES.mkdir(parents=True, exist_ok=True)
    out = DOCS_IMAGES / "label-dashboard.png"
    page.screenshot(path=str(out), full_page=False)
    assert out.stat().st_size < 400_000
    assert_clean(page)
