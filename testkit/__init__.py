"""What tests/ and bench/ share: the fake model servers, the live-server harness, clients and links.

Each module holds one thing: `fake_llm` and `fake_bedrock` (local model servers speaking the real
wire), `server` (a Daphne process on a free port and its environment), `redis` (a private
redis-server), `client` (a protocol client checking each frame against `contract`), `raw_websocket`
and `slow_link` (a socket that reads slowly, a link that carries few bytes), `drops` (a proxy that
drops a connection at a chosen post), `nginx` (the bundle's proxy on a free port) and `wait`
(waiting for a condition instead of sleeping). Production never imports it (.ebignore leaves it out).
"""
