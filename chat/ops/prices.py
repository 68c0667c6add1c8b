"""Model prices (R2D2_MODEL_PRICES): what a turn costs, in dollars.

The format is `model=input:output,...`, dollars per million tokens; `model=price`
prices input and output alike; a price of 0 makes a model free. Model names may
contain `:` (Bedrock's `...-v1:0`), since the name ends at the first `=`.

Imported by r2d2site/settings.py before Django is set up (a malformed entry stops
start-up, naming it), so this module imports nothing of Django or of chat.
"""

from __future__ import annotations

import functools
import math

#: Money is counted in whole nano-dollars (1e-9 $): integers that Redis adds atomically and
#: exactly, fine enough for a single token of the cheapest model (0.15 $/M = 150 n$).
NANO = 1_000_000_000


class PriceError(ValueError):
    """An entry of R2D2_MODEL_PRICES that does not parse; the message names it."""


@functools.cache
def parse(text: str) -> dict[str, tuple[float, float]]:
    """{model: (input, output) dollars per million tokens}; PriceError names the first bad entry."""
    found: dict[str, tuple[float, float]] = {}
    for item in text.split(","):
        entry = item.strip()
        if not entry:
            continue
        model, equals, pair = entry.partition("=")
        model = model.strip()
        given, colon, taken = pair.partition(":")
        if not equals or not model:
            raise PriceError(f"R2D2_MODEL_PRICES: {entry!r} is not 'model=input:output' (dollars per million tokens).")
        try:
            prices = (float(given), float(taken) if colon else float(given))
        except ValueError:
            raise PriceError(
                f"R2D2_MODEL_PRICES: {entry!r} has a price that is not a number (dollars per million tokens)."
            ) from None
        if not all(math.isfinite(p) and p >= 0 for p in prices):
            raise PriceError(f"R2D2_MODEL_PRICES: {entry!r} has a price that is negative or not finite.")
        if model in found:
            raise PriceError(f"R2D2_MODEL_PRICES: {model!r} is priced twice.")
        found[model] = prices
    return found


def nano_dollars(price: tuple[float, float], prompt_tokens: int, completion_tokens: int) -> int:
    """What so many tokens cost at `price` ($ per million in, out), rounded up to a nano-dollar."""
    # $ per million tokens = 1,000 n$ per token.
    return math.ceil(prompt_tokens * price[0] * 1000 + completion_tokens * price[1] * 1000)


def dollars(nano: int) -> float:
    return round(nano / NANO, 6)
