"""The operator's API keys and usage pages: create (key shown once, stored nowhere), revoke, the usage chart."""

from __future__ import annotations

import re
from decimal import Decimal

import pytest
from asgiref.sync import async_to_sync
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.urls import reverse

from chat import llm
from chat.accounts import auth, reservations
from chat.models import ApiKey, ChatMessage, ChatSession, Role, UserLimits

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


def test_a_keys_money_limits_and_output_cap_from_the_admin(operator):
    response = operator.post(
        reverse("admin:chat_apikey_add"),
        {"name": "spender", "user": "", "usd_per_day": "2.50", "usd_per_month": "40", "max_output_tokens": "256"},
    )
    assert response.status_code == 200, response.content[:500]
    row = ApiKey.objects.get(name="spender")
    assert (row.usd_per_day, row.usd_per_month, row.max_output_tokens) == (Decimal("2.5"), Decimal("40"), 256)
    refused = operator.post(reverse("admin:chat_apikey_add"), {"name": "negative", "user": "", "usd_per_day": "-1"})
    assert refused.status_code == 200 and not ApiKey.objects.filter(name="negative").exists()
    assert "Ensure this value is greater than or equal to 0" in refused.content.decode()


def test_a_persons_spending_limits_in_the_admin_apply_when_they_sign_in(operator):
    ada = get_user_model().objects.create_user("ada")
    page = operator.get(reverse("admin:auth_user_change", args=[ada.id])).content.decode()
    assert "spending limits" in page
    form = {
        "username": "ada",
        "is_active": "on",
        "date_joined_0": "2026-12-01",
        "date_joined_1": "10:00:00",
        "chat_limits-TOTAL_FORMS": "1",
        "chat_limits-INITIAL_FORMS": "0",
        "chat_limits-MIN_NUM_FORMS": "0",
        "chat_limits-MAX_NUM_FORMS": "1",
        "chat_limits-0-usd_per_day": "1.25",
        "chat_limits-0-usd_per_month": "",
        "chat_limits-0-user": str(ada.id),
    }
    response = operator.post(reverse("admin:auth_user_change", args=[ada.id]), form)
    assert response.status_code == 302, response.content.decode()[:3000]
    principal = async_to_sync(auth.principal_for_user)(ada)
    assert (principal.limits.usd_per_day, principal.limits.usd_per_month) == (1.25, 0.0)


def test_spend_past_80_percent_of_a_limit_is_marked(operator, settings):
    """The key list, the user list and the usage page mark a principal past 80% of a money limit."""
    settings.R2D2_MODEL_PRICES = "gpt-4o-mini=1000:1000"  # a tenth of a cent a token
    near, _ = auth.create_api_key("near", usd_per_day=Decimal("1"))
    far, _ = auth.create_api_key("far", usd_per_day=Decimal("1"))
    spend(near)  # a recorded turn, so the usage page lists it
    ada = get_user_model().objects.create_user("ada")
    UserLimits.objects.create(user=ada, usd_per_month=Decimal("1"))
    for principal, tokens in (
        (auth.principal_for_key(near), 850),
        (auth.principal_for_key(far), 100),
        (async_to_sync(auth.principal_for_user)(ada), 900),
    ):
        charge(principal, tokens)

    keys = operator.get(reverse("admin:chat_apikey_changelist")).content.decode()
    row_of = {name: keys.split(f">{name}<", 1)[1].split("</tr>", 1)[0] for name in ("near", "far")}
    assert "⚠ $0.8500 of $1.00" in row_of["near"] and "⚠" not in row_of["far"]
    users = operator.get(reverse("admin:auth_user_changelist")).content.decode()
    assert "⚠ $0.9000 of $1.00" in users.split(">ada<", 1)[1].split("</tr>", 1)[0]
    usage_page = operator.get(reverse("admin:chat_usage")).content.decode()
    assert "⚠ $0.850000" in usage_page.split("API key near", 1)[1].split("</section>", 1)[0]


def charge(principal, tokens: int) -> None:
    """A turn of `tokens` prompt tokens, admitted and settled as the server does."""

    async def turn() -> None:
        reservation = await reservations.admit(
            principal, model="gpt-4o-mini", prompt_tokens_estimate=1, max_output_tokens=1
        )
        await reservation.settle(llm.Reply(prompt_tokens=tokens, completion_tokens=0, sent=True), [], "")

    async_to_sync(turn)()
