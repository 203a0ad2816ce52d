"""fsspec access for local disks and object stores: one filesystem per process, retries, atomic writes."""

from __future__ import annotations

import json
import os
import random
import time
import uuid
from collections.abc import Callable
from functools import lru_cache
from typing import Any, TypeVar

import fsspec

from .errors import UserError, first_line

T = TypeVar("T")

_RETRY_ATTEMPTS = 5
_TRANSIENT_WORDS = (
    "timeout",
    "timed out",
    "throttl",
    "slowdown",
    "slow down",
    "503",
    "500",
    "502",
    "504",
    "connection reset",
    "temporarily",
    "too many requests",
    "internal error",
    "serviceunavailable",
    # what s3fs and botocore say once their own retries gave up: a 5xx without a body, SlowDown, a reset connection
    "internal server error",
    "service unavailable",
    "reduce your request rate",
    "could not connect to the endpoint",
    "connection was closed",
)
# Client exception classes (and their bases) that are the network's fault: botocore's ConnectionError family
# (endpoint unreachable, connection reset or closed) and its HTTP client errors, aiohttp's connection errors.
_TRANSIENT_CLASSES = {"ConnectionError", "HTTPClientError", "ClientConnectionError", "ClientPayloadError"}


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def _options_key(options: dict | None) -> str:
    return json.dumps(options or {}, sort_keys=True, default=str)


@lru_cache(maxsize=16)
def _filesystem(protocol: str, options_key: str) -> fsspec.AbstractFileSystem:
    return fsspec.filesystem(protocol, **json.loads(options_key))


