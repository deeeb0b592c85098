"""forge's built-in commands, one module per group; the table naming them is
``forge.registry.builtins.BUILTINS`` (re-exported here)."""

from __future__ import annotations

from forge.registry.builtins import BUILTINS

__all__ = ["BUILTINS"]
