"""One error root for forge; the CLI turns each error into a one-line message and an exit code.

Exit codes are part of the public contract (see the README's table) and are the same for
every command.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNKNOWN_COMMAND = 3
EXIT_DUPLICATE = 4
EXIT_NOT_FOUND = 5
EXIT_UNAVAILABLE = 6
EXIT_JOB_FAILED = 7
EXIT_THRESHOLD = 8
EXIT_ISOLATED = 9  # an isolated run found its lock held: it did not run (forge.limits.isolation)
EXIT_MEMORY = 12


class ForgeError(Exception):
    """Root of every error forge raises on purpose. ``str(err)`` is the one-line message."""

    exit_code = EXIT_ERROR

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint

    @property
    def message(self) -> str:
        """The one-line message (the first argument)."""
        return str(self.args[0]) if self.args else ""


class UsageError(ForgeError, ValueError):
    """Malformed input: a bad option, duration, queue name or config value."""

    exit_code = EXIT_USAGE


class ConfigError(ForgeError, ValueError):
    """forge.toml or a FORGE_* variable holds something forge cannot use."""

    exit_code = EXIT_USAGE


class DiscoveryError(ForgeError):
    """A command module cannot be loaded, or two commands share a name."""


class UnknownCommand(ForgeError, LookupError):
    """No registered command has this name."""

    exit_code = EXIT_UNKNOWN_COMMAND

    def __init__(self, name: str, suggestions: list[str] | None = None, notes: list[str] | None = None) -> None:
        self.name = name
        self.suggestions = suggestions or []
        msg = f'Command "{name}" is not defined.'
        hint = None
        if self.suggestions:
            quoted = ", ".join(f'"{s}"' for s in self.suggestions)
            msg += f" Did you mean {quoted}?"
        else:
            hint = "Run `forge list` to see the registered commands."
        if notes:  # why it may be missing: a command file that failed to import, no forge.toml
            hint = " ".join([*notes, *([hint] if hint else [])])
        super().__init__(msg, hint=hint)


class QueueError(ForgeError):
    """Root of the queue errors (the guide's ``QueueError``)."""


class InvalidCommand(QueueError, UsageError):
    """A queued command that must not be dispatched: bad name, arguments, attempts, delay..."""

    exit_code = EXIT_USAGE


class UnknownQueuedCommand(InvalidCommand, UnknownCommand):
    """The queued command names no registered command."""

    exit_code = EXIT_UNKNOWN_COMMAND

    def __init__(self, name: str, suggestions: list[str] | None = None, notes: list[str] | None = None) -> None:
        UnknownCommand.__init__(self, name, suggestions, notes)


class QueueUnavailable(QueueError):
    """The queue's storage cannot be reached or used (Redis down, directory unusable)."""

    exit_code = EXIT_UNAVAILABLE


class DispatchFailed(QueueError):
    """Storing a job failed (full disk, permissions, I/O error); nothing partial was left."""


class DuplicateJob(QueueError):
    """A job with this unique key is already pending, delayed or running."""

    exit_code = EXIT_DUPLICATE

    def __init__(self, key: str, job_id: str) -> None:
        self.key = key
        self.job_id = job_id
        super().__init__(
            f'A job with unique key "{key}" is already queued or running (job {job_id}).',
            hint="Wait for it to finish, or dispatch without --unique-key.",
        )


class RetryBlocked(DuplicateJob):
    """A failed unique job left failed by a retry: another live job holds its unique key.

    ``failed_id`` is the job left failed; ``job_id`` (as for ``DuplicateJob``) the live job
    holding ``key``."""

    def __init__(self, failed_id: str, key: str, job_id: str) -> None:
        self.failed_id = failed_id
        self.key = key
        self.job_id = job_id
        QueueError.__init__(
            self,
            f'Job {failed_id} not retried: its unique key "{key}" is held by live job {job_id}.',
            hint=f"Retry it once job {job_id} has finished, or drop it with `forge queue:forget {failed_id}`.",
        )


class JobNotFound(QueueError, LookupError):
    """No job has this id."""

    exit_code = EXIT_NOT_FOUND

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"Job {job_id} not found.", hint="Run `forge queue:list` to see the jobs.")


class AmbiguousJobId(QueueError, UsageError):
    """A job id prefix that matches more than one job."""

    exit_code = EXIT_USAGE

    def __init__(self, prefix: str, matches: list[str]) -> None:
        self.prefix = prefix
        self.matches = matches
        shown = ", ".join(matches[:10]) + (" and more" if len(matches) > 10 else "")
        super().__init__(f"Job id prefix {prefix!r} is ambiguous: it matches {shown}.",
                         hint="Give more characters of the id.")


class CorruptJob(QueueError, ValueError):
    """A stored job record that does not parse or does not validate."""