def filesystem(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path within it) for a local path or URL; filesystems are cached per process."""
    protocol, path = fsspec.core.split_protocol(url)
    protocol = protocol or "file"
    fs = _filesystem(protocol, _options_key(storage_options if protocol != "file" else {}))
    if protocol == "file":
        path = os.path.abspath(path)
    return fs, fs._strip_protocol(path) if protocol != "file" else path


def check_storage_options(urls, storage_options: dict | None) -> None:
    """Before any work starts: every object store among `urls` accepts `storage_options` (a filesystem that checks
    its options only on first use, like s3fs, is set up now, offline). An option it does not take, or a missing
    filesystem package, is a one-line UserError naming it."""
    protocols = sorted({url.split("://", 1)[0] for url in urls if url and is_remote(url)})
    for name, value in (storage_options or {}).items() if protocols else ():
        if name.endswith("_kwargs") and not isinstance(value, dict):  # client_kwargs, config_kwargs, ...
            raise UserError(f"--storage-options: {name} must be a JSON object of options, not {type(value).__name__}")
    for protocol in protocols:
        try:
            fs = fsspec.filesystem(protocol, skip_instance_cache=True, **(storage_options or {}))
            connect = getattr(fs, "connect", None)
            if callable(connect):
                connect()
        except ImportError as exc:
            raise UserError(
                f"{protocol}:// needs a package that is not installed ({first_line(exc, 200)}); see the "
                "install extras s3, gcs, azure"
            ) from None
        except TypeError as exc:
            raise UserError(
                f"--storage-options: {protocol}:// does not take {unexpected_name(exc)} "
                f"({_masked(first_line(exc, 200), storage_options)})"
            ) from None
        except ValueError as exc:
            raise UserError(
                f"--storage-options for {protocol}://: {_masked(first_line(exc, 200), storage_options)}"
            ) from None
        except Exception as exc:  # set up offline, so the options are at fault: a wrong type, a missing profile...
            raise UserError(
                f"--storage-options for {protocol}:// were refused ({type(exc).__name__}: "
                f"{_masked(first_line(exc, 200), storage_options)})"
            ) from None


_SECRET_PARTS = ("secret", "token", "password", "key", "credential")


def _masked(text: str, storage_options: dict | None) -> str:
    """text without the values of the options that read as credentials (key, secret, token, ... at any depth)."""

    def secrets(options: dict) -> list[str]:
        found = []
        for name, value in options.items():
            if isinstance(value, dict):
                found += secrets(value)
            elif isinstance(value, str) and len(value) >= 4 and any(p in str(name).lower() for p in _SECRET_PARTS):
                found.append(value)
        return found

    for value in sorted(secrets(storage_options or {}), key=len, reverse=True):
        text = text.replace(value, "***")
    return text


def unexpected_name(exc: BaseException) -> str:
    """The option a TypeError says was unexpected ("... got an unexpected keyword argument 'x'"), or 'an option'."""
    import re

    found = re.search(r"unexpected keyword argument '([^']+)'", str(exc))
    return f"the option {found.group(1)!r}" if found else "one of these options"


def join(base: str, *names: str) -> str:
    return "/".join([base.rstrip("/"), *names])


def is_transient(exc: BaseException) -> bool:
    """Whether a storage error may pass if retried: timeouts, throttling, 5xx, lost connections; judged on the error
    and its cause (s3fs raises an OSError whose cause is botocore's error with the S3 error code)."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return False
    seen: BaseException | None = exc
    for _ in range(3):
        if seen is None:
            return False
        if isinstance(seen, (TimeoutError, ConnectionError)):
            return True
        if any(cls.__name__ in _TRANSIENT_CLASSES for cls in type(seen).__mro__):
            return True
        text = f"{type(seen).__name__} {seen}".lower()
        if any(word in text for word in _TRANSIENT_WORDS):
            return True
        seen = seen.__cause__
    return False


def with_retries(fn: Callable[[], T], attempts: int = _RETRY_ATTEMPTS, base_delay_s: float = 0.2) -> T:
    """Run fn, retrying transient storage faults (timeouts, 5xx, throttling) with jittered exponential backoff."""
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:
            if attempt == attempts - 1 or not is_transient(exc):
                raise
            time.sleep(base_delay_s * (2**attempt) * (0.5 + random.random()))
    raise AssertionError("unreachable")


def local_path(uri: str) -> str:
    """A local uri as a path (file:// dropped)."""
    return uri[len("file://") :] if uri.startswith("file://") else uri


def read_bytes(uri: str, storage_options: dict | None = None) -> bytes:
    if not is_remote(uri):
        with open(local_path(uri), "rb") as f:
            return f.read()
    fs, path = filesystem(uri, storage_options)
    return with_retries(lambda: fs.cat_file(path))


def _replace_locally(path: str, fill) -> None:
    """fill(tmp) writes a temp file beside path, which then replaces path in one rename; a failed write, fsync or
    rename (a full disk, say) removes the temp file before the error propagates."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
    try:
        fill(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass  # never created, already renamed, or swept: nothing to clean; the original error matters
        raise


def write_bytes_atomic(url: str, data: bytes, storage_options: dict | None = None) -> None:
    """Write so that readers see the whole file or nothing: temp name + rename locally, one PUT on object stores."""
    fs, path = filesystem(url, storage_options)
    if not is_remote(url):

        def fill(tmp: str) -> None:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())

        _replace_locally(path, fill)
        return
    with_retries(lambda: fs.pipe_file(path, data))


def put_file_atomic(local: str, url: str, storage_options: dict | None = None) -> None:
    """Copy a local file to URL so that readers see the whole file or nothing, streaming (never whole in memory):
    temp name + rename locally; one upload on object stores (a multipart upload appears only once completed)."""
    fs, path = filesystem(url, storage_options)
    if not is_remote(url):
        import shutil

        _replace_locally(path, lambda tmp: shutil.copyfile(local, tmp))
        return
    with_retries(lambda: fs.put_file(local, path))


def remove_tree(url: str, storage_options: dict | None = None) -> None:
    """Remove a folder and what it holds; nothing if it is not there."""
    fs, path = filesystem(url, storage_options)
    try:
        with_retries(lambda: fs.rm(path, recursive=True))
    except FileNotFoundError:
        pass


def exists(url: str, storage_options: dict | None = None) -> bool:
    """Whether the file or object is there now (fsspec's cached listings are dropped first: they may be stale)."""
    fs, path = filesystem(url, storage_options)
    fs.invalidate_cache(path)
    return with_retries(lambda: fs.exists(path))


def read_text(url: str, storage_options: dict | None = None) -> str:
    return read_bytes(url, storage_options).decode("utf-8")


def write_json_atomic(url: str, obj: Any, storage_options: dict | None = None) -> None:
    write_bytes_atomic(
        url, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode("utf-8"), storage_options
    )


# -- which disks a cluster's tasks see ------------------------------------------------------------------------------
def working_nodes() -> list[dict]:
    """The live Ray nodes that run tasks (CPUs or GPUs), as ray.nodes() describes them."""
    import ray

    return [n for n in ray.nodes() if n.get("Alive") and (n["Resources"].get("CPU", 0) or n["Resources"].get("GPU", 0))]


def only_driver_node() -> bool:
    """Whether every node that runs Ray tasks is the driver's own: only then do the tasks see the driver's local
    files (on a cluster, a local path may name another disk on every node)."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    return all(n["NodeID"] == here for n in working_nodes())
