"""Many list files and S3 Inventories, and object-store folders: streamed in bounded chunks (write_listing, what a
run does) with the same rows as the whole listing (list_inputs, what tools do), and clear one-line errors."""

from __future__ import annotations

import gzip
import io
import json
import os
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import UserError
from pipeline.sources import (
    CHUNK_ROWS,
    LISTING_SCHEMA,
    is_list_input,
    list_files,
    list_inputs,
    write_listing,
)


def streamed(source: str, folder: Path, storage_options=None, **kw) -> pa.Table:
    """write_listing as a run streams it: its chunk files, each checked, as one sorted table."""
    files, rows = write_listing(source, str(folder), storage_options, **kw)
    chunks = [pq.read_table(f) for f in files]
    assert all(c.schema == LISTING_SCHEMA and 0 < c.num_rows <= CHUNK_ROWS for c in chunks)
    table = pa.concat_tables(chunks).sort_by("uri")
    assert table.num_rows == rows
    return table


def rows_of(table: pa.Table) -> list[dict]:
    return sorted(table.to_pylist(), key=lambda r: (r["uri"], r["size"] or 0))


def touch(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    return path


def one_line_user_error(info) -> str:
    text = str(info.value)
    assert "\n" not in text and "Traceback" not in text and "RayTaskError" not in text, text
    assert type(info.value) is UserError
    return text


def test_what_counts_as_a_list_input():
    for source in (
        "l.txt",
        "s3://b/x/list.parquet",
        "lists/part-*.csv",
        "s3://b/inv/data/*.parquet",
        "s3://inv/b/cfg/2024-01-01T00-00Z/manifest.json",
        "x.LST",
    ):
        assert is_list_input(source), source
    for source in ("images/", "images/*.jpg", "s3://b/images", "photos/**/*", "a/b.png"):
        assert not is_list_input(source), source


@pytest.fixture()
def two_manifests(tmp_path) -> tuple[str, list[dict]]:
    """Two Parquet manifests in two folders: relative uris (each against its own folder), absolute ones, s3 ones,
    size/mtime/etag kept; one file has an extra column."""
    a, b = tmp_path / "lists" / "a", tmp_path / "lists" / "b"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    pq.write_table(
        pa.table(
            {
                "uri": ["x.jpg", "/data/abs.png", "s3://bkt/k/1.jpg"],
                "size": [1, 2, 3],
                "mtime": [1.5, 2.5, 3.5],
                "etag": ["e1", None, "e3"],
            }
        ),
        a / "part-0.parquet",
    )
    pq.write_table(
        pa.table(
            {"label": [7, 8], "uri": ["x.jpg", "sub/y.tif"], "size": [4, 5], "mtime": [4.5, 5.5], "etag": [None, "e5"]}
        ),
        b / "part-1.parquet",
    )
    (b / "notes.txt").write_text("not matched by the glob\n")
    expected = [
        {"uri": str(a / "x.jpg"), "size": 1, "mtime": 1.5, "etag": "e1"},
        {"uri": "/data/abs.png", "size": 2, "mtime": 2.5, "etag": None},
        {"uri": "s3://bkt/k/1.jpg", "size": 3, "mtime": 3.5, "etag": "e3"},
        {"uri": str(b / "x.jpg"), "size": 4, "mtime": 4.5, "etag": None},
        {"uri": str(b / "sub/y.tif"), "size": 5, "mtime": 5.5, "etag": "e5"},
    ]
    return str(tmp_path / "lists" / "*" / "part-*.parquet"), expected


def test_a_glob_of_manifests(two_manifests, tmp_path):
    source, expected = two_manifests
    assert rows_of(streamed(source, tmp_path / "chunks")) == rows_of(pa.Table.from_pylist(expected))
    assert rows_of(list_inputs(source)) == rows_of(pa.Table.from_pylist(expected))


def test_a_column_only_a_later_parquet_list_has_is_kept(tmp_path):
    """Of a glob of Parquet lists, each file's own columns are read (nulls from the files without them)."""
    pq.write_table(pa.table({"uri": ["s3://b/a.jpg", "s3://b/b.jpg"]}), tmp_path / "part-0.parquet")
    pq.write_table(pa.table({"uri": ["s3://b/c.jpg"], "size": [7], "etag": ["e7"]}), tmp_path / "part-1.parquet")
    pq.write_table(pa.table({"uri": ["s3://b/d.jpg"], "mtime": [4.5]}), tmp_path / "part-2.parquet")
    expected = [
        {"uri": "s3://b/a.jpg", "size": None, "mtime": None, "etag": None},
        {"uri": "s3://b/b.jpg", "size": None, "mtime": None, "etag": None},
        {"uri": "s3://b/c.jpg", "size": 7, "mtime": None, "etag": "e7"},
        {"uri": "s3://b/d.jpg", "size": None, "mtime": 4.5, "etag": None},
    ]
    source = str(tmp_path / "part-*.parquet")
    assert streamed(source, tmp_path / "chunks").to_pylist() == expected
    assert list_inputs(source).sort_by("uri").to_pylist() == expected


def test_one_manifest_keeps_its_columns_and_stays_in_bounded_chunks(tmp_path):
    n = CHUNK_ROWS + 2_345  # more than one chunk
    uris = [f"s3://bkt/d{i // 1000:03d}/img_{i:07d}.jpg" for i in range(n)]
    pq.write_table(
        pa.table(
            {
                "uri": uris,
                "size": list(range(n)),
                "mtime": [float(i) for i in range(n)],
                "etag": [f"e{i}" for i in range(n)],
            }
        ),
        tmp_path / "m.parquet",
        row_group_size=30_000,
    )
    table = streamed(str(tmp_path / "m.parquet"), tmp_path / "chunks")
    assert len(os.listdir(tmp_path / "chunks")) >= 2
    assert table.column("uri").to_pylist() == sorted(uris)
    row = table.filter(pa.compute.equal(table.column("uri"), uris[12_345])).to_pylist()[0]
    assert row == {"uri": uris[12_345], "size": 12_345, "mtime": 12_345.0, "etag": "e12345"}


def test_a_txt_list_gets_size_and_mtime_from_stat(tmp_path):
    lists = tmp_path / "lists"
    touch(lists / "local.jpg", 11)
    touch(tmp_path / "data" / "b.jpg", 22)
    os.utime(tmp_path / "data" / "b.jpg", (1_600_000_000, 1_600_000_000))
    (lists / "inputs.txt").write_bytes(
        ("\ufeff# comment\r\nlocal.jpg\r\n  ../data/b.jpg  \r\n\r\n   \nmissing.jpg\n# another\n").encode("utf-8")
    )
    table = streamed(str(lists / "inputs.txt"), tmp_path / "chunks")
    assert rows_of(table) == rows_of(list_inputs(str(lists / "inputs.txt")))
    found = {r["uri"]: r for r in table.to_pylist()}
    assert sorted(found) == sorted(
        [str(lists / "local.jpg"), str(tmp_path / "data" / "b.jpg"), str(lists / "missing.jpg")]
    )
    assert found[str(lists / "local.jpg")]["size"] == 11
    assert found[str(tmp_path / "data" / "b.jpg")]["mtime"] == 1_600_000_000
    assert found[str(lists / "missing.jpg")]["size"] is None  # the run makes it an error row


def test_a_glob_of_csv_and_txt_lists(tmp_path):
    touch(tmp_path / "l1" / "a.jpg", 3)
    (tmp_path / "l1" / "part-1.csv").write_text('uri,label\na.jpg,1\n"with, comma.png",2\n', encoding="utf-8")
    (tmp_path / "l2").mkdir()
    (tmp_path / "l2" / "part-2.csv").write_text("label,uri\n3,gs://b/x.jpg\n4,a.jpg\n", encoding="utf-8")
    table = streamed(str(tmp_path / "l*" / "part-*.csv"), tmp_path / "chunks")
    assert table.column("uri").to_pylist() == sorted(
        [
            str(tmp_path / "l1" / "a.jpg"),
            str(tmp_path / "l1" / "with, comma.png"),
            "gs://b/x.jpg",
            str(tmp_path / "l2" / "a.jpg"),
        ]
    )
    assert rows_of(table) == rows_of(list_inputs(str(tmp_path / "l*" / "part-*.csv")))
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "1.txt").write_text("a.jpg\n", encoding="utf-8")
    (tmp_path / "t" / "2.txt").write_text(f"{tmp_path / 'l1' / 'a.jpg'}\nb.jpg\n", encoding="utf-8")
    table = streamed(str(tmp_path / "t" / "*.txt"), tmp_path / "chunks-t")
    assert table.column("uri").to_pylist() == sorted(
        [str(tmp_path / "t" / "a.jpg"), str(tmp_path / "l1" / "a.jpg"), str(tmp_path / "t" / "b.jpg")]
    )
    assert (
        dict(zip(table.column("uri").to_pylist(), table.column("size").to_pylist()))[str(tmp_path / "l1" / "a.jpg")]
        == 3
    )


