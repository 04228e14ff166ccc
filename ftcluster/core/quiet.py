"""Keep library chatter out of the user's terminal (in the CLI process and in every worker)."""

from __future__ import annotations

import logging
import os
import re
import warnings


def quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # Ray Train V2 routes print() through its logger as well, which doubles every line.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*gemm_4bit.*")
    # kernels: bitsandbytes' CPU backend looks for a hub kernel and warns that offline it skips a check.
    for name in ("bitsandbytes", "DeepSpeed", "deepspeed", "kernels"):
        logging.getLogger(name).setLevel(logging.ERROR)


def quiet_ray_train_worker() -> None:
    """Ray Train logs every report and checkpoint in full at INFO from each worker; ftcluster prints
    its own progress lines, so keep those at WARNING (errors still show)."""
    from ray.train._internal import storage as tune_storage
    from ray.train.v2._internal.execution import context, storage

    logging.getLogger(context.__file__).setLevel(logging.WARNING)  # Ray names this logger by file path
    for module in (storage, tune_storage):
        logging.getLogger(module.__name__).setLevel(logging.WARNING)


# Ray internals that log a full traceback for a condition their own message calls safe to ignore.
# The autoscaling coordinator's request times out when the CPUs are busy (e.g. while a worker loads a
# model): it retries every 20 s and training goes on, but the traceback reads like a crash.
TRANSIENT_RAY_WARNINGS = ("ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client",)
RAY_PROCESS_SETUP_HOOK = f"{__name__}.quiet_ray_process"


# Ray Train loggers that print a worker's exception with its traceback: the worker's own ("Error in training
# function"), and the controller's failure policy (the worker's traceback again, then its own).
RAY_WORKER_ERROR_LOGGERS = ("ray.train.v2._internal.util", "ray.train.v2._internal.execution.failure_handling.default")
# The exception classes that ftcluster's CLI prints as one line: FtError and its subclasses, and Interrupted
# (a signal). tests/test_collapse.py checks this list against the package's classes.
USER_ERRORS = ("FtError", "SpecError", "DataError", "ModelError", "CollectiveError", "DivergedError", "CollapsedError",
               "Interrupted")
USER_ERROR = re.compile(rf"\bftcluster\.[\w.]+\.({'|'.join(USER_ERRORS)}): ")


class UserErrorsOnce(logging.Filter):
    """Drop Ray's log records of an ftcluster user error: the driver prints it as one line, and these
    would print it again, inside tracebacks (a real crash still shows: its class is not ftcluster's)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += f"\n{record.exc_info[1]}"
        return USER_ERROR.search(text) is None


def quiet_ray_process() -> None:
    """Ray's worker_process_setup_hook for ftcluster's Ray jobs: runs in each of their processes,
    the Train controller's included, before any task or actor code."""
    for name in TRANSIENT_RAY_WARNINGS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for name in RAY_WORKER_ERROR_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(existing, UserErrorsOnce) for existing in logger.filters):
            logger.addFilter(UserErrorsOnce())
