"""The one family of errors meant for users. The CLI, the server and the Python API catch `UserError` and show
its message alone: one line naming the bad value and what is allowed, never a traceback."""


class UserError(ValueError):
    """A mistake the user can mend (a setting, a file, a request, a store); the message is one line."""


class ConfigError(UserError):
    """A bad configuration value or command-line flag."""


def load_reason(err: Exception) -> str:
    """The first informative line of a loading error (torch's start with a header line ending in ':'), for the one
    line a user sees."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        lines = lines[1:]
    return (lines[0] if lines else type(err).__name__)[:300]
