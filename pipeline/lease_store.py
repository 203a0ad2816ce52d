"""The lease file's storage: exclusive create, compare-and-delete and compare-and-replace of `OUTPUT/_lease.json` on
local disks, S3 and other fsspec stores (what each guarantees is stated in `pipeline/lease.py`'s docstring)."""

from __future__ import annotations

import errno
import json
import logging
import os
import uuid
from dataclasses import dataclass
from typing import Any

from .errors import UserError
from .storage import filesystem, is_remote, join, with_retries, write_bytes_atomic

log = logging.getLogger(__name__)

LEASE_NAME = "_lease.json"
TMP_PREFIX = ".tmp-"
_TAKEOVER_PREFIX = ".lease-takeover-"  # a dead lease renamed aside; not swept (a concurrent taker still reads it)


@dataclass
class Current:
    """The lease as read: its record (None when unreadable), a token for compare-and-delete, its mtime."""

    record: dict | None
    token: Any
    mtime: float | None = None


def _parse(data: bytes) -> dict | None:
    try:
        record = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _is_precondition(exc: BaseException) -> bool:
    text = f"{exc} {exc.__cause__!r}".lower()
    return any(
        w in text for w in ("preconditionfailed", "pre-conditions", "conditionalrequestconflict", "precondition failed")
    )


