"""The documentation says what the code does: settings, error codes, close codes, actions and frames.

Fast and without a server: the code is read as source (`ast`), the pages as text.

Settings. A variable is "read" where the code of `chat/`, `r2d2site/` or `manage.py` calls `os.environ.get`,
`os.getenv`, an `environ` mapping's `.get` (chat/llm/credentials.py takes the environment as a parameter), one
of the settings' `env_*` helpers, or subscripts `os.environ[...]`, with the variable's name as a literal.
Every variable `r2d2site/settings.py` reads, and every one read anywhere else in that code, is a row of
docs/configuration.md's table; every variable in that table's first column is read somewhere in that code.
Tests and bench/ do not count: a variable only they read is not a setting (the benchmarks' own are in
bench/README.md).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

from chat.protocol.errors import ErrorCode

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SETTINGS = ROOT / "r2d2site" / "settings.py"
ENV_HELPERS = {"env_bool", "env_int", "env_float", "env_list"}


def code_files() -> list[Path]:
    files = [ROOT / "manage.py", *sorted((ROOT / "r2d2site").rglob("*.py")), *sorted((ROOT / "chat").rglob("*.py"))]
    return [path for path in files if "migrations" not in path.parts]


def _name(node: ast.expr) -> str:
    """`os.environ` → "os.environ", `environ` → "environ", anything else → ""."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _name(node.value)
        return f"{inner}.{node.attr}" if inner else ""
    return ""


def _literal(args: list[ast.expr]) -> str | None:
    if args and isinstance(args[0], ast.Constant) and isinstance(args[0].value, str):
        return args[0].value
    return None


def environment_reads(path: Path) -> Iterator[str]:
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Call):
            called = _name(node.func)
            reader = (
                called in ENV_HELPERS
                or called == "os.getenv"
                or (called.endswith(".get") and called.removesuffix(".get").split(".")[-1] == "environ")
            )
            if reader and (name := _literal(node.args)):
                yield name
        elif (
            isinstance(node, ast.Subscript)
            and _name(node.value).split(".")[-1] == "environ"
            and (name := _literal([node.slice]))
        ):
            yield name


def documented_settings() -> set[str]:
    """The variables named in the first column of the configuration page's table."""
    names = set()
    for line in (DOCS / "configuration.md").read_text().splitlines():
        if line.startswith("| `"):
            first_cell = line.split("|")[1]
            names |= set(re.findall(r"`([A-Z][A-Z0-9_]+)`", first_cell))
    return names


def test_every_setting_read_from_the_environment_is_documented():
    read_by_settings = set(environment_reads(SETTINGS))
    # The parse finds the settings' reads at all (a refactor of the helpers would otherwise pass vacuously).
    assert {"DJANGO_SECRET_KEY", "REDIS_URL", "R2D2_MAX_CONTEXT_CHARS", "R2D2_QUOTA_MODELS"} <= read_by_settings
    read_anywhere = {name for path in code_files() for name in environment_reads(path)}
    assert read_by_settings <= read_anywhere
    missing = sorted(read_anywhere - documented_settings())
    assert missing == [], f"read from the environment but not in docs/configuration.md: {missing}"


def test_every_documented_setting_is_read():
    read_anywhere = {name for path in code_files() for name in environment_reads(path)}
    documented = documented_settings()
    assert len(documented) > 50, "the configuration table was not found"
    unread = sorted(documented - read_anywhere)
    assert unread == [], f"in docs/configuration.md but read nowhere in chat/, r2d2site/ or manage.py: {unread}"


def table_keys(page: str) -> set[str]:
    """What the first cells of a page's tables name in backticks: `| \\`name\\` | ... |`."""
    return set(re.findall(r"^\| `([^`]+)` \|", (DOCS / page).read_text(), re.M))


def test_every_error_code_is_in_the_protocol_page():
    codes = {code.value for code in ErrorCode}
    assert len(codes) > 30
    missing = sorted(codes - table_keys("protocol.md"))
    assert missing == [], f"ErrorCode values without a row in docs/protocol.md's error table: {missing}"


def close_codes() -> dict[str, int]:
    """Every module-level `CLOSE_*` or `*_CLOSE_CODE` integer in chat/: the close codes the server sends."""
    found = {}
    for path in code_files():
        for node in ast.parse(path.read_text()).body:
            if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
                continue
            name, value = node.targets[0].id, node.value
            named_as_close_code = name.startswith("CLOSE_") or name.endswith("_CLOSE_CODE")
            if named_as_close_code and isinstance(value, ast.Constant) and isinstance(value.value, int):
                found[f"{path.relative_to(ROOT)}:{name}"] = value.value
    return found


def test_every_close_code_the_server_sends_is_in_the_protocol_page():
    codes = close_codes()
    # Unauthorized, not reading, too many connections, service restart (drain): all found.
    assert {4401, 4408, 4429, 1012} <= set(codes.values()), codes
    documented = table_keys("protocol.md")
    missing = {where: code for where, code in codes.items() if str(code) not in documented}
    assert missing == {}, f"close codes without a row in docs/protocol.md's close code table: {missing}"


def test_every_action_and_frame_type_is_in_the_protocol_page():
    source = "\n".join(path.read_text() for path in sorted((ROOT / "chat" / "protocol").glob("*.py")))
    actions = set(re.findall(r'"(chatbot_[a-z_]+)"', source))
    frames = set(re.findall(r'encode\(\s*"([a-z_]+)"', source)) | set(re.findall(r'\{"type": "([a-z_]+)"', source))
    assert {"chatbot_session_start", "chatbot_post_message", "chatbot_session_end"} <= actions
    assert {"session_start", "processing_start", "message", "message_delta", "processing_end", "error"} <= frames
    documented = table_keys("protocol.md")
    assert sorted(actions - documented) == [], "actions without a row in docs/protocol.md"
    assert sorted(frames - documented) == [], "frame types without a row in docs/protocol.md"


def test_the_readme_is_short_and_maps_every_page():
    """A newcomer reads the README whole: at most about 150 lines, and its map links every docs page
    (mkdocs.yml's nav must list them too: `mkdocs build --strict` fails on a page left out)."""
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    unmapped = sorted(page.name for page in DOCS.glob("*.md") if f"](docs/{page.name})" not in readme)
    assert unmapped == [], f"docs pages the README's map does not link: {unmapped}"
    assert "](bench/README.md)" in readme
