"""The user-facing errors of every byolkit command: reported as one `error: ...` line, exit status 2
(trainer.runtime.cli_main for the trainer's commands, serving.server's main for the server)."""


class UsageError(ValueError):
    """A bad command line or setting, reported as one line before any work starts."""


class DataError(ValueError):
    """Data that cannot be used as given (missing, empty, unreadable, unlabelled where labels are needed)."""
