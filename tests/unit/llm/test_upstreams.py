"""chat/llm/upstreams.py and router.py: R2D2_UPSTREAMS and R2D2_FALLBACKS as settings, and where a model goes."""

import subprocess
import sys

import pytest

from chat.llm import router, upstreams
from testkit.server import ROOT, server_env


def test_upstreams_parse_with_their_keys_in_each_form():
    environ = {
        "R2D2_UPSTREAM_AZURE_API_KEY": " az-key ",
        "R2D2_UPSTREAM_VLLM_2_API_KEY_SECRET_ID": "arn:aws:secretsmanager:eu-west-1:1:secret:v",
        "R2D2_UPSTREAM_LOCAL_API_KEY_PARAMETER": "/r2d2/local",
    }
    found = upstreams.parse(
        "azure=https://x.openai.azure.com/openai/v1, vllm-2=http://10.0.3.7:8000/v1,local=http://[::1]:11434/v1",
        environ,
    )
    assert found == {
        "azure": upstreams.Upstream("azure", "https://x.openai.azure.com/openai/v1", api_key="az-key"),
        "vllm-2": upstreams.Upstream(
            "vllm-2", "http://10.0.3.7:8000/v1", api_key_secret_id="arn:aws:secretsmanager:eu-west-1:1:secret:v"
        ),
        "local": upstreams.Upstream("local", "http://[::1]:11434/v1", api_key_parameter="/r2d2/local"),
    }
    assert found["vllm-2"].key_setting == "R2D2_UPSTREAM_VLLM_2_API_KEY"


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("azure", "'azure' is not 'name=base_url'"),
        ("a=http://a/v1,b=", "'b=' is not"),
        ("a=http://a/v1,a=http://b/v1", "the name 'a' is used twice"),
        ("bedrock=http://b/v1", "'bedrock=http://b/v1' uses the name 'bedrock'"),
        ("OpenAI=http://b/v1", "uses the name 'OpenAI'"),
        ("a=not a url", "'a=not a url' has a base URL that does not parse"),
        ("a=ftp://host/v1", "'a=ftp://host/v1' has a base URL"),
        ("a=http://host:port/v1", "'a=http://host:port/v1' has a base URL"),
        ("a/b=http://host/v1", "'a/b=http://host/v1' has a name"),
    ],
)
def test_a_bad_upstream_entry_is_named(text, named):
    with pytest.raises(upstreams.ConfigError) as bad:
        upstreams.parse(text, {})
    assert named in str(bad.value)


def test_fallbacks_parse_and_a_bad_entry_is_named():
    assert upstreams.parse_fallbacks(
        "gpt-4o-mini=azure/gpt-4o-mini|bedrock/amazon.nova-lite-v1:0; gpt-4o=azure/gpt-4o"
    ) == {
        "gpt-4o-mini": ("azure/gpt-4o-mini", "bedrock/amazon.nova-lite-v1:0"),
        "gpt-4o": ("azure/gpt-4o",),
    }
    for text, named in [
        ("a", "'a' is not"),
        ("a=b|", "'a=b|' is not"),
        ("a=b;a=c", "'a' is given alternates twice"),
        ("a=b|a", "'a=b|a' names a model twice"),
    ]:
        with pytest.raises(upstreams.ConfigError) as bad:
            upstreams.parse_fallbacks(text)
        assert named in str(bad.value), text


@pytest.mark.parametrize(
    ("variable", "value", "line"),
    [
        ("R2D2_UPSTREAMS", "azure=https://x/v1,azure=https://y/v1", "R2D2_UPSTREAMS: the name 'azure' is used twice."),
        ("R2D2_FALLBACKS", "gpt-4o-mini", "R2D2_FALLBACKS: 'gpt-4o-mini' is not 'model=alternate|alternate...'."),
    ],
)
def test_a_bad_entry_stops_start_up_in_one_line_naming_it(variable, value, line):
    env = server_env(None, **{variable: value})
    result = subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == f"django.core.exceptions.ImproperlyConfigured: {line}"


def test_models_go_to_their_upstream_by_prefix(settings):
    settings.R2D2_UPSTREAMS = upstreams.parse("azure=https://x/v1", {})
    settings.OPENAI_API_KEY = "sk-test"
    settings.R2D2_BEDROCK_MODELS = ["anthropic.claude-v1:0"]
    assert [(p.name, sent) for p, sent in map(router.route, ["azure/gpt-4o", "gpt-4o", "meta-llama/Llama-3-8B"])] == [
        ("azure", "gpt-4o"),
        ("openai", "gpt-4o"),
        ("openai", "meta-llama/Llama-3-8B"),  # not an upstream's name: sent whole, as before
    ]
    assert router.route("bedrock/amazon.nova-lite-v1:0")[0].name == "bedrock"
    assert router.route("anthropic.claude-v1:0")[0].name == "bedrock"
    settings.OPENAI_API_KEY = ""
    assert router.route("gpt-4o")[0].name == "offline"
    assert router.route("azure/gpt-4o")[0].name == "azure"  # configured: never the offline responder


def test_a_chain_leaves_out_what_the_principal_may_not_use_and_the_offline_responder(settings):
    settings.R2D2_UPSTREAMS = upstreams.parse("azure=https://x/v1", {})
    settings.R2D2_FALLBACKS = upstreams.parse_fallbacks("azure/gpt-4o=gpt-4o|bedrock/nova|azure/gpt-4o-mini")
    settings.OPENAI_API_KEY = ""  # gpt-4o would be the offline responder
    assert router.chain("azure/gpt-4o") == ["azure/gpt-4o", "bedrock/nova", "azure/gpt-4o-mini"]
    refuse_bedrock = {"bedrock/nova": "not in the key's models"}.get
    assert router.chain("azure/gpt-4o", refuse_bedrock) == ["azure/gpt-4o", "azure/gpt-4o-mini"]
    assert router.chain("gpt-4o") == ["gpt-4o"]  # no chain of its own


@pytest.mark.parametrize("key", ["sk-alt", ""], ids=["own key", "no key"])
async def test_an_upstream_gets_its_own_key_or_none_and_the_model_without_its_prefix(fake_llm, settings, key):
    from chat.llm.base import Deadlines, Reply

    settings.R2D2_UPSTREAMS = upstreams.parse(f"alt={fake_llm.url}", {"R2D2_UPSTREAM_ALT_API_KEY": key})
    settings.OPENAI_ORG_ID = "org-1"  # OpenAI's own headers go to the default upstream only
    provider, sent = router.route("alt/gpt-4o")
    try:
        reply = Reply()
        chunks = provider.generate(
            model=sent,
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            reply=reply,
            deadlines=Deadlines(first=10, idle=10, whole=10),
        )
        assert "".join([c async for c in chunks]) == "Echo: hi"
    finally:
        await provider.close()
    [request] = fake_llm.requests
    assert request.body["model"] == "gpt-4o"
    assert request.headers.get("Authorization") == (f"Bearer {key}" if key else None)
    assert "OpenAI-Organization" not in request.headers


async def test_the_default_upstream_sends_openais_organization_and_project(fake_llm, settings):
    from chat.llm.openai_compat import headers, upstream

    settings.OPENAI_ORG_ID, settings.OPENAI_PROJECT_ID = "org-1", "proj-1"
    sent = headers(upstream())
    assert (sent["OpenAI-Organization"], sent["OpenAI-Project"]) == ("org-1", "proj-1")
    assert sent["Authorization"].startswith("Bearer sk-test")
