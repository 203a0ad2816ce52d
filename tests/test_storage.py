"""Storage helpers: transient faults retried, permanent ones not; atomic writes leave no partial file."""

from __future__ import annotations

import pytest

from pipeline.storage import is_transient, read_bytes, with_retries, write_bytes_atomic


def test_transient_faults_are_retried_with_backoff():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError("503 SlowDown: please reduce your request rate")
        return "ok"

    assert with_retries(flaky, base_delay_s=0.001) == "ok"
    assert len(calls) == 3


def test_permanent_faults_are_not_retried():
    calls = []

    def missing():
        calls.append(1)
        raise FileNotFoundError("gone")

    with pytest.raises(FileNotFoundError):
        with_retries(missing, base_delay_s=0.001)
    assert len(calls) == 1
    assert is_transient(TimeoutError()) and is_transient(ConnectionResetError())
    assert not is_transient(PermissionError("denied"))


def test_atomic_write_replaces_whole_file(tmp_path):
    target = tmp_path / "sub" / "part-00000.parquet"
    write_bytes_atomic(str(target), b"first")
    write_bytes_atomic(str(target), b"second")
    assert read_bytes(str(target)) == b"second"
    assert [p.name for p in target.parent.iterdir()] == ["part-00000.parquet"]


def test_s3_round_trip_through_one_put(s3_server, s3_bucket):
    options = s3_server["storage_options"]
    url = f"s3://{s3_bucket}/out/_run.json"
    write_bytes_atomic(url, b"{}", options)
    assert read_bytes(url, options) == b"{}"
    with pytest.raises(FileNotFoundError):
        read_bytes(f"s3://{s3_bucket}/out/missing.jpg", options)
