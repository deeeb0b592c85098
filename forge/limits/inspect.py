"""Why a job waits, and the state of every limit (``queue:list``, ``queue:limits``)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from forge.job import JobInfo, State
from forge.limits.spec import LimitsConfig, Need, job_limits

KINDS = {"p": "parallel", "pr": "rate", "c": "concurrency", "r": "rate", "i": "isolation"}


def split_scope(scope: str) -> tuple[str, str]:
    """``"c:tenant:42"`` -> ("concurrency", "tenant:42")."""
    prefix, _, name = scope.partition(":")
    return KINDS.get(prefix, prefix), name


@dataclass
class Probe:
    """Reads holds from a backend once per scope (a listing asks about many jobs)."""

    backend: Any
    now: float = field(default_factory=time.time)
    _holders: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    _tats: dict[str, float | None] = field(default_factory=dict)

    def holders(self, scope: str) -> list[dict[str, Any]]:
        """The runs holding slots of ``scope`` (the backend's ``slot_holders``), read once per
        probe."""
        if scope not in self._holders:
            self._holders[scope] = list(self.backend.slot_holders(scope))
        return self._holders[scope]

    def tat(self, scope: str) -> float | None:
        """The rate state (theoretical arrival time, Unix seconds) of ``scope``, or None if it
        has none; read once per probe."""
        if scope not in self._tats:
            self._tats[scope] = self.backend.rate_state(scope)
        return self._tats[scope]

    def block(self, need: Need) -> str | None:
        """Why ``need`` cannot be taken now, or None if it can."""
        kind, name = split_scope(need.scope)
        if need.kind == "slot":
            held = len(self.holders(need.scope))
            if held < need.max:
                return None
            if kind == "isolation":
                return f"isolation {name}"
            return f"{kind} {name} ({held}/{need.max})"
        assert need.rate is not None
        tat = self.tat(need.scope)
        if tat is None:
            return None
        allowed = tat - (need.rate.burst - 1) * need.rate.interval
        if allowed <= self.now:
            return None
        return f"rate {name} until {datetime.fromtimestamp(allowed):%H:%M:%S}"


def waiting_reasons(backend: Any, cfg: LimitsConfig, jobs: Iterable[JobInfo]) -> dict[str, str]:
    """``{job id: "blocked by ..."}`` for the due pending jobs a limit holds back now."""
    if not hasattr(backend, "slot_holders"):
        return {}
    probe = Probe(backend)
    out: dict[str, str] = {}
    for info in jobs:
        if info.state != State.PENDING or info.job.available_at > probe.now:
            continue
        own = job_limits(info.job.metadata)
        if own is None and info.job.queue not in cfg.queues:
            continue
        for need in cfg.needs(info.job.queue, own):
            why = probe.block(need)
            if why is not None:
                out[info.id] = f"blocked by {why}"
                break
    return out


def limits_state(backend: Any, cfg: LimitsConfig) -> list[dict[str, Any]]:
    """Every configured limit and every scope the store has seen: slots in use and their
    holders, a rate's tokens and when the next one frees."""
    probe = Probe(backend)
    scopes: dict[str, dict[str, Any]] = {}
    for q, ql in sorted(cfg.queues.items()):
        if ql.parallel is not None:
            scopes[f"p:{q}"] = {"max": ql.parallel, "source": "forge.toml"}
        if ql.rate is not None:
            scopes[f"pr:{q}"] = {"rate": ql.rate, "source": "forge.toml"}
    for k, kl in sorted(cfg.keys.items()):
        if "*" in k:
            continue
        if kl.concurrency is not None:
            scopes[f"c:{k}"] = {"max": kl.concurrency, "source": "forge.toml"}
        if kl.rate is not None:
            scopes[f"r:{k}"] = {"rate": kl.rate, "source": "forge.toml"}
    for s in backend.limit_scopes() if hasattr(backend, "limit_scopes") else []:
        if s in scopes:
            continue
        kind, name = split_scope(s)
        entry: dict[str, Any] = {"source": "per job"}
        if kind == "isolation":
            entry["max"] = 1
        elif s.startswith(("c:", "r:")):
            found = cfg.key(name)
            if found is not None and s.startswith("c:") and found.concurrency is not None:
                entry = {"max": found.concurrency, "source": "forge.toml"}
            elif found is not None and s.startswith("r:") and found.rate is not None:
                entry = {"rate": found.rate, "source": "forge.toml"}
        elif s.startswith(("p:", "pr:")):
            continue  # a queue limit no longer configured
        scopes[s] = entry
    out = []
    for s, entry in scopes.items():
        kind, name = split_scope(s)
        row: dict[str, Any] = {"scope": s, "kind": kind, "name": name, "source": entry["source"]}
        if s.startswith(("pr:", "r:")):
            rate = entry.get("rate")
            tat = probe.tat(s)
            row["rate"] = str(rate) if rate else None
            if rate is not None:
                debt = max((tat or 0.0) - probe.now, 0.0)
                row["burst"] = rate.burst
                row["tokens"] = max(rate.burst - math.ceil(debt / rate.interval - 1e-9), 0)
                allowed = (tat or 0.0) - (rate.burst - 1) * rate.interval
                row["next_token_at"] = max(allowed, probe.now) if row["tokens"] == 0 else probe.now
            else:
                row["burst"] = row["tokens"] = row["next_token_at"] = None
        else:
            holders = probe.holders(s)
            row["max"] = entry.get("max")
            row["held"] = len(holders)
            row["holders"] = holders
        out.append(row)
    return out
