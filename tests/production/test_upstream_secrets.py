"""A named upstream's key from AWS Secrets Manager / SSM (R2D2_UPSTREAM_<NAME>_API_KEY_SECRET_ID / _PARAMETER),
over real HTTP to moto's standalone server, on a live Daphne: read on first use, never logged."""

from __future__ import annotations

import uuid

import pytest

from testkit.client import ProtocolClient
from tests.e2e.test_failover import ALTERNATE, alt, alt_server, chain_env, primary  # noqa: F401 (fixtures)
from tests.production.test_aws_secrets import aws, aws_endpoint, aws_env, new_key  # noqa: F401 (fixtures)

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.mark.parametrize("form", ["SECRET_ID", "PARAMETER"])
async def test_an_upstreams_key_comes_from_aws_and_is_nowhere_else(daphne_factory, primary, alt, aws_env, form):  # noqa: F811
    key = new_key()
    name = f"/r2d2/alt-{uuid.uuid4().hex[:8]}"
    if form == "SECRET_ID":
        aws("secretsmanager", aws_env["AWS_ENDPOINT_URL"]).create_secret(Name=name, SecretString=key)
    else:
        ssm = aws("ssm", aws_env["AWS_ENDPOINT_URL"])
        ssm.put_parameter(Name=name, Value=key, Type="SecureString")
    env = chain_env(alt, **aws_env) | {f"R2D2_UPSTREAM_ALT_API_KEY_{form}": name}
    env.pop("R2D2_UPSTREAM_ALT_API_KEY")
    server = daphne_factory(**env)
    client = await ProtocolClient.connect(server.url)
    session_id = await client.start_session(gpt_model=ALTERNATE)
    frames = await client.post(session_id, "hello")
    await client.close()
    assert frames[-2] == {"type": "message", "data": "Echo: hello"}
    assert alt.requests[-1].headers["Authorization"] == f"Bearer {key}"
    assert key not in server.log()
