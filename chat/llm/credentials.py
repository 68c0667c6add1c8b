"""An upstream's API key from AWS Secrets Manager or SSM Parameter Store, read on first use and kept.

On Elastic Beanstalk the key then never sits in the environment's configuration
(where `eb printenv` and the console show it): set `OPENAI_API_KEY_SECRET_ID`
(a secret's name or ARN) or `OPENAI_API_KEY_PARAMETER` (a SecureString
parameter's name), or for another upstream `R2D2_UPSTREAM_<NAME>_API_KEY_SECRET_ID` /
`..._PARAMETER` (chat/llm/upstreams.py), and give the instance profile `secretsmanager:GetSecretValue`
or `ssm:GetParameter` on it. boto3 finds credentials and `AWS_ENDPOINT_URL`
the usual way; the region comes from `AWS_REGION` / `AWS_DEFAULT_REGION` or,
for an ARN, from the ARN itself (boto3 does not ask the instance for it).

A failure stops start-up with a message naming what to fix, never the secret.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

from django.core.exceptions import ImproperlyConfigured

#: Keys tried, in order, when a Secrets Manager secret holds JSON key/value pairs.
JSON_KEYS = ("OPENAI_API_KEY", "openai_api_key", "api_key")


def _region(environ: Mapping[str, str], identifier: str) -> str | None:
    region = environ.get("AWS_REGION", "").strip() or environ.get("AWS_DEFAULT_REGION", "").strip()
    if region:
        return region
    parts = identifier.split(":")
    if identifier.startswith("arn:") and len(parts) > 3 and parts[3]:
        return parts[3]
    return None


def _from_secret_string(value: str, setting: str = "OPENAI_API_KEY") -> str:
    """The bare key, or JSON such as {"OPENAI_API_KEY": "sk-..."} (the console's key/value form)."""
    stripped = value.strip()
    if stripped.startswith("{"):
        try:
            data = json.loads(stripped)
        except ValueError:
            return stripped
        for key in JSON_KEYS:
            if isinstance(data.get(key), str) and data[key].strip():
                return data[key].strip()
        raise ImproperlyConfigured(
            f"The secret in {setting}_SECRET_ID is JSON without any of the keys {', '.join(JSON_KEYS)}."
        )
    return stripped


def openai_api_key_from_aws(environ: Mapping[str, str] = os.environ) -> str:
    """The default upstream's key from Secrets Manager or Parameter Store, or "" when neither is configured."""
    return api_key_from_aws(
        secret_id=environ.get("OPENAI_API_KEY_SECRET_ID", "").strip(),
        parameter=environ.get("OPENAI_API_KEY_PARAMETER", "").strip(),
        setting="OPENAI_API_KEY",
        environ=environ,
    )


def api_key_from_aws(*, secret_id: str, parameter: str, setting: str, environ: Mapping[str, str] = os.environ) -> str:
    """The key in the secret `secret_id` or the parameter `parameter` (`setting`: the variable they
    stand for, named in messages), or "" when neither is given."""
    if not secret_id and not parameter:
        return ""
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    key_name = setting
    setting, identifier, service = (
        (f"{setting}_SECRET_ID", secret_id, "secretsmanager")
        if secret_id
        else (f"{setting}_PARAMETER", parameter, "ssm")
    )
    region = _region(environ, identifier)
    if region is None:
        raise ImproperlyConfigured(
            f"{setting} is set but no AWS region is: set AWS_REGION (e.g. `eb setenv AWS_REGION=us-east-1`) "
            "or give the secret's full ARN."
        )
    try:
        client = boto3.session.Session().client(service, region_name=region)
        if secret_id:
            key = _from_secret_string(client.get_secret_value(SecretId=secret_id).get("SecretString") or "", key_name)
        else:
            key = client.get_parameter(Name=parameter, WithDecryption=True)["Parameter"]["Value"].strip()
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "ClientError")
        raise ImproperlyConfigured(
            f"Could not read {key_name} from {service} ({setting}={identifier!r}, region {region}): {code}. "
            "Check the name and that the instance profile may read it "
            "(secretsmanager:GetSecretValue / ssm:GetParameter, and kms:Decrypt for a customer-managed key)."
        ) from None
    except BotoCoreError as exc:
        raise ImproperlyConfigured(
            f"Could not read {key_name} from {service} ({setting}={identifier!r}, region {region}): "
            f"{type(exc).__name__}. Check network access to AWS and the instance's credentials."
        ) from None
    if not key:
        raise ImproperlyConfigured(f"{setting}={identifier!r} holds an empty value.")
    return key
