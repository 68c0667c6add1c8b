"""OPENAI_API_KEY from AWS Secrets Manager / SSM Parameter Store, over real HTTP to moto's standalone
server (a local AWS endpoint): boto3 is not patched, it finds the endpoint through AWS_ENDPOINT_URL."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import uuid
from collections.abc import Iterator

import boto3
import pytest
from django.core.exceptions import ImproperlyConfigured

from chat.llm.credentials import openai_api_key_from_aws
from testkit.client import ProtocolClient
from testkit.server import free_port, wait_for_port

REGION = "eu-west-1"


@pytest.fixture(scope="module")
def aws_endpoint(tmp_path_factory) -> Iterator[str]:
    """`python -m moto.server` in its own process, on a free port."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")  # noqa: SIM115 (closed below)
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        wait_for_port(port, process, timeout=30)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)
        log.close()


@pytest.fixture
def aws_env(aws_endpoint, monkeypatch) -> dict[str, str]:
    """What an instance would have (credentials, region), plus the local endpoint; also set in this
    process's environment because boto3 reads it from there."""
    env = {
        "AWS_ENDPOINT_URL": aws_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": REGION,
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_DEFAULT_REGION", "AWS_PROFILE", "OPENAI_API_KEY_SECRET_ID", "OPENAI_API_KEY_PARAMETER"):
        monkeypatch.delenv(name, raising=False)
    return env


def aws(service: str, endpoint: str):
    return boto3.client(
        service,
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def new_key() -> str:
    return f"sk-r2d2-{secrets.token_hex(16)}"


def test_key_from_a_secrets_manager_secret(aws_env, monkeypatch):
    plain, in_json = new_key(), new_key()
    client = aws("secretsmanager", aws_env["AWS_ENDPOINT_URL"])
    plain_id = f"r2d2/openai-{uuid.uuid4().hex[:8]}"
    client.create_secret(Name=plain_id, SecretString=plain + "\n")
    json_arn = client.create_secret(
        Name=f"r2d2/openai-json-{uuid.uuid4().hex[:8]}", SecretString=json.dumps({"OPENAI_API_KEY": in_json})
    )["ARN"]

    monkeypatch.setenv("OPENAI_API_KEY_SECRET_ID", plain_id)
    assert openai_api_key_from_aws() == plain

    # A full ARN carries its region: no AWS_REGION needed.
    monkeypatch.delenv("AWS_REGION")
    monkeypatch.setenv("OPENAI_API_KEY_SECRET_ID", json_arn)
    assert openai_api_key_from_aws() == in_json


def test_key_from_an_ssm_secure_string_parameter(aws_env, monkeypatch):
    key = new_key()
    name = f"/r2d2/openai-api-key-{uuid.uuid4().hex[:8]}"
    aws("ssm", aws_env["AWS_ENDPOINT_URL"]).put_parameter(Name=name, Value=key, Type="SecureString")
    monkeypatch.setenv("OPENAI_API_KEY_PARAMETER", name)
    assert openai_api_key_from_aws() == key


def test_unreadable_secrets_stop_start_up_with_a_clear_message(aws_env, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY_SECRET_ID", "r2d2/does-not-exist")
    with pytest.raises(ImproperlyConfigured, match=r"ResourceNotFoundException.*instance profile"):
        openai_api_key_from_aws()

    monkeypatch.delenv("OPENAI_API_KEY_SECRET_ID")
    monkeypatch.setenv("OPENAI_API_KEY_PARAMETER", "/r2d2/missing")
    with pytest.raises(ImproperlyConfigured, match="ParameterNotFound"):
        openai_api_key_from_aws()

    monkeypatch.delenv("AWS_REGION")
    with pytest.raises(ImproperlyConfigured, match="no AWS region"):
        openai_api_key_from_aws()


@pytest.mark.django_db(transaction=True)
async def test_live_server_with_only_the_secret_id_uses_the_key(daphne_factory, fake_llm, aws_env, tmp_path):
    """A Daphne whose environment has the secret's id but no OPENAI_API_KEY answers through the model,
    sending the key from Secrets Manager (read on first use, not at import); the key appears in no log line.
    A wrong id makes the first turn fail as `upstream_auth_failed`, and the log says what to fix."""
    key = new_key()
    secret_id = f"r2d2/openai-{uuid.uuid4().hex[:8]}"
    aws("secretsmanager", aws_env["AWS_ENDPOINT_URL"]).create_secret(Name=secret_id, SecretString=key)

    server = daphne_factory(OPENAI_API_KEY="", OPENAI_API_KEY_SECRET_ID=secret_id, **aws_env)
    client = await ProtocolClient.connect(server.url)
    session_id = await client.start_session()
    frames = await client.post(session_id, "who pays for this?")
    await client.close()
    assert {"type": "message", "data": "Echo: who pays for this?"} in frames
    assert fake_llm.requests[-1].headers["Authorization"] == f"Bearer {key}"
    assert key not in server.log()

    broken = daphne_factory(OPENAI_API_KEY="", OPENAI_API_KEY_SECRET_ID="r2d2/nope", **aws_env)
    client = await ProtocolClient.connect(broken.url)
    session_id = await client.start_session()
    frames = await client.post(session_id, "anyone?")
    await client.close()
    assert [f["type"] for f in frames] == ["processing_start", "error", "processing_end"]
    assert frames[1]["data"]["code"] == "upstream_auth_failed"
    assert "Could not read OPENAI_API_KEY from secretsmanager" in broken.log()
