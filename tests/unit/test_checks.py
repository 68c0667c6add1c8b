"""`manage.py check --deploy` on R2D2's own settings: r2d2.W002 when no list limits the models."""

from __future__ import annotations

import io

from django.core.management import call_command


def deploy_check() -> str:
    out, err = io.StringIO(), io.StringIO()
    call_command("check", deploy=True, stdout=out, stderr=err)
    return out.getvalue() + err.getvalue()


def test_warns_when_any_model_may_be_asked_for(settings):
    settings.R2D2_ALLOWED_MODELS = []
    settings.R2D2_QUOTA_MODELS = []
    report = deploy_check()
    assert "r2d2.W002" in report
    assert "R2D2_ALLOWED_MODELS" in report and "bedrock/" in report


def test_either_list_is_enough(settings):
    settings.R2D2_ALLOWED_MODELS, settings.R2D2_QUOTA_MODELS = ["gpt-4o-mini"], []
    assert "r2d2.W002" not in deploy_check()
    settings.R2D2_ALLOWED_MODELS, settings.R2D2_QUOTA_MODELS = [], ["gpt-4o-mini", "amazon.nova-lite-v1:0"]
    assert "r2d2.W002" not in deploy_check()
