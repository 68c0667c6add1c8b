"""Messages as the admin shows them: Markdown rendered server side, then sanitized.

The same rules as the web page (chat/static/chat/markdown.js), in Python:
CommonMark plus GitHub's tables, task lists and strikethrough, single newlines
kept as line breaks, raw HTML shown as text; then the `nh3` allow-list sanitizer (Ammonia), because model
output is untrusted and an operator's browser holds an admin session. Images
from other sites appear only when R2D2_PAGE_REMOTE_IMAGES is on.
"""

from __future__ import annotations

import re
from functools import cache
from html import escape

import nh3
from django.conf import settings
from django.utils.safestring import SafeString, mark_safe
from markdown_it import MarkdownIt
from mdit_py_plugins.tasklists import tasklists_plugin

# What Markdown produces. No style, no forms, no frames.
TAGS = {
    "a", "blockquote", "br", "code", "del", "em", "h1", "h2", "h3", "h4", "h5", "h6", "hr",
    "input", "li", "ol", "p", "pre", "s", "strong", "table", "tbody", "td", "th", "thead", "tr", "ul",
}  # fmt: skip
ATTRIBUTES = {
    "a": {"href", "title"},
    "img": {"src", "alt", "title"},
    "code": {"class"},
    "ol": {"start"},
    "th": {"align", "style"},
    "td": {"align", "style"},
    "input": {"type", "checked", "disabled"},
}
URL_SCHEMES = {"http", "https", "mailto"}
_LANGUAGE_CLASS = re.compile(r"language-[\w+#.-]+")
_ALIGN_STYLE = re.compile(r"text-align:\s*(left|center|right)")


def _attribute_filter(tag: str, attribute: str, value: str) -> str | None:
    """Keep an allowed attribute only when its value is one the page would keep too."""
    if attribute == "class":
        # Only "language-x" on code: admin classes would let a reply dress up as the admin's own UI.
        kept = " ".join(c for c in value.split() if _LANGUAGE_CLASS.fullmatch(c))
        return kept or None
    if attribute == "style":
        # markdown-it aligns table cells with a style; keep exactly that and nothing else.
        match = _ALIGN_STYLE.fullmatch(value.strip().rstrip(";"))
        return f"text-align:{match.group(1)}" if match else None
    if attribute == "type":
        return value if value == "checkbox" else None
    if tag == "img" and attribute == "src":
        return value if value.startswith("https:") else None
    return value


def _blocked_image(self, tokens, idx, options, env) -> str:
    """An image shown as a link to it: the reader's browser fetches nothing on its own."""
    token = tokens[idx]
    alt = self.renderInlineAsText(token.children or [], options, env) or "untitled"
    return f'<a href="{escape(token.attrGet("src") or "")}">[image: {escape(alt)}]</a>'


@cache
def _parser(remote_images: bool) -> MarkdownIt:
    # html=False: raw HTML in a reply is escaped and shown as text, as on the page.
    md = MarkdownIt("commonmark", {"html": False, "breaks": True}).enable(["table", "strikethrough"])
    md.use(tasklists_plugin)
    if not remote_images:
        md.add_render_rule("image", _blocked_image)
    return md


def render(text: str) -> SafeString:
    """Untrusted Markdown -> HTML safe to put in a page."""
    remote_images = settings.R2D2_PAGE_REMOTE_IMAGES
    html = _parser(remote_images).render(text)
    clean = nh3.clean(
        html,
        tags=TAGS | {"img"} if remote_images else TAGS,
        clean_content_tags={"script", "style"},  # dropped with their text, not just unwrapped
        attributes=ATTRIBUTES,
        attribute_filter=_attribute_filter,
        url_schemes=URL_SCHEMES,
        link_rel="noopener noreferrer",
        set_tag_attribute_values={"a": {"target": "_blank"}, "input": {"disabled": "disabled"}},
    )
    return mark_safe(clean)  # sanitized just above
