"""The static table of built-in commands: name -> ("module:function", description, hidden).

Built-ins are listed without importing them; a built-in's module is imported only to run it.
"""

from __future__ import annotations

BUILTINS: dict[str, tuple[str, str, bool]] = {
    "list": ("forge.builtins.core:list_", "List the registered commands", False),
    "help": ("forge.builtins.core:help_", "Show the help of a command", False),
    "init": ("forge.builtins.core:init", "Create forge.toml and a commands/ folder here", False),
    "make:command": ("forge.builtins.core:make_command", "Create a new command file", False),
    "config:show": ("forge.builtins.core:config_show", "Show the effective settings and their sources", False),
    "queue:dispatch": ("forge.builtins.dispatch:dispatch", "Push a command onto a queue", False),
    "queue:work": ("forge.builtins.work:work", "Process jobs from the queues", False),
    "queue:list": ("forge.builtins.inspect_cmds:list_jobs", "List queues and their jobs", False),
    "queue:show": ("forge.builtins.inspect_cmds:show", "Show everything about one job", False),
    "queue:log": ("forge.builtins.inspect_cmds:log", "Print or follow a job's captured output", False),
    "queue:failed": ("forge.builtins.inspect_cmds:failed", "List the failed jobs", False),
    "queue:monitor": ("forge.builtins.inspect_cmds:monitor", "Show queue sizes; alert above a threshold", False),
    "queue:retry": ("forge.builtins.manage:retry", "Retry failed jobs", False),
    "queue:forget": ("forge.builtins.manage:forget", "Delete a failed job", False),
    "queue:flush": ("forge.builtins.manage:flush", "Delete all (or old) failed jobs", False),
    "queue:prune-failed": ("forge.builtins.manage:prune_failed", "Delete failed jobs older than --hours", False),
    "queue:prune-done": ("forge.builtins.manage:prune_done", "Delete finished jobs kept for inspection", False),
    "queue:clear": ("forge.builtins.manage:clear", "Delete the pending and delayed jobs of a queue", False),
    "queue:pause": ("forge.builtins.manage:pause", "Stop workers claiming from a queue", False),
    "queue:resume": ("forge.builtins.manage:resume", "Let workers claim from a paused queue again", False),
    "queue:forget-queue": ("forge.builtins.manage:forget_queue", "Remove an empty queue (a typo'd or retired name)", False),
    "queue:cancel": ("forge.builtins.manage:cancel", "Cancel waiting (or, with --running, running) jobs", False),
    "queue:limits": ("forge.builtins.limits_cmd:limits", "Show the limits: slots in use, holders, rate tokens", False),
    "queue:stats": ("forge.builtins.stats_cmds:stats", "Throughput, failure rate, runtime and wait percentiles", False),
    "queue:metrics": ("forge.builtins.stats_cmds:metrics", "Print the queues' metrics for Prometheus", False),
    "queue:workers": ("forge.builtins.inspect_cmds:workers", "List the live workers of the connection", False),
    "queue:restart": ("forge.builtins.manage:restart", "Make every worker exit after its current job", False),
    "events:list": ("forge.builtins.events:list_", "List the events forge raises and the project's listeners", False),
    "schedule:run": ("forge.builtins.schedule:run", "Dispatch the scheduled commands that are due (from cron)", False),
    "schedule:work": ("forge.builtins.schedule:work", "Run the schedule in the foreground, waking at each tick", False),
    "schedule:list": ("forge.builtins.schedule:list_", "List the schedule: next runs, last tick and its job", False),
    "schedule:test": ("forge.builtins.schedule:test", "Dispatch one run of a schedule entry now", False),
    "schedule:pause": ("forge.builtins.schedule:pause", "Stop dispatching a schedule entry", False),
    "schedule:resume": ("forge.builtins.schedule:resume", "Dispatch a paused schedule entry again", False),
    "dashboard": ("forge.builtins.dashboard:dashboard", "Serve a live web dashboard of the queues and jobs", False),
}
