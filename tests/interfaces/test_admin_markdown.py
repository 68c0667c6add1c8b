"""The admin's transcript renders replies as Markdown server side, sanitized (chat/web/markdown.py)."""

from __future__ import annotations

from html.parser import HTMLParser

import pytest
from django.urls import reverse

from chat.models import ChatMessage, ChatSession, Role
from chat.web import markdown

HOSTILE = """## Plans

- [x] found
- [ ] sent

| a | b |
| - | -: |
| 1 | 2 |

~~old~~ [docs](https://example.com/d) [js](javascript:alert(1)) [js2](  JaVaScRiPt:alert(1))
[data](data:text/html;base64,PHNjcmlwdD4=) <a href="javascript:alert(2)">raw</a>
<img src=x onerror=alert(3)> <script>alert(4)</script>
<div style="position:fixed;inset:0" onclick="alert(5)" class="errornote">overlay</div>
![pixel](https://evil.example/p.png?leak=1)

```python
print("<b>hi</b>")
"""


def parse(html: str) -> list[tuple[str, dict[str, str | None]]]:
    """Every element of `html`, with its attributes, as a browser's parser would see them."""
    found: list[tuple[str, dict[str, str | None]]] = []

    class Collector(HTMLParser):
        def handle_starttag(self, tag, attrs):
            found.append((tag, dict(attrs)))

    Collector().feed(html)
    return found


def test_markdown_renders_and_is_sanitized(settings):
    settings.R2D2_PAGE_REMOTE_IMAGES = False
    html = str(markdown.render(HOSTILE))
    assert "<h2>Plans</h2>" in html
    assert '<input checked="checked" disabled="disabled" type="checkbox">' in html
    assert "<table>" in html and '<td style="text-align:right">2</td>' in html
    assert "<s>old</s>" in html
    assert '<a href="https://example.com/d" target="_blank" rel="noopener noreferrer">docs</a>' in html
    # Nothing but Markdown's own elements, no handler, no style beyond alignment, only web links.
    elements = parse(html)
    assert {tag for tag, _ in elements} <= markdown.TAGS
    for tag, attrs in elements:
        assert not any(name.startswith("on") for name in attrs), (tag, attrs)
        assert attrs.get("style") in (None, "text-align:right"), (tag, attrs)
        assert "class" not in attrs or tag == "code", (tag, attrs)
        if "href" in attrs:
            assert attrs["href"].startswith("https://") and attrs["rel"] == "noopener noreferrer", attrs
    # Raw HTML and refused links are shown as the text the model wrote.
    assert "&lt;script&gt;alert(4)&lt;/script&gt;" in html and "&lt;img src=x onerror=alert(3)&gt;" in html
    assert "[js](javascript:alert(1))" in html
    # A remote image is a link to it, not a fetch.
    assert (
        '<a href="https://evil.example/p.png?leak=1" target="_blank" rel="noopener noreferrer">[image: pixel]</a>'
        in html
    )
    # An unterminated fence is code to the end, escaped.
    assert '<pre><code class="language-python">print("&lt;b&gt;hi&lt;/b&gt;")' in html


def test_remote_images_setting_lets_https_images_through(settings):
    settings.R2D2_PAGE_REMOTE_IMAGES = True
    html = str(markdown.render("![a](https://example.com/a.png) ![b](http://example.com/b.png) ![c](data:image/png,x)"))
    assert '<img src="https://example.com/a.png" alt="a">' in html
    # http: (and data:) images do not load: only https, as the page's CSP allows.
    assert [attrs.get("src") for tag, attrs in parse(html) if tag == "img"] == ["https://example.com/a.png", None]


def test_class_and_style_are_only_what_markdown_needs():
    html = str(markdown.render("```js\nx\n```\n\n| a |\n| :-: |\n| 1 |"))
    assert '<code class="language-js">' in html and 'style="text-align:center"' in html


@pytest.mark.django_db
def test_session_page_shows_rendered_replies_and_the_raw_toggle(admin_client):
    session = ChatSession.objects.create(model="gpt-4o-mini")
    ChatMessage.objects.create(session=session, role=Role.USER, content="**keep** <b>plain</b>")
    ChatMessage.objects.create(session=session, role=Role.ASSISTANT, content="# Title\n\n<script>alert(1)</script>")
    page = admin_client.get(reverse("admin:chat_chatsession_change", args=[session.id])).content.decode()
    assert '<div class="r2d2-md"><h1>Title</h1>' in page
    assert "<p>&lt;script&gt;alert(1)&lt;/script&gt;</p>" in page
    # The raw text of every message, escaped; the person's own message is not rendered.
    assert '<pre class="r2d2-raw r2d2-has-md"># Title\n\n&lt;script&gt;alert(1)&lt;/script&gt;</pre>' in page
    assert '<pre class="r2d2-raw">**keep** &lt;b&gt;plain&lt;/b&gt;</pre>' in page
    assert 'id="r2d2-show-raw"' in page and "Show raw text of replies" in page
    assert "<script>alert(1)</script>" not in page
