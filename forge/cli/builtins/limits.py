"""``queue:limits``: every limit's slots, holders and tokens."""

from __future__ import annotations

from typing import Any

from forge import output
from forge.cli.builtins._shared import JSON_VERSION, Connection, Json, fmt_time, iso_time, manager


def limits(json_out: Json = False, connection: Connection = None) -> None:
    """Show each limit ([limits] in forge.toml, and keys given per dispatch): slots in use and who
    holds them, a rate's tokens and when the next one frees."""
    from forge.limits.inspect import limits_state
    from forge.limits.spec import load

    m = manager(connection)
    rows = limits_state(m.backend, load(m.settings))
    if json_out:
        output.print_json({"version": JSON_VERSION, "limits": [_json(r) for r in rows]})
        return
    if not rows:
        output.info("No limits configured or used. Add [limits.queues.NAME] or [limits.keys.\"KEY\"] to forge.toml,"
                    " or dispatch with --concurrency-key, --rate-key or --isolated.")
        return
    table = []
    for r in rows:
        if r["kind"] == "rate" and "tokens" in r:
            use = f"{r['tokens']}/{r['burst']} tokens" if r.get("rate") else ""
            limit = r.get("rate") or "per job"
            who = "" if not r.get("rate") or r["tokens"] else f"next token {fmt_time(r['next_token_at'])}"
        else:
            limit = str(r["max"]) if r.get("max") else "per job"
            use = f"{r['held']} held"
            who = ", ".join(_holder(h) for h in r["holders"])
        table.append([r["kind"], r["name"], limit, use, who, r["source"]])
    output.table(["limit", "scope", "max / rate", "in use", "holders / next", "from"], table, title="Limits")


def _holder(h: dict[str, Any]) -> str:
    if h.get("job"):
        return f"job {h['job'][:8]}"
    return f"run pid {h.get('pid', '?')}@{h.get('host', '?')}"


def _json(r: dict[str, Any]) -> dict[str, Any]:
    d = dict(r)
    if "next_token_at" in d:
        d["next_token_at"] = iso_time(d["next_token_at"])
    if "holders" in d:
        d["holders"] = [{**h, **{k: iso_time(h[k]) for k in ("since", "lease_until") if isinstance(h.get(k), int | float)}}
                        for h in d["holders"]]
    return d
