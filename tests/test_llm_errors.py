"""chat/llm: every way of failing to connect is `upstream_unavailable` (retried), whatever the transport
calls it; a real timeout stays `upstream_timeout`."""

import errno
import socket

import httpx2 as httpx
import openai
import pytest

from chat.errors import ErrorCode
from chat.llm.openai_compat import _map_error

REQUEST = httpx.Request("POST", "http://model.example/v1/chat/completions")


def failure(kind: type[openai.APIConnectionError], cause: BaseException) -> openai.APIConnectionError:
    """What the aiohttp transport raises: the OS error is in the cause chain, under a transport error."""
    transport_error = httpx.ConnectError(str(cause))
    transport_error.__cause__ = cause
    exc = kind(request=REQUEST)
    exc.__cause__ = transport_error
    return exc


@pytest.mark.parametrize(
    "cause",
    [
        socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
        OSError(errno.ENETUNREACH, "Network is unreachable"),
        OSError(errno.EHOSTUNREACH, "No route to host"),
        ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"),
        ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
    ],
)
@pytest.mark.parametrize("kind", [openai.APIConnectionError, openai.APITimeoutError])
def test_connection_failures_are_unavailable_and_retried(kind, cause):
    error = _map_error(failure(kind, cause), mid_stream=False)
    assert error.code == ErrorCode.UPSTREAM_UNAVAILABLE and error.retryable


def test_a_real_timeout_is_a_timeout_and_not_retried():
    error = _map_error(failure(openai.APITimeoutError, TimeoutError()), mid_stream=False)
    assert error.code == ErrorCode.UPSTREAM_TIMEOUT and not error.retryable


def test_a_connection_lost_mid_stream_is_an_interrupted_answer():
    error = _map_error(failure(openai.APIConnectionError, ConnectionResetError()), mid_stream=True)
    assert error.code == ErrorCode.UPSTREAM_STREAM_INTERRUPTED and not error.retryable
