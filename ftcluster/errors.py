"""User-facing errors: the CLI prints their message (one line per problem) and exits 2."""


def first_line(exc: BaseException) -> str:
    """An exception's first line (at most 200 characters), for one-line error messages."""
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


class FtError(Exception):
    """A problem the user can fix (bad spec, missing file, bad data). Printed without a traceback."""


class SpecError(FtError):
    """The job spec (or a tune space) is invalid; the message lists every problem, one per line."""


class DataError(FtError):
    """A data file is missing, unparseable, or has bad rows while ``on_bad_row: fail``."""


class ModelError(FtError):
    """A model path or alias cannot be resolved or loaded."""
