"""Where ideas live: each has one home, and this keeps it so."""

import ast
import logging
import re
import typing
from pathlib import Path

from chat import protocol
from chat.websocket.consumer import ChatConsumer

CHAT = Path(__file__).resolve().parent.parent / "chat"


def sources() -> dict[str, str]:
    return {
        str(path.relative_to(CHAT.parent)): path.read_text()
        for path in CHAT.rglob("*.py")
        if "migrations" not in path.parts
    }


def test_nothing_imports_openai():
    """The OpenAI-compatible provider builds its URL and headers itself (chat/llm/openai_compat.py): importing
    the `openai` package took 0.4-0.8 s of every process's start."""
    importers = {name for name, text in sources().items() if re.search(r"^\s*(import|from) openai\b", text, re.M)}
    assert importers == set()


def test_only_the_bedrock_provider_creates_a_bedrock_client():
    creators = {name for name, text in sources().items() if "bedrock-runtime" in text}
    assert creators == {"chat/llm/bedrock.py"}


def test_only_the_session_lifecycle_writes_ended_at():
    writers = {name for name, text in sources().items() if re.search(r"ended_at\s*=\s*timezone", text)}
    assert writers == {"chat/sessions/lifecycle.py"}


def test_the_consumer_writes_no_messages():
    consumer = sources()["chat/websocket/consumer.py"]
    assert "chat.turns.messages" not in consumer and "ChatMessage" not in consumer


def test_every_action_has_a_handler():
    """Adding an action is one parser in protocol.py and one entry in ChatConsumer.HANDLERS; forgetting
    the second would answer `unknown_action`, so this catches it before a client does."""
    parsed = {typing.get_type_hints(parser)["return"] for parser in protocol.PARSERS.values()}
    assert parsed == set(ChatConsumer.HANDLERS)


# The house by domain (issue 19) ------------------------------------------------------


def _module_name(path: str) -> str:
    name = path[:-3].replace("/", ".")
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def imports() -> dict[str, set[str]]:
    """Every chat module → the chat modules it imports: at the top, under TYPE_CHECKING or inside a function."""
    modules = {_module_name(path) for path in sources()}
    graph: dict[str, set[str]] = {}
    for path, text in sources().items():
        here = _module_name(path)
        found: set[str] = set()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    # `from chat.sessions import holder` imports the module chat.sessions.holder.
                    child = f"{node.module}.{alias.name}"
                    found.add(child if child in modules else node.module)
        graph[here] = {name for name in found if name in modules and name != here}
    return graph


def test_no_import_cycles():
    """Session life speaks to its socket through a Protocol, principals live in one module: nothing
    imports anything that imports it back, not even under TYPE_CHECKING or inside a function."""
    graph = imports()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for imported in sorted(graph.get(module, ())):
            if state.get(imported) == 1:
                cycles.append([*path[path.index(imported) :], imported])
            elif imported not in state:
                visit(imported, [*path, imported])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_chat_is_a_few_modules_and_packages_named_for_their_domain():
    flat = sorted(path.name for path in CHAT.glob("*.py"))
    assert len(flat) <= 12, flat
    packages = {path.parent.name for path in CHAT.glob("*/__init__.py")}
    assert {"protocol", "websocket", "sessions", "turns", "accounts", "llm", "edge", "web", "ops"} <= packages


def test_session_life_does_not_import_the_consumer():
    graph = imports()
    offenders = {m: i for m, i in graph.items() if m.startswith("chat.sessions") and any("websocket" in x for x in i)}
    assert offenders == {}


def test_principal_and_its_limits_live_in_one_module():
    homes = {name for name, text in sources().items() if re.search(r"^class (Principal|Limits)\b", text, re.M)}
    assert homes == {"chat/accounts/principals.py"}


def test_no_chat_module_imports_the_site_package():
    importers = {name for name, text in sources().items() if re.search(r"^\s*(import|from) r2d2site\b", text, re.M)}
    assert importers == set()


def test_the_consumer_has_no_branch_on_which_kind_of_session_it_holds():
    consumer = sources()["chat/websocket/consumer.py"]
    assert not re.search(r"^\s*(if|elif|while)\b.*resumable", consumer, re.M)
    assert "resume.local" not in consumer and "isinstance(held, Holder)" in consumer  # held here, or elsewhere


#: What every LogRecord already has: an `extra` naming one makes the logging call raise KeyError.
RESERVED = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


def test_no_logging_extra_names_a_logrecord_attribute():
    """A background task whose log call raises dies with it (the heartbeat did, with "process")."""
    offenders = []
    for path, text in {**sources(), **bench_and_site_sources()}.items():
        for node in ast.walk(ast.parse(text)):
            dicts = []
            if isinstance(node, ast.Call):
                dicts += [kw.value for kw in node.keywords if kw.arg == "extra"]
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "extra" for t in node.targets):
                dicts.append(node.value)
            for value in dicts:
                if isinstance(value, ast.Dict):
                    keys = {k.value for k in value.keys if isinstance(k, ast.Constant)}
                    offenders += [f"{path}:{value.lineno} {key}" for key in keys & RESERVED]
    assert offenders == []


def bench_and_site_sources() -> dict[str, str]:
    root = CHAT.parent
    paths = [p for folder in ("r2d2site", "bench") for p in (root / folder).rglob("*.py")]
    return {str(p.relative_to(root)): p.read_text() for p in paths}