def test_overlapping_manifests_count_a_uri_once(tmp_path):
    from pipeline.plan import Workspace, open_listing

    for name, uris in (("m1", ["s3://b/1.jpg", "s3://b/2.jpg"]), ("m2", ["s3://b/2.jpg", "s3://b/3.jpg"])):
        pq.write_table(pa.table({"uri": uris, "size": [10, 20]}), tmp_path / f"{name}.parquet")
    with Workspace() as ws:
        files, rows = write_listing(str(tmp_path / "m*.parquet"), ws.path("listing"))
        listing = open_listing(ws, files, rows)
        assert (listing.rows, listing.unique, listing.duplicates) == (4, 3, 1)


def put(s3_server, url: str, data: bytes) -> None:
    from pipeline.storage import write_bytes_atomic

    write_bytes_atomic(url, data, s3_server["storage_options"])


def parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def test_manifests_on_object_storage(s3_server, s3_bucket, tmp_path):
    options = s3_server["storage_options"]
    base = f"s3://{s3_bucket}/lists"
    put(
        s3_server,
        f"{base}/a/m.parquet",
        parquet_bytes(pa.table({"uri": ["x.jpg", "s3://o/abs.jpg"], "size": [1, 2], "etag": ["e1", "e2"]})),
    )
    put(s3_server, f"{base}/b/m.parquet", parquet_bytes(pa.table({"uri": ["y.png"], "size": [3], "etag": ["e3"]})))
    expected = [
        {"uri": f"{base}/a/x.jpg", "size": 1, "mtime": None, "etag": "e1"},
        {"uri": "s3://o/abs.jpg", "size": 2, "mtime": None, "etag": "e2"},
        {"uri": f"{base}/b/y.png", "size": 3, "mtime": None, "etag": "e3"},
    ]
    put(s3_server, f"{base}/c/m.parquet", parquet_bytes(pa.table({"uri": ["../d/./z.jpg"], "size": [4]})))
    expected.append({"uri": f"{base}/d/z.jpg", "size": 4, "mtime": None, "etag": None})  # normalised as locally
    glob = f"{base}/*/m.parquet"
    assert rows_of(streamed(glob, tmp_path / "c1", options)) == rows_of(pa.Table.from_pylist(expected))
    assert rows_of(list_inputs(glob, options)) == rows_of(pa.Table.from_pylist(expected))
    # One remote .txt list: its objects are looked up for size and mtime.
    put(s3_server, f"s3://{s3_bucket}/img/one.jpg", b"x" * 17)
    put(s3_server, f"s3://{s3_bucket}/l.txt", b"img/one.jpg\n")
    rows = streamed(f"s3://{s3_bucket}/l.txt", tmp_path / "c2", options).to_pylist()
    assert [(r["uri"], r["size"], r["mtime"] is not None) for r in rows] == [
        (f"s3://{s3_bucket}/img/one.jpg", 17, True)
    ]
    for chunk in (tmp_path / "c2").iterdir():  # the credentials never reach the listing
        assert options["secret"].encode() not in chunk.read_bytes()


