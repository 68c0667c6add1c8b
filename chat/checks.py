"""System checks for R2D2's own settings (`manage.py check --deploy`): r2d2.W001 auth, r2d2.W002 models."""

from __future__ import annotations

from django.conf import settings
from django.core.checks import Tags, Warning, register


@register(Tags.security, deploy=True)
def auth_required_in_production(app_configs, **kwargs) -> list[Warning]:
    """With debug off and auth off, anyone who reaches the server spends the operator's model budget."""
    if settings.DEBUG or settings.R2D2_REQUIRE_AUTH:
        return []
    return [
        Warning(
            "R2D2_REQUIRE_AUTH is off with DEBUG off: anyone who can reach this server can spend its model budget.",
            hint="Unset R2D2_REQUIRE_AUTH (it defaults on when DEBUG is off), or set it to 1, and give clients "
            "API keys (manage.py create_api_key) or accounts.",
            id="r2d2.W001",
        )
    ]


@register(Tags.security, deploy=True)
def models_limited_in_production(app_configs, **kwargs) -> list[Warning]:
    """With no list of models, a client may name any model (any `bedrock/<id>` too), at any price."""
    if settings.R2D2_ALLOWED_MODELS or settings.R2D2_QUOTA_MODELS:
        return []
    return [
        Warning(
            "Neither R2D2_ALLOWED_MODELS nor R2D2_QUOTA_MODELS is set: a client may ask for any model, "
            "including any bedrock/<model id> the instance role can call, whatever it costs.",
            hint="Set R2D2_ALLOWED_MODELS (every connection) or R2D2_QUOTA_MODELS (principals) to the models "
            "clients may use, e.g. R2D2_ALLOWED_MODELS=gpt-4o-mini,gpt-4o.",
            id="r2d2.W002",
        )
    ]
