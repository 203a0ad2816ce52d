"""Errors a user can act on, and the classes of per-input errors.

Two kinds of failure never mix:
- the input's fault (corrupt, unsupported, too large, empty, vanished): the input becomes an error row with a reason
  and an error class, and the run goes on;
- the environment's fault (permission denied, storage failing after retries, a device fault, a path the worker
  nodes cannot see): retried where it runs; if it persists, nothing of its work unit is committed and the run
  stops with one line that says what to fix (`EnvironmentFailure`). A rerun resumes.
"""

from __future__ import annotations

import re


class UserError(Exception):
    """A problem with the user's input, options or environment; the message names it and the fix."""


class EnvironmentFailure(UserError):
    """The run stopped for a reason that is not any input's fault; its message says what to fix. Exit status 1."""


class InputError(ValueError):
    """One input cannot be featurised (it becomes an error row); `error_class` says why in one word."""

    def __init__(self, reason: str, error_class: str):
        super().__init__(reason)
        self.error_class = error_class


# Error rows: the input's fault. Committed, counted by class in the run record, retried by --retry-errors.
INPUT_ERROR_CLASSES = ("corrupt", "unsupported", "too_large", "empty", "missing", "model", "non_finite")
# Never committed: the run stops (after the retries where the failure happened) and says what to fix.
ENVIRONMENT_ERROR_CLASSES = ("permission", "storage", "device")


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message, cut to `limit` characters, without the memory addresses some
    libraries print (PIL's "cannot identify image file <_io.BytesIO object at 0x7f...>"): a reason people read."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    text = re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "(the file's bytes)", text)
    return re.sub(r"<([\w.]+) object at 0x[0-9a-fA-F]+>", r"<\1>", text)[:limit]


def read_error_class(exc: BaseException) -> str:
    """The class of an exception raised while reading an input's bytes (after the storage layer's retries): a
    decoding ValueError is the input's; anything the storage client raises that is not about this one object
    (I/O errors, endpoints down, its own exception types) is the storage's."""
    if isinstance(exc, InputError):
        return exc.error_class
    if isinstance(exc, ValueError):
        return "corrupt"
    if isinstance(exc, FileNotFoundError):
        return "missing"
    if isinstance(exc, IsADirectoryError):
        return "unsupported"
    if isinstance(exc, PermissionError):
        return "permission"
    return "storage"


def is_device_error(exc: BaseException) -> bool:
    """A fault of the accelerator (not of the image): CUDA/driver errors other than running out of memory."""
    text = f"{type(exc).__name__}: {exc}"
    if "out of memory" in text.lower():
        return False
    return (
        type(exc).__name__ in ("AcceleratorError", "CudaError")
        or "CUDA error" in text
        or "CUBLAS_STATUS" in text
        or "cuDNN error" in text
        or "device-side assert" in text
    )
