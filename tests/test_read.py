"""Reading an OUTPUT from a long-lived process (a notebook): shards written since the last read are seen."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import read_features
from pipeline.schema import IMAGE_SCHEMA, fixed_list


def _shard(uri: str, run_id: str) -> bytes:
    ok = np.ones(1, bool)
    table = pa.Table.from_arrays(
        [
            pa.array([uri[-6:]]),
            pa.array([uri]),
            pa.array(["ok"]),
            pa.array([None], pa.string()),
            pa.array([4], pa.int32()),
            pa.array([4], pa.int32()),
            fixed_list(np.ones((1, 2), np.float16), pa.float16(), ok),
            fixed_list(np.ones((1, 1), np.float32), pa.float32(), ok),
            pa.array([1], pa.int64()),
            pa.array([0.0]),
            pa.array([None], pa.string()),
            pa.array([run_id]),
            pa.array([1], pa.int32()),
        ],
        schema=IMAGE_SCHEMA,
    )
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def test_read_features_sees_shards_written_by_another_process_since(s3_server, s3_bucket):
    import boto3

    options = s3_server["storage_options"]
    other_writer = boto3.client(
        "s3",
        endpoint_url=s3_server["endpoint"],
        region_name="us-east-1",
        aws_access_key_id=options["key"],
        aws_secret_access_key=options["secret"],
    )
    other_writer.put_object(Bucket=s3_bucket, Key="out/_dataset.json", Body=json.dumps({"version": 1}).encode())
    other_writer.put_object(Bucket=s3_bucket, Key="out/part-00000.parquet", Body=_shard("s3://in/a.jpg", "r1"))
    output = f"s3://{s3_bucket}/out"
    assert read_features(output, storage_options=options).num_rows == 1
    other_writer.put_object(Bucket=s3_bucket, Key="out/part-00001.parquet", Body=_shard("s3://in/b.jpg", "r2"))
    again = read_features(output, storage_options=options)  # s3fs would answer from its cached listing
    assert sorted(again.column("uri").to_pylist()) == ["s3://in/a.jpg", "s3://in/b.jpg"]
