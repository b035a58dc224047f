"""The one family of errors meant for users. The CLI, the server and the Python API catch `UserError` and show
its message alone: one line naming the bad value and what is allowed, never a traceback."""


class UserError(ValueError):
    """A mistake the user can mend (a setting, a file, a request, a store); the message is one line."""


class ConfigError(UserError):
    """A bad configuration value or command-line flag."""
