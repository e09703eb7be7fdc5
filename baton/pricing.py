"""LLM usage and cost: what a call used, and what it cost by the user's price table."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from baton.logs import get_logger

log = get_logger("baton.pricing")

USAGE_KEY = "__usage__"
"""A step may return ``{..., "__usage__": {...}}``: stripped from the stored result and
recorded as step stats."""

MILLION = Decimal(1_000_000)


class Usage(BaseModel):
    """The tokens one model call used."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    input_tokens: int = Field(default=0, ge=0)
    output_tokens: int = Field(default=0, ge=0)
    cached_tokens: int = Field(default=0, ge=0)
    """Input tokens read from the provider's cache."""
    cache_write_tokens: int = Field(default=0, ge=0)
    duration_ms: float | None = Field(default=None, ge=0)


class ModelPrice(BaseModel):
    """Prices of one model in currency units per million tokens."""

    model_config = ConfigDict(frozen=True)

    input: Decimal = Field(ge=0)
    output: Decimal = Field(ge=0)
    cached_input: Decimal | None = Field(default=None, ge=0)
    """Defaults to the input price."""
    cache_write: Decimal | None = Field(default=None, ge=0)
    """Defaults to the input price."""


class Pricing(BaseModel):
    """The user's price table: model name → :class:`ModelPrice`."""

    models: dict[str, ModelPrice] = Field(default_factory=dict)

    def cost(self, usage: Usage) -> Decimal | None:
        """Return what ``usage`` cost, or ``None`` (with a warning) for an unpriced model."""
        price = self.models.get(usage.model or "")
        if price is None:
            log.warning("pricing.unknown_model", model=usage.model)
            return None
        cached = price.cached_input if price.cached_input is not None else price.input
        write = price.cache_write if price.cache_write is not None else price.input
        uncached = max(usage.input_tokens - usage.cached_tokens, 0)
        total = (uncached * price.input + usage.cached_tokens * cached
                 + usage.cache_write_tokens * write + usage.output_tokens * price.output)
        return total / MILLION


def split_usage(result: Any) -> tuple[Any, list[Usage]]:
    """Return ``result`` without its reserved usage key, and the usage it carried.

    The key may hold one usage mapping or a list of them.
    """
    if not isinstance(result, dict) or USAGE_KEY not in result:
        return result, []
    rest = {k: v for k, v in result.items() if k != USAGE_KEY}
    raw = result[USAGE_KEY]
    usages: list[Usage] = []
    for item in raw if isinstance(raw, list) else [raw]:
        try:
            usages.append(item if isinstance(item, Usage) else Usage.model_validate(item))
        except ValidationError as exc:
            log.warning("pricing.bad_usage", error=str(exc).splitlines()[0], usage=repr(item))
    return rest, usages