INVENTORY_ROWS = [  # key, is_latest, is_delete_marker, size, last modified (ms), e_tag
    ("imgs/a.jpg", True, False, 100, 1_700_000_000_000, "ea"),
    ("imgs/with space.PNG", True, False, 200, 1_700_000_001_500, "eb"),
    ("imgs/a+b.jpg", True, False, 300, 1_700_000_002_000, "ec"),
    ("imgs/notes.txt", True, False, 5, 1_700_000_003_000, "ed"),  # not an image
    ("imgs/deleted.jpg", True, True, None, 1_700_000_004_000, None),  # a delete marker
    ("imgs/old.jpg", False, False, 50, 1_600_000_000_000, "eo"),  # a non-latest version
    ("imgs/sub/", True, False, 0, 1_700_000_005_000, "ef"),  # a "folder" object
]


def inventory_expected(source_bucket: str) -> list[dict]:
    return [
        {"uri": f"s3://{source_bucket}/{k}", "size": s, "mtime": t / 1000, "etag": e}
        for k, latest, deleted, s, t, e in INVENTORY_ROWS[:3]
    ]


def write_inventory(s3_server, bucket: str, fmt: str, source_bucket: str = "photos") -> str:
    """An S3-Inventory-shaped delivery on the loopback S3: data files (two) and the manifest.json naming them."""
    prefix = f"inv/{source_bucket}/cfg"
    halves = [INVENTORY_ROWS[:4], INVENTORY_ROWS[4:]]
    keys = []
    for i, rows in enumerate(halves):
        if fmt == "Parquet":
            key = f"{prefix}/data/part-{i}.parquet"
            table = pa.table(
                {
                    "bucket": [source_bucket] * len(rows),
                    "key": [r[0] for r in rows],
                    "version_id": [f"v{j}" for j in range(len(rows))],
                    "is_latest": [r[1] for r in rows],
                    "is_delete_marker": [r[2] for r in rows],
                    "size": pa.array([r[3] for r in rows], pa.int64()),
                    "last_modified_date": pa.array([r[4] for r in rows], pa.timestamp("ms", tz="UTC")),
                    "e_tag": [r[5] for r in rows],
                    "storage_class": ["STANDARD"] * len(rows),
                }
            )
            data = parquet_bytes(table)
        else:
            from urllib.parse import quote_plus

            key = f"{prefix}/data/part-{i}.csv.gz"
            lines = []
            for k, latest, deleted, size, t, etag in rows:
                when = (
                    datetime.fromtimestamp(t / 1000, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.") + f"{t % 1000:03d}Z"
                )
                lines.append(
                    ",".join(
                        f'"{v}"'
                        for v in (
                            source_bucket,
                            quote_plus(k, safe="/"),
                            "v",
                            str(latest).lower(),
                            str(deleted).lower(),
                            "" if size is None else size,
                            when,
                            etag or "",
                            "STANDARD",
                        )
                    )
                )
            data = gzip.compress(("\n".join(lines) + "\n").encode())
        put(s3_server, f"s3://{bucket}/{key}", data)
        keys.append(key)
    schema = (
        "message s3.inventory { required binary bucket (UTF8); ... }"
        if fmt == "Parquet"
        else "Bucket, Key, VersionId, IsLatest, IsDeleteMarker, Size, LastModifiedDate, ETag, StorageClass"
    )
    manifest = {
        "sourceBucket": source_bucket,
        "destinationBucket": f"arn:aws:s3:::{bucket}",
        "version": "2016-11-30",
        "fileFormat": fmt,
        "fileSchema": schema,
        "files": [{"key": k, "size": 1, "MD5checksum": "x"} for k in keys],
    }
    url = f"s3://{bucket}/{prefix}/2024-01-01T01-00Z/manifest.json"
    put(s3_server, url, json.dumps(manifest).encode())
    return url


@pytest.mark.parametrize("fmt", ["Parquet", "CSV"])
def test_an_s3_inventory(fmt, s3_server, s3_bucket, tmp_path):
    options = s3_server["storage_options"]
    url = write_inventory(s3_server, s3_bucket, fmt)
    assert is_list_input(url) and list_files(url, options).fmt == fmt.lower()
    expected = rows_of(pa.Table.from_pylist(inventory_expected("photos"), schema=LISTING_SCHEMA))
    assert rows_of(streamed(url, tmp_path / "chunks", options)) == expected
    assert rows_of(list_inputs(url, options)) == expected


@pytest.mark.parametrize(
    "case",
    [
        "no_uri_parquet",
        "no_uri_csv",
        "no_uri_in_the_second_file",
        "corrupt",
        "corrupt_second",
        "missing",
        "glob_matches_nothing",
        "empty_uris",
        "empty_uris_in_second",
    ],
)
def test_list_errors_are_one_line_user_errors(case, tmp_path):
    good = tmp_path / "a" / "m.parquet"
    good.parent.mkdir()
    pq.write_table(pa.table({"uri": ["x.jpg"], "size": [1]}), good)
    second = tmp_path / "b" / "m.parquet"
    second.parent.mkdir()
    source = str(tmp_path / "*" / "m.parquet")
    if case == "no_uri_parquet":
        source = str(tmp_path / "p.parquet")
        pq.write_table(pa.table({"path": ["a.jpg"]}), source)
        pattern, named = "has no 'uri' column.*path", source
    elif case == "no_uri_csv":
        source = str(tmp_path / "p.csv")
        Path(source).write_text("path,label\na.jpg,1\n")
        pattern, named = "has no 'uri' column.*path", source
    elif case == "no_uri_in_the_second_file":
        pq.write_table(pa.table({"path": ["a.jpg"], "size": [1]}), second)
        pattern, named = "has no .uri. column", str(second)
    elif case == "corrupt":
        source = str(tmp_path / "broken.parquet")
        Path(source).write_bytes(b"not parquet at all")
        pattern, named = "cannot be read", source
    elif case == "corrupt_second":
        second.write_bytes(b"PAR1 not parquet either")
        pattern, named = "cannot be read", source
    elif case == "missing":
        source = str(tmp_path / "missing.parquet")
        pattern, named = "does not exist", source
    elif case == "glob_matches_nothing":
        source = str(tmp_path / "nowhere" / "*.parquet")
        pattern, named = "matches no list file", source
    elif case == "empty_uris":
        source = str(tmp_path / "e.parquet")
        pq.write_table(pa.table({"uri": ["a.jpg", "", None], "size": [1, 2, 3]}), source)
        pattern, named = "empty uri values", source
    else:
        pq.write_table(pa.table({"uri": ["y.jpg", " "], "size": [1, 2]}), second)
        pattern, named = "empty uri values", source
    for attempt in ("streamed", "whole"):
        with pytest.raises(UserError, match=pattern) as info:
            if attempt == "streamed":
                write_listing(source, str(tmp_path / f"chunks-{case}"))
            else:
                list_inputs(source)
        assert named in one_line_user_error(info), (attempt, str(info.value))
        if case == "no_uri_parquet":
            assert "path" in str(info.value)  # the columns it does have


def test_s3_inventory_errors(s3_server, s3_bucket, tmp_path):
    options = s3_server["storage_options"]
    url = f"s3://{s3_bucket}/inv/manifest.json"
    put(
        s3_server,
        url,
        json.dumps(
            {"fileFormat": "ORC", "destinationBucket": f"arn:aws:s3:::{s3_bucket}", "files": [{"key": "x.orc"}]}
        ).encode(),
    )
    with pytest.raises(UserError, match="ORC.*not supported") as info:
        write_listing(url, str(tmp_path / "c"), options)
    one_line_user_error(info)
    put(s3_server, url, b"{not json")
    with pytest.raises(UserError, match="not an S3 Inventory manifest") as info:
        write_listing(url, str(tmp_path / "c"), options)
    one_line_user_error(info)
    # A data file the manifest names is gone.
    put(
        s3_server,
        url,
        json.dumps(
            {
                "fileFormat": "Parquet",
                "destinationBucket": f"arn:aws:s3:::{s3_bucket}",
                "files": [{"key": "inv/data/gone.parquet"}],
            }
        ).encode(),
    )
    with pytest.raises(UserError, match="does not exist") as info:
        write_listing(url, str(tmp_path / "c"), options)
    assert "inv/data/gone.parquet" in one_line_user_error(info)
    assert options["secret"] not in str(info.value)


def test_featurize_images_over_a_glob_of_two_manifests(ray_session, clip_model, prompts_file, photo_dir, tmp_path):
    from pipeline.config import RunConfig
    from pipeline.images_job import run_images

    photos = sorted(photo_dir.glob("*.jpg"))[:5]
    (tmp_path / "lists").mkdir()
    pq.write_table(pa.table({"uri": [str(p) for p in photos[:3]]}), tmp_path / "lists" / "part-0.parquet")
    pq.write_table(pa.table({"uri": [str(p) for p in photos[1:5]]}), tmp_path / "lists" / "part-1.parquet")
    out = tmp_path / "out"
    cfg = RunConfig(
        input=str(tmp_path / "lists" / "part-*.parquet"),
        output=str(out),
        model=str(clip_model),
        prompts=str(prompts_file),
        dtype="float32",
        batch_size=8,
    )
    run_images(cfg, echo=lambda m: None)
    run = json.loads((out / "_run.json").read_text())
    assert run["counts"]["listed"] == 7 and run["counts"]["duplicates"] == 2 and run["counts"]["ok"] == 5
    uris = sorted(pa.concat_tables([pq.read_table(s) for s in out.glob("part-*.parquet")]).column("uri").to_pylist())
    assert uris == [str(p) for p in photos]


def test_an_object_store_folder_streams_page_by_page(s3_server, s3_bucket, tmp_path, monkeypatch):
    """An S3 folder with files at its top and under several prefixes (nested too): listed page by page from the
    store's own paginated listing (ListObjectsV2 pages of at most 1,000 keys, here forced to 2), each page's files
    sent on as chunks of at most CHUNK_ROWS rows; sizes and etags kept, non-images and hidden files and folders left
    out; the streamed and the whole listing agree."""
    import pipeline.sources.common as common
    from pipeline.storage import filesystem

    options = s3_server["storage_options"]
    root = f"s3://{s3_bucket}/in"
    names = [
        "top.jpg",
        "top2.jpg",
        "top3.jpg",
        "notes.txt",
        "a/1.jpg",
        "a/2.png",
        "a/.hidden.jpg",
        ".cache/x.jpg",
        "b/c/3.jpg",
        "b/c/d/4.webp",
        "b/readme.md",
        *(f"many/{i:03d}.jpg" for i in range(7)),
    ]
    for i, name in enumerate(names):
        put(s3_server, f"{root}/{name}", b"x" * (10 + i))
    fs, _ = filesystem(root, options)
    pages = []
    real = fs.call_s3

    def small_pages(method, **kwargs):  # the store's own pagination, with 2 keys a page
        response = real(method, **{**kwargs, "MaxKeys": 2})
        pages.append((kwargs["Prefix"], len(response.get("Contents", []))))
        return response

    monkeypatch.setattr(fs, "call_s3", small_pages)
    monkeypatch.setattr(common, "CHUNK_ROWS", 3)  # the 7-file prefix streams as three chunks
    files, rows = write_listing(root, str(tmp_path / "listing"), options)
    chunks = [pq.read_table(f) for f in files]
    assert max(c.num_rows for c in chunks) <= 3 and rows == 14
    assert max(n for _, n in pages) <= 2 and sum(1 for prefix, _ in pages if prefix == "in/many/") == 4
    listed = pa.concat_tables(chunks).sort_by("uri")
    assert rows_of(listed) == rows_of(list_inputs(root, options))
    hidden = ("/.", ".cache")
    expected = {n for n in names if n.rsplit(".", 1)[-1] in ("jpg", "png", "webp") and not n.startswith(hidden)}
    expected = {n for n in expected if "/." not in "/" + n}
    assert {u.split("/in/", 1)[1] for u in listed.column("uri").to_pylist()} == expected
    sizes = {r["uri"].split("/in/", 1)[1]: r["size"] for r in listed.to_pylist()}
    assert sizes["b/c/d/4.webp"] == 10 + names.index("b/c/d/4.webp")
    assert all(r["etag"] for r in listed.to_pylist())


def test_a_missing_object_store_folder_is_one_line(s3_server, s3_bucket, tmp_path):
    options = s3_server["storage_options"]
    with pytest.raises(UserError) as info:
        write_listing(f"s3://{s3_bucket}/nothing-here", str(tmp_path / "l1"), options)
    assert one_line_user_error(info) == f"input s3://{s3_bucket}/nothing-here does not exist"
