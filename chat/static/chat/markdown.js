// Model replies as Markdown: untrusted text -> sanitized, highlighted DOM, patched in
// place while it streams. Needs the vendored marked, DOMPurify and highlight.js
// (chat/static/chat/vendor/, loaded before this file).
//
// Safety is layered: marked turns text into HTML, showing any raw HTML the model wrote
// as text; DOMPurify keeps only an allow-list of tags, attributes and URL schemes
// (links to javascript: or data:, for one); and the page's Content-Security-Policy
// (chat/csp.py) would still refuse inline script or foreign origins if anything got
// past that. The sanitized HTML is parsed and decorated in a <template> (inert:
// nothing in it loads or runs) before its nodes join the page.
"use strict";

window.R2D2Markdown = (() => {
  const config = JSON.parse(document.getElementById("r2d2-config").textContent);
  const remoteImages = Boolean(config.remoteImages);

  // Only what Markdown itself produces. No style (it could lay a fake dialog over the
  // page), no forms, no frames, no media.
  const ALLOWED_TAGS = [
    "a", "blockquote", "br", "code", "del", "em", "h1", "h2", "h3", "h4", "h5", "h6", "hr",
    "input", "li", "ol", "p", "pre", "s", "strong", "table", "tbody", "td", "th", "thead", "tr", "ul",
  ];
  if (remoteImages) ALLOWED_TAGS.push("img");
  const ALLOWED_ATTR = ["href", "title", "alt", "src", "align", "class", "type", "checked", "disabled", "start"];
  // DOMPurify tests every attribute value against this, so it is DOMPurify's own shape with fewer
  // schemes: a value is fine if it names http(s) or mailto, or names no scheme at all (a word, a
  // relative path, a fragment); javascript:, data:, vbscript: and every other scheme fail.
  const SAFE_URL = /^(?:(?:https?|mailto):|[^a-z]|[a-z+.-]+(?:[^a-z+.\-:]|$))/i;
  const SAFE_IMAGE_URL = /^https:/i;  // matches the CSP's img-src when remote images are on
  const LANGUAGE_CLASS = /^language-[\w+#.-]+$/;

  const PURIFY = {
    ALLOWED_TAGS,
    ALLOWED_ATTR,
    ALLOWED_URI_REGEXP: SAFE_URL,
    ALLOW_DATA_ATTR: false,
    ALLOW_ARIA_ATTR: false,  // a reply must not make itself a live region or relabel the page
    ALLOW_UNKNOWN_PROTOCOLS: false,
  };

  DOMPurify.addHook("uponSanitizeAttribute", (node, data) => {
    const name = data.attrName;
    if (name === "class") {
      // Only marked's "language-x" on code: page classes (msg-error, notice...) would let a reply dress up as the UI.
      const kept = data.attrValue.split(/\s+/).filter((c) => LANGUAGE_CLASS.test(c));
      data.attrValue = kept.join(" ");
      data.keepAttr = kept.length > 0 && node.nodeName === "CODE";
    } else if (name === "src") {
      // DOMPurify lets data: through on <img>; we only let https: through, and only when allowed.
      data.keepAttr = remoteImages && node.nodeName === "IMG" && SAFE_IMAGE_URL.test(data.attrValue.trim());
    } else if (name === "type" || name === "checked" || name === "disabled") {
      data.keepAttr = node.nodeName === "INPUT";
    }
  });

  DOMPurify.addHook("afterSanitizeAttributes", (node) => {
    if (node.nodeName === "A" && node.hasAttribute("href")) {
      node.setAttribute("target", "_blank");
      node.setAttribute("rel", "noopener noreferrer");
    } else if (node.nodeName === "INPUT") {
      // Task-list boxes only, and read-only.
      if (node.getAttribute("type") !== "checkbox") node.remove();
      else node.setAttribute("disabled", "");
    }
  });

  const escapeHtml = (text) => String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

  marked.use({
    gfm: true,  // tables, task lists, strikethrough, autolinks
    breaks: true,  // a single newline is a line break, as on GitHub comments: models write poems and addresses that way
    renderer: {
      // Raw HTML in a reply is shown as the text it is, as chat apps do: models mostly write HTML
      // to talk about it. (Passing it to the sanitizer would also work, but parsing it at all
      // makes the browser report every inline handler and style it refuses under the CSP.)
      html({ text, block }) {
        const shown = escapeHtml(block ? text.trim() : text);
        return block ? `<p>${shown.replace(/\n/g, "<br>")}</p>\n` : shown;
      },
      image({ href, text }) {
        if (remoteImages) return false;  // marked's own <img>, then the sanitizer's checks
        // Off: show that there was an image and where, without the browser fetching it.
        return `<a href="${escapeHtml(href)}">[image: ${escapeHtml(text || "untitled")}]</a>`;
      },
    },
  });

  /** Markdown -> a detached, sanitized fragment with highlighted code blocks and their Copy buttons. */
  function toFragment(markdown) {
    const clean = DOMPurify.sanitize(marked.parse(markdown), PURIFY);
    const template = document.createElement("template");
    template.innerHTML = clean;
    for (const code of template.content.querySelectorAll("pre > code")) decorateCode(code);
    return template.content;
  }

  function decorateCode(code) {
    const named = (/(?:^|\s)language-([\w+#.-]+)/.exec(code.className) || [])[1];
    const text = code.textContent;
    const known = named && hljs.getLanguage(named);
    // highlight.js escapes the text it returns, so its HTML is safe to insert.
    const result = known ? hljs.highlight(text, { language: named, ignoreIllegals: true }) : hljs.highlightAuto(text);
    code.innerHTML = result.value;
    code.classList.add("hljs");
    const pre = code.parentElement;
    const block = document.createElement("div");
    block.className = "code-block";
    const head = document.createElement("div");
    head.className = "code-head";
    const label = document.createElement("span");
    label.textContent = named || result.language || "text";
    const copy = document.createElement("button");
    copy.type = "button";
    copy.className = "copy-code";
    copy.textContent = "Copy";
    copy.setAttribute("aria-label", "Copy code");
    head.append(label, copy);
    pre.replaceWith(block);
    block.append(head, pre);
  }

  /**
   * Show `markdown` in `target`, keeping every top-level block that did not change.
   * While a reply streams only its last block changes, so earlier paragraphs, tables
   * and code blocks stay the very same nodes: no flicker, text selection survives.
   */
  function render(target, markdown) {
    const fresh = Array.from(toFragment(markdown).childNodes);
    const old = Array.from(target.childNodes);
    let same = 0;
    while (same < fresh.length && same < old.length && old[same].isEqualNode(fresh[same])) same++;
    for (const node of old.slice(same)) node.remove();
    target.append(...fresh.slice(same));
  }

  async function copyText(text) {
    if (navigator.clipboard && window.isSecureContext) return navigator.clipboard.writeText(text);
    // Plain http on a LAN address has no Clipboard API: the old way still works there.
    const area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.className = "offscreen";
    document.body.append(area);
    area.select();
    try {
      if (!document.execCommand("copy")) throw new Error("copy refused");
    } finally {
      area.remove();
    }
  }

  /** One listener for every Copy button under `root`, present and future. */
  function enableCopyButtons(root) {
    root.addEventListener("click", async (event) => {
      const button = event.target.closest("button.copy-code");
      if (!button || !root.contains(button)) return;
      const code = button.closest(".code-block").querySelector("pre code");
      try {
        await copyText(code.textContent);
        button.textContent = "Copied";
      } catch {
        button.textContent = "Copy failed";
      }
      setTimeout(() => { button.textContent = "Copy"; }, 1500);
    });
  }

  return { render, enableCopyButtons };
})();
