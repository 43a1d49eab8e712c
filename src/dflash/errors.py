"""User errors: a bad phase file, data file or result directory. The CLI prints them as one line and exits 2;
anything else is a bug and keeps its traceback."""


class UserError(Exception):
    """Something the user can fix; the message names the file (and field or line)."""


class ConfigError(UserError, ValueError):
    """A phase file is missing or invalid; the message names the file and the field path."""


class DataError(UserError, ValueError):
    """A data file (training data, benchmark prompts, a checkpoint's metadata) is unreadable or malformed; the
    message names the file and line."""


class InputError(UserError, RuntimeError):
    """An upstream stage directory is missing, incomplete or changed since its stage wrote it."""
