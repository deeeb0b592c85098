"""The static table of forge's built-in commands: name -> ("module:function", description, hidden).

The registry lists built-ins from this table without importing them; a built-in's module (in
``forge.cli.builtins``) is imported only to run it. The table lives here, not in the CLI, so
that the registry never depends on ``forge.cli``.
"""

from __future__ import annotations

BUILTINS: dict[str, tuple[str, str, bool]] = {
    "list": ("forge.cli.builtins.core:list_", "List the registered commands", False),
    "help": ("forge.cli.builtins.core:help_", "Show the help of a command", False),
    "init": ("forge.cli.builtins.core:init", "Create forge.toml and a commands/ folder here", False),
    "make:command": ("forge.cli.builtins.core:make_command", "Create a new command file", False),
    "config:show": ("forge.cli.builtins.core:config_show", "Show the effective settings and their sources", False),
    "queue:dispatch": ("forge.cli.builtins.dispatch:dispatch", "Push a command onto a queue", False),
    "queue:work": ("forge.cli.builtins.work:work", "Process jobs from the queues", False),
    "queue:list": ("forge.cli.builtins.inspect:list_jobs", "List queues and their jobs", False),
    "queue:show": ("forge.cli.builtins.inspect:show", "Show everything about one job", False),
    "queue:log": ("forge.cli.builtins.inspect:log", "Print or follow a job's captured output", False),
    "queue:failed": ("forge.cli.builtins.inspect:failed", "List the failed jobs", False),
    "queue:monitor": ("forge.cli.builtins.inspect:monitor", "Show queue sizes; alert above a threshold", False),
    "queue:retry": ("forge.cli.builtins.manage:retry", "Retry failed jobs", False),
    "queue:forget": ("forge.cli.builtins.manage:forget", "Delete a failed job", False),
    "queue:flush": ("forge.cli.builtins.manage:flush", "Delete all (or old) failed jobs", False),
    "queue:prune-failed": ("forge.cli.builtins.manage:prune_failed", "Delete failed jobs older than --hours", False),
    "queue:prune-done": ("forge.cli.builtins.manage:prune_done", "Delete finished jobs kept for inspection", False),
    "queue:clear": ("forge.cli.builtins.manage:clear", "Delete the pending and delayed jobs of a queue", False),
    "queue:pause": ("forge.cli.builtins.manage:pause", "Stop workers claiming from a queue", False),
    "queue:resume": ("forge.cli.builtins.manage:resume", "Let workers claim from a paused queue again", False),
    "queue:forget-queue": ("forge.cli.builtins.manage:forget_queue", "Remove an empty queue (a typo'd or retired name)", False),
    "queue:cancel": ("forge.cli.builtins.manage:cancel", "Cancel waiting (or, with --running, running) jobs", False),
    "queue:limits": ("forge.cli.builtins.limits:limits", "Show the limits: slots in use, holders, rate tokens", False),
    "queue:stats": ("forge.cli.builtins.stats:stats", "Throughput, failure rate, runtime and wait percentiles", False),
    "queue:metrics": ("forge.cli.builtins.stats:metrics", "Print the queues' metrics for Prometheus", False),
    "queue:workers": ("forge.cli.builtins.inspect:workers", "List the live workers of the connection", False),
    "queue:restart": ("forge.cli.builtins.manage:restart", "Make every worker exit after its current job", False),
    "events:list": ("forge.cli.builtins.events:list_", "List the events forge raises and the project's listeners", False),
    "schedule:run": ("forge.cli.builtins.schedule:run", "Dispatch the scheduled commands that are due (from cron)", False),
    "schedule:work": ("forge.cli.builtins.schedule:work", "Run the schedule in the foreground, waking at each tick", False),
    "schedule:list": ("forge.cli.builtins.schedule:list_", "List the schedule: next runs, last tick and its job", False),
    "schedule:test": ("forge.cli.builtins.schedule:test", "Dispatch one run of a schedule entry now", False),
    "schedule:pause": ("forge.cli.builtins.schedule:pause", "Stop dispatching a schedule entry", False),
    "schedule:resume": ("forge.cli.builtins.schedule:resume", "Dispatch a paused schedule entry again", False),
    "dashboard": ("forge.cli.builtins.dashboard:dashboard", "Serve a live web dashboard of the queues and jobs", False),
}
