"""Errors that reach the user as one clear line, never as a traceback.

The CLI catches :class:`SlurmtuneError` and prints ``str(error)``; anything else
is a bug and keeps its traceback.
"""


class SlurmtuneError(Exception):
    """An error the user can fix; its message says what was wrong and what to do."""

    exit_code = 1


class UsageError(SlurmtuneError):
    """The command line or a manifest was wrong (exit status 2)."""

    exit_code = 2


class ConfigError(UsageError):
    """A manifest or override did not match the schema; lists every problem at once."""

    def __init__(self, problems: list[str], source: str = "manifest"):
        self.problems = problems
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s):\n{lines}")


class DataError(SlurmtuneError):
    """Input data was invalid: the message names file, line, field and what was expected."""

    def __init__(self, path, line: int | None, message: str, field: str | None = None):
        self.path, self.line, self.field, self.reason = str(path), line, field, message
        super().__init__(format_location(path, line, field, message))


def format_location(path, line: int | None, field: str | None, message: str) -> str:
    """``file:line: field: message`` — the one format every data problem is printed in."""
    where = f"{path}:{line}" if line is not None else f"{path}"
    return f"{where}: {field}: {message}" if field else f"{where}: {message}"
