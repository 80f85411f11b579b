"""Prices per GPU-hour, on-demand and spot, from a price file or the shipped defaults.

A price file (YAML or JSON) maps a GPU to its prices::

    a10g: {on_demand: 1.006, spot: 0.45, source: "us-east-1, 2026-06"}

Shipped on-demand prices are AWS us-east-1 Linux list prices of the 1-GPU instance (or the
8-GPU instance divided by 8); spot prices move by the hour and by zone, so the shipped ones are
a flat 35 % of on-demand, only for a first estimate: give your own with ``--prices``.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from sdfleet.errors import ConfigError, cannot_read, validation_errors

SPOT_FRACTION = 0.35


class GpuPrice(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    on_demand: float = Field(gt=0)
    """Dollars per GPU-hour."""
    spot: float | None = Field(None, gt=0)
    """Dollars per GPU-hour; default ``SPOT_FRACTION`` of on-demand."""
    source: str = ""

    @property
    def spot_price(self) -> float:
        return self.spot if self.spot is not None else self.on_demand * SPOT_FRACTION


def _d(on_demand: float, source: str) -> GpuPrice:
    return GpuPrice(on_demand=on_demand, source=source)


DEFAULT_PRICES: dict[str, GpuPrice] = {
    "a10g": _d(1.006, "g5.xlarge on-demand, us-east-1"),
    "l4": _d(0.8048, "g6.xlarge on-demand, us-east-1"),
    "t4": _d(0.526, "g4dn.xlarge on-demand, us-east-1"),
    "v100": _d(3.06, "p3.2xlarge on-demand, us-east-1"),
    "a100": _d(32.7726 / 8, "p4d.24xlarge on-demand / 8, us-east-1"),
    "h100": _d(4.916, "p5.48xlarge EC2 Capacity Block effective rate per GPU, us-east-1"),
    "h200": _d(5.408, "p5e/p5en EC2 Capacity Block effective rate per GPU, us-east-2"),
}


_PRICES = TypeAdapter(dict[str, GpuPrice])


def load_prices(path: Path | None) -> dict[str, GpuPrice]:
    """The shipped prices, updated by the file's entries. Raises ``ConfigError`` on a bad file."""
    prices = dict(DEFAULT_PRICES)
    if path is None:
        return prices
    try:
        text = path.read_text()
        raw = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise cannot_read("price file", path, e) from e
    if not isinstance(raw, dict):
        raise ConfigError(f"price file {path}: a mapping of GPU → {{on_demand, spot}} is expected")
    try:
        prices.update(_PRICES.validate_python({str(k): v for k, v in raw.items()}))
    except ValidationError as e:
        raise ConfigError(f"price file {path}: {validation_errors(e)}") from e
    return prices


def price_for(prices: dict[str, GpuPrice], gpu: str) -> GpuPrice:
    try:
        return prices[gpu]
    except KeyError:
        raise ConfigError(f"no price for GPU {gpu!r}: add it to the price file (--prices)") from None
