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
    """An update (`ended_at=...`) or SQL (`SET ended_at`) anywhere else would end sessions behind the holder's back."""
    writes = re.compile(r"update\([^)]*\bended_at\s*=[^=]|SET ended_at\b")
    writers = {name for name, text in sources().items() if writes.search(text)}
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


# Layers that only point down (issue 25) -----------------------------------------------

#: Bottom to top; a package imports only packages on lower rows (a lower layer talks up through a Protocol or a
#: callback it is handed: sessions.socket.SessionSocket, turns.conversation.Reservation, auth.sessions_withdrawn).
#: Top-level modules: `models` (the schema) and `channel_layer` (plumbing sessions and edge use) at the bottom;
#: `checks` and `apps` above everything, since Django's start-up wires the layers together there.
#: On the top level, `web` (pages and their renderers) sits below `admin`, which shows transcripts with them.
LAYERS: list[set[str]] = [
    {"protocol", "models", "ops", "channel_layer"},
    {"llm"},
    {"turns", "accounts"},
    {"sessions", "edge"},
    {"websocket", "web", "management"},
    {"admin"},
    {"checks"},
    {"apps"},
]


def _package(module: str) -> str:
    return module.split(".")[1] if module.count(".") >= 1 else module


def _level(package: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if package in names)


def test_every_chat_package_has_a_layer():
    packages = {_package(module) for module in imports()} - {"chat"}
    assert packages <= set().union(*LAYERS), packages - set().union(*LAYERS)


def test_layers_only_point_down():
    """An import from a package to one on its own level or above (even lazy, even for typing) is an arrow up:
    a change at the top would then reach the bottom, and the package split would be a list of names."""
    upward = sorted(
        f"{module} -> {imported}"
        for module, imported_set in imports().items()
        for imported in imported_set
        if _package(module) not in ("chat", _package(imported))
        and _package(imported) != "chat"
        and _level(_package(imported)) >= _level(_package(module))
    )
    assert upward == [], "\n".join(upward)


# One of each (issue 25) -------------------------------------------------------------


def test_no_chat_module_is_over_500_lines():
    long = {name: text.count("\n") for name, text in sources().items() if text.count("\n") > 500}
    assert long == {}


def test_only_the_store_makes_a_redis_client():
    """One client per loop, one timeout policy, one key rule: chat/ops/store.py (the channel layer has its own)."""
    makers = {name for name, text in sources().items() if re.search(r"\bRedis\(|\.from_url\(", text)}
    assert makers == {"chat/ops/store.py", "chat/channel_layer.py"}


def test_one_class_named_conversation():
    homes = {name for name, text in sources().items() if re.search(r"^class Conversation\b", text, re.M)}
    assert homes == {"chat/turns/conversation.py"}


def test_one_cost_function():
    """Quotas, /metrics and the admin price tokens with chat/ops/prices.py's nano_dollars, so they agree."""
    pricing = {name for name, text in sources().items() if re.search(r"/ 1_000_000\b|\* price\[", text)}
    assert pricing <= {"chat/ops/prices.py"}
