"""What the drivers keep for their machines to share (engine layers, a pool's copies of images), pruned."""

from __future__ import annotations

from machine import drivers
from machine.drivers.base import Pruned
from machine.store import Store


def prune_cache(store: Store, everything: bool = False, dry_run: bool = False) -> list[Pruned]:
    """Remove, driver by driver, what no machine uses and new machines would not (with `everything`, what they
    would too); what was removed (with `dry_run`, what would be)."""
    return [pruned for name in drivers.names() for pruned in drivers.get(name).prune_cache(store, everything, dry_run)]