class LocalStore:
    def __init__(self, directory: str):
        self.dir = directory
        self.path = os.path.join(directory, LEASE_NAME)

    def _refuse_a_file(self) -> None:
        if os.path.exists(self.dir) and not os.path.isdir(self.dir):
            raise UserError(f"output {self.dir} is a file, not a folder: choose another OUTPUT")

    def read(self) -> Current | None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
                mtime = os.fstat(f.fileno()).st_mtime
        except FileNotFoundError:
            return None
        except NotADirectoryError:
            self._refuse_a_file()
            raise
        return Current(_parse(data), data, mtime)

    def create(self, data: bytes) -> Any:
        """Exclusive create: the new lease's token, or None when a lease exists."""
        self._refuse_a_file()
        os.makedirs(self.dir, exist_ok=True)
        for _ in range(10):
            tmp = os.path.join(self.dir, f"{TMP_PREFIX}{uuid.uuid4().hex}-{LEASE_NAME}")
            try:
                with open(tmp, "xb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                try:
                    os.link(tmp, self.path)
                except FileExistsError:
                    return None
                except FileNotFoundError:
                    continue  # a new holder swept our temp file: try again (and find its lease)
                except OSError as exc:
                    if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK):
                        raise
                    return self._create_excl(data)  # no hard links here (vfat, some FUSE mounts)
                self._fsync_dir()
                return data
            finally:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
        raise OSError(f"could not create {self.path}: its temp file kept vanishing")

    def _create_excl(self, data: bytes) -> Any:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return None
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        self._fsync_dir()
        return data

    def _fsync_dir(self) -> None:
        try:
            fd = os.open(self.dir, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    def delete_if(self, token: bytes) -> bool:
        """Remove the lease only if it still holds exactly `token`: rename it aside, compare, put it back if not."""
        aside = os.path.join(self.dir, f"{_TAKEOVER_PREFIX}{uuid.uuid4().hex}.json")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        try:
            with open(aside, "rb") as f:
                moved = f.read()
        except FileNotFoundError:
            return False
        if moved == token:
            os.unlink(aside)
            return True
        try:  # we moved a newer lease aside: put it back, unless yet another lease appeared meanwhile
            os.link(aside, self.path)
        except OSError:
            log.warning("lease %s changed during a takeover and could not be restored", self.path)
        try:
            os.unlink(aside)
        except OSError:
            pass
        return False

    def replace_if(self, data: bytes, token: bytes) -> Any:
        current = self.read()
        if current is None or current.token != token:
            return None
        write_bytes_atomic(self.path, data)
        return data

    def sweep(self) -> int:
        swept = 0
        for directory in (self.dir, os.path.join(self.dir, "_runs")):
            try:
                entries = list(os.scandir(directory))
            except (FileNotFoundError, NotADirectoryError):
                continue
            for entry in entries:
                if entry.name.startswith(TMP_PREFIX) and entry.is_file(follow_symlinks=False):
                    try:
                        os.unlink(entry.path)
                        swept += 1
                    except FileNotFoundError:
                        pass
        return swept


class S3Store:
    """Conditional writes: If-None-Match: * to create, If-Match: <etag> to delete or rewrite."""

    def __init__(self, fs, directory: str):
        self.fs = fs
        self.path = join(directory, LEASE_NAME)
        self.bucket, self.key, _ = fs.split_path(self.path)

    def read(self) -> Current | None:
        self.fs.invalidate_cache(self.path)
        try:
            info = with_retries(lambda: self.fs.info(self.path))
            data = with_retries(lambda: self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None
        # A change between the two reads leaves a stale etag: the conditional delete or write then fails and the
        # caller reads again.
        modified = info.get("LastModified")
        mtime = modified.timestamp() if hasattr(modified, "timestamp") else None
        return Current(_parse(data), info.get("ETag"), mtime)

    def _conditional(self, call, lost: type[OSError]):
        """Run a conditional request: (True, its response), or (False, None) when its condition failed (the lease
        is someone else's now) or it raised `lost` (the object is gone, or already there)."""
        try:
            return True, with_retries(call)
        except lost:
            return False, None
        except OSError as exc:
            if _is_precondition(exc):
                return False, None
            raise
        finally:
            self.fs.invalidate_cache(self.path)

    def create(self, data: bytes) -> Any:
        done, out = self._conditional(lambda: self.fs.pipe_file(self.path, data, mode="create"), FileExistsError)
        return ((out.get("ETag") if isinstance(out, dict) else None) or True) if done else None

    def delete_if(self, etag: Any) -> bool:
        done, _ = self._conditional(
            lambda: self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=etag), FileNotFoundError
        )
        return done

    def replace_if(self, data: bytes, etag: Any) -> Any:
        done, out = self._conditional(lambda: self.fs.pipe_file(self.path, data, IfMatch=etag), FileNotFoundError)
        return ((out.get("ETag") if isinstance(out, dict) else None) or True) if done else None

    def sweep(self) -> int:
        return 0  # object stores write with one PUT: no temp files


class GenericStore:
    """Any other fsspec store: exists-check + write + read-back (see the module docstring for the weaker guarantee)."""

    def __init__(self, fs, directory: str):
        self.fs = fs
        self.path = join(directory, LEASE_NAME)

    def read(self) -> Current | None:
        try:
            self.fs.invalidate_cache(self.path)
        except Exception:
            pass
        try:
            data = with_retries(lambda: self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None
        mtime = None
        try:
            modified = self.fs.modified(self.path)
            mtime = modified.timestamp()
        except Exception:
            pass
        return Current(_parse(data), data, mtime)

    def create(self, data: bytes) -> Any:
        if with_retries(lambda: self.fs.exists(self.path)):
            return None
        with_retries(lambda: self.fs.pipe_file(self.path, data))
        current = self.read()
        return data if current is not None and current.token == data else None

    def delete_if(self, token: bytes) -> bool:
        current = self.read()
        if current is None or current.token != token:
            return False
        try:
            with_retries(lambda: self.fs.rm_file(self.path))
        except FileNotFoundError:
            return False
        return True

    def replace_if(self, data: bytes, token: bytes) -> Any:
        current = self.read()
        if current is None or current.token != token:
            return None
        with_retries(lambda: self.fs.pipe_file(self.path, data))
        return data

    def sweep(self) -> int:
        return 0


def lease_store(output_url: str, storage_options: dict | None):
    fs, path = filesystem(output_url, storage_options)
    if not is_remote(output_url):
        return LocalStore(path)
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    if "s3" in protocols:
        return S3Store(fs, path)
    return GenericStore(fs, path)
