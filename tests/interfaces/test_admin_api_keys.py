"""The operator's API keys and usage pages: create (key shown once, stored nowhere), revoke, the usage chart."""

from __future__ import annotations

import re

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.urls import reverse

from chat.accounts import auth
from chat.models import ApiKey, ChatMessage, ChatSession, Role

pytestmark = pytest.mark.django_db


@pytest.fixture
def operator(client):
    user = get_user_model().objects.create_superuser("op", password="pw-for-tests-1")
    client.force_login(user)
    return client


def spend(api_key: ApiKey | None = None, user=None, model: str = "gpt-4o-mini", tokens: tuple[int, int] = (100, 50)):
    session = ChatSession.objects.create(model=model, api_key=api_key, user=user)
    ChatMessage.objects.create(session=session, role=Role.USER, content="hi")
    ChatMessage.objects.create(
        session=session, role=Role.ASSISTANT, content="hello", prompt_tokens=tokens[0], completion_tokens=tokens[1]
    )


def test_creating_a_key_shows_it_once_and_stores_only_its_hash(operator):
    response = operator.post(
        reverse("admin:chat_apikey_add"),
        {"name": "postman", "user": "", "messages_per_minute": "5", "allowed_models": "gpt-4o-mini"},
    )
    assert response.status_code == 200, response.content[:500]
    key = re.search(rb'value="(r2d2_[^"]+)"', response.content).group(1).decode()
    row = auth.find_key(key)
    assert row.name == "postman" and row.messages_per_minute == 5 and row.model_list == ["gpt-4o-mini"]
    assert "no-store" in response["Cache-Control"]
    listing = operator.get(reverse("admin:chat_apikey_changelist")).content.decode()
    assert row.prefix in listing and key not in listing
    assert key not in operator.get(reverse("admin:chat_apikey_change", args=[row.id])).content.decode()


def test_revoking_from_the_list(operator):
    row, _ = auth.create_api_key("ci")
    response = operator.post(
        reverse("admin:chat_apikey_changelist"), {"action": "revoke_selected", "_selected_action": [row.id]}
    )
    assert response.status_code == 302
    row.refresh_from_db()
    assert not row.is_active


def test_usage_chart_per_principal_and_model_with_cost(operator, settings):
    settings.R2D2_MODEL_PRICES = "gpt-4o-mini=0.15:0.60"
    key, _ = auth.create_api_key("ci", tokens_per_day=1000)
    spend(key)
    spend(key, model="gpt-4o", tokens=(10, 10))
    spend(user=get_user_model().objects.create_user("ada"))
    page = operator.get(reverse("admin:chat_usage")).content.decode()
    assert "API key ci" in page and "user ada" in page
    assert page.count("<svg") >= 4 and "<rect" in page and "<script" not in page.split("<svg", 1)[1].split("</svg>")[0]
    assert "gpt-4o-mini: 150 tokens" in page
    assert "$0.000045" in page  # 100 x 0.15 + 50 x 0.60 per million
    assert ">1000<" in page  # today's tokens against the key's quota


def test_usage_page_is_for_staff_only(client):
    user = get_user_model().objects.create_user("visitor", password="pw-for-tests-1")
    client.force_login(user)
    assert client.get(reverse("admin:chat_usage")).status_code == 302  # to the admin's login
    user.is_staff = True
    user.save()
    assert client.get(reverse("admin:chat_usage")).status_code == 403  # staff, but may not view keys
    user.user_permissions.add(Permission.objects.get(codename="view_apikey"))
    assert client.get(reverse("admin:chat_usage")).status_code == 200
