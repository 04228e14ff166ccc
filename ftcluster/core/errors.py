"""User-facing errors: the CLI prints their message (one line per problem) and exits 2."""

import errno
import os
import re

# Errors of the machine rather than the program (full disk, read-only or failing storage): one line, exit 2.
IO_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


def storage_errno(exc: BaseException) -> int | None:
    """The errno of a storage failure: an OSError's, or the "(os error N)" that Rust libraries such as
    safetensors put in their messages; None for anything else."""
    if isinstance(exc, OSError):
        number = exc.errno
    else:
        found = re.search(r"\(os error (\d+)\)", str(exc))
        number = int(found.group(1)) if found else None
    return number if number in IO_ERRNOS else None


def naming(exc: BaseException, path: object) -> BaseException:
    """A storage failure that does not say where (safetensors' "(os error 28)", a bare ENOSPC) as an OSError
    naming ``path``, what was being written; any other exception as it is."""
    number = storage_errno(exc)
    if number is None or getattr(exc, "filename", None):
        return exc
    return OSError(number, os.strerror(number), str(path))


def io_error_line(exc: BaseException) -> str:
    """One line for a storage error, naming the file where known."""
    number = storage_errno(exc)
    filename = getattr(exc, "filename", None)
    where = f"{filename}: " if filename else ""
    return f"{where}{os.strerror(number) if number else exc}; free space or fix the storage, then resume with --resume"


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
