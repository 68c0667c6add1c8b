#!/usr/bin/env bash
# Re-vendor the web page's JavaScript libraries from the npm registry at the pinned
# versions below. Only someone changing a version runs this (it needs npm); the
# server itself serves the committed files and has no build step.
#
#   chat/static/chat/vendor/update.sh          # re-fetch the pinned versions
#
# To upgrade: change a version here, run it, read the libraries' changelogs, run
# tests/people/test_markdown_page.py, commit the script and the files together.
set -euo pipefail

MARKED=18.2.1          # Markdown -> HTML (CommonMark + GFM), MIT
DOMPURIFY=3.4.18       # allow-list HTML sanitizer, MPL-2.0 or Apache-2.0
HIGHLIGHTJS=11.12.0    # syntax highlighting, common languages build, BSD-3-Clause

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# fetch NAME@VERSION: npm pack downloads the registry's tarball and checks its integrity.
fetch() {
  local dir="$work/$2"
  mkdir -p "$dir"
  (cd "$dir" && npm pack --silent "$1" >/dev/null && tar xzf ./*.tgz)
  echo "$dir/package"
}

pkg="$(fetch "marked@$MARKED" marked)"
cp "$pkg/lib/marked.umd.js" "$here/marked.umd.js"
cp "$pkg/LICENSE" "$here/LICENSE.marked"

pkg="$(fetch "dompurify@$DOMPURIFY" dompurify)"
cp "$pkg/dist/purify.min.js" "$here/purify.min.js"
cp "$pkg/LICENSE" "$here/LICENSE.dompurify"

# The cdn-assets package is highlight.js's prebuilt browser bundle (the main
# package is CommonJS sources for bundlers).
pkg="$(fetch "@highlightjs/cdn-assets@$HIGHLIGHTJS" highlightjs)"
cp "$pkg/highlight.min.js" "$here/highlight.min.js"
cp "$pkg/styles/github.min.css" "$here/highlight-github.min.css"
cp "$pkg/styles/github-dark.min.css" "$here/highlight-github-dark.min.css"
cp "$pkg/LICENSE" "$here/LICENSE.highlightjs"

# Source maps point at files we do not ship; drop the comment so browsers do not ask for them.
sed -i '/^\/\/# sourceMappingURL=/d' "$here"/*.js

cat > "$here/VERSIONS" <<VERSIONS
marked $MARKED
dompurify $DOMPURIFY
@highlightjs/cdn-assets $HIGHLIGHTJS
VERSIONS
echo "vendored: marked $MARKED, dompurify $DOMPURIFY, highlight.js $HIGHLIGHTJS into $here"
