"""chat/llm: every way of failing to connect is `upstream_unavailable` (retried), whatever aiohttp
calls it; a real timeout stays `upstream_timeout`; a failure after the answer began is an
interrupted answer."""

import errno
import socket

import aiohttp
import pytest
from aiohttp.client_reqrep import ConnectionKey

from chat.llm.openai_compat import _map_error
from chat.protocol.errors import ErrorCode

KEY = ConnectionKey("model.example", 443, True, True, None, None, None, None)

CAUSES = [
    socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
    OSError(errno.ENETUNREACH, "Network is unreachable"),
    OSError(errno.EHOSTUNREACH, "No route to host"),
    ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"),
    ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
]


def connect_timeout(cause: BaseException) -> aiohttp.ConnectionTimeoutError:
    """aiohttp's connect timeout, with what the operating system said underneath."""
    exc = aiohttp.ConnectionTimeoutError("Connection timeout to host http://model.example")
    exc.__cause__ = cause
    return exc


@pytest.mark.parametrize("cause", CAUSES)
def test_connection_failures_are_unavailable_and_retried(cause):
    for exc in (aiohttp.ClientConnectorError(KEY, cause), connect_timeout(cause)):
        error = _map_error(exc, mid_stream=False)
        assert error.code == ErrorCode.UPSTREAM_UNAVAILABLE and error.retryable, exc


def test_a_server_that_hangs_up_before_answering_is_unavailable_and_retried():
    error = _map_error(aiohttp.ServerDisconnectedError(), mid_stream=False)
    assert error.code == ErrorCode.UPSTREAM_UNAVAILABLE and error.retryable


@pytest.mark.parametrize("exc", [aiohttp.ConnectionTimeoutError(), aiohttp.SocketTimeoutError()])
def test_a_real_timeout_is_a_timeout_and_not_retried(exc):
    error = _map_error(exc, mid_stream=False)
    assert error.code == ErrorCode.UPSTREAM_TIMEOUT and not error.retryable


@pytest.mark.parametrize(
    "exc",
    [
        aiohttp.ServerDisconnectedError(),
        aiohttp.ClientPayloadError("Response payload is not completed"),
        aiohttp.SocketTimeoutError(),
        aiohttp.ClientOSError(errno.ECONNRESET, "Connection reset by peer"),
    ],
)
def test_a_failure_mid_stream_is_an_interrupted_answer(exc):
    error = _map_error(exc, mid_stream=True)
    assert error.code == ErrorCode.UPSTREAM_STREAM_INTERRUPTED and not error.retryable
