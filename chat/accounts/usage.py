"""What each principal spent: messages and tokens per model per day, cost estimates, charts as inline SVG.

Read from the messages table (a user message counts one message; a reply carries
the tokens the model reported), so the admin needs nothing but the database; the
quota counters (chat/accounts/quotas.py) add today's live figures against each limit.
The chart is drawn by the server as SVG: no script, no CDN.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, timedelta

from django.conf import settings
from django.db.models import Count, Q, Sum
from django.db.models.functions import TruncDate
from django.utils import timezone
from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe

from chat.models import ChatMessage, Role
from chat.ops.prices import dollars, nano_dollars
from chat.ops.prices import parse as parse_prices

DAYS = 30
PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#9c755f"]


def prices() -> dict[str, tuple[float, float]]:
    """R2D2_MODEL_PRICES as {model: (input, output) per million tokens} (checked at start-up: prices.py)."""
    return parse_prices(settings.R2D2_MODEL_PRICES)


@dataclass
class ModelUsage:
    model: str
    messages: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    by_day: dict[date, int] = field(default_factory=dict)  # tokens
    messages_by_day: dict[date, int] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def nano(self) -> int | None:
        """What these tokens cost in nano-dollars, by the one cost function quotas and /metrics use; None: unpriced."""
        price = prices().get(self.model)
        if price is None:
            return None
        return nano_dollars(price, self.prompt_tokens, self.completion_tokens)

    @property
    def cost(self) -> float | None:
        nano = self.nano
        return None if nano is None else dollars(nano)


@dataclass
class PrincipalUsage:
    kind: str  # "user", "key" or "anonymous"
    id: int | None
    models: dict[str, ModelUsage] = field(default_factory=dict)

    @property
    def cost(self) -> float | None:
        costs = [m.nano for m in self.models.values() if m.nano is not None]
        return dollars(sum(costs)) if costs else None


def last_days(today: date | None = None) -> list[date]:
    today = today or timezone.now().date()
    return [today - timedelta(days=DAYS - 1 - n) for n in range(DAYS)]


def by_principal(today: date | None = None) -> dict[tuple[str, int | None], PrincipalUsage]:
    """Usage of the last 30 days, per principal and per model (one GROUP BY over the messages)."""
    days = last_days(today)
    rows = (
        ChatMessage.objects.filter(created_at__date__gte=days[0])
        .values("session__user_id", "session__api_key_id", "session__model", day=TruncDate("created_at"))
        .annotate(
            messages=Count("id", filter=Q(role=Role.USER)),
            prompt=Sum("prompt_tokens"),
            completion=Sum("completion_tokens"),
        )
        .order_by()
    )
    found: dict[tuple[str, int | None], PrincipalUsage] = {}
    for row in rows:
        if row["session__api_key_id"] is not None:
            who = ("key", row["session__api_key_id"])
        elif row["session__user_id"] is not None:
            who = ("user", row["session__user_id"])
        else:
            who = ("anonymous", None)
        principal = found.setdefault(who, PrincipalUsage(*who))
        model = principal.models.setdefault(row["session__model"], ModelUsage(row["session__model"]))
        tokens = (row["prompt"] or 0) + (row["completion"] or 0)
        model.messages += row["messages"]
        model.prompt_tokens += row["prompt"] or 0
        model.completion_tokens += row["completion"] or 0
        model.by_day[row["day"]] = model.by_day.get(row["day"], 0) + tokens
        model.messages_by_day[row["day"]] = model.messages_by_day.get(row["day"], 0) + row["messages"]
    return found


def chart(usage: PrincipalUsage, days: list[date], *, messages: bool = False) -> SafeString:
    """Stacked bars, one per day, one colour per model: tokens (or messages) of the last 30 days."""
    width, height, left, bottom = 640, 150, 48, 20
    bar = (width - left) / len(days)
    totals: dict[date, int] = defaultdict(int)
    for m in usage.models.values():
        for day, value in (m.messages_by_day if messages else m.by_day).items():
            totals[day] += value
    top = max(totals.values(), default=0) or 1
    scale = (height - bottom - 10) / top
    unit = "messages" if messages else "tokens"
    parts = [
        f'<svg class="usage-chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{unit} per day, last {len(days)} days">',
        f'<text x="{left - 6}" y="14" text-anchor="end" font-size="11">{top}</text>',
        f'<text x="{left - 6}" y="{height - bottom}" text-anchor="end" font-size="11">0</text>',
        f'<line x1="{left}" y1="{height - bottom}" x2="{width}" y2="{height - bottom}" stroke="#999"/>',
    ]
    for n, day in enumerate(days):
        x, base = left + n * bar, height - bottom
        for colour, m in zip(PALETTE * 4, usage.models.values(), strict=False):
            value = (m.messages_by_day if messages else m.by_day).get(day, 0)
            if not value:
                continue
            h = value * scale
            base -= h
            parts.append(
                f'<rect x="{x + 1:.1f}" y="{base:.1f}" width="{bar - 2:.1f}" height="{h:.1f}" fill="{colour}">'
                f"<title>{day:%Y-%m-%d} {escape(m.model)}: {value} {unit}</title></rect>"
            )
        if n % 7 == 0 or n == len(days) - 1:
            parts.append(f'<text x="{x}" y="{height - 5}" font-size="10">{day:%m-%d}</text>')
    parts.append("</svg>")
    # Safe: every value above is a number, a date or escaped.
    return mark_safe("".join(parts))


def legend(usage: PrincipalUsage) -> list[tuple[str, str]]:
    return [(colour, m.model) for colour, m in zip(PALETTE * 4, usage.models.values(), strict=False)]
