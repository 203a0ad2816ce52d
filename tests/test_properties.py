"""Bad input, tried by a machine: hypothesis generates what users feed the parsers (prompt files, list files in
text, CSV and Parquet, S3 Inventory manifests and their data files, config files, --storage-options), realistic and
hostile alike. Every input gives a well-formed result or one `UserError` of one line; any other exception is a bug.
A few go through the real CLI: exit status 2 and one line on stderr.

Runs are derandomised (a fixed seed per test, no example database), so the same examples run every time. Every bug
these tests found is pinned as an explicit @example of the test that found it."""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
import os
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from pipeline.config import RunConfig, SlidesConfig, load_config_file, make_config, parse_storage_options
from pipeline.errors import UserError
from pipeline.prompts import PromptSet, load_prompts
from pipeline.sources import LISTING_SCHEMA, list_inputs, write_listing
from pipeline.storage import check_storage_options

# derandomize: the examples are the same on every run; deadline None: a loaded 2-core machine must not fail a test
PROFILE = settings(max_examples=60, deadline=None, derandomize=True, database=None, print_blob=False)
# the module-scoped folders and the loopback server are shared by every example on purpose: each example writes its
# own files under a fresh name
SHARED_FIXTURES = settings(PROFILE, suppress_health_check=[HealthCheck.function_scoped_fixture])


def one_line(exc: UserError) -> str:
    text = str(exc)
    assert text.strip(), "an empty error message"
    assert len(text.splitlines()) == 1 and "Traceback" not in text, f"not one line: {text!r}"
    return text


def outcome(call):
    """call()'s result, or None when it raised a UserError of one line; any other exception fails the test."""
    try:
        return call()
    except UserError as exc:
        one_line(exc)
        return None


# -- what users type --------------------------------------------------------------------------------------------------
WORDS = [
    "tumor", "stroma", "adipose tissue", "a histopathology image of {}", "{} tissue", "{}", "{0}", "{name}", "{{}}",
    "", " ", "\t", "#", "# comment", "- x", "null", "~", "yes", "no", "1e3", "0x1F", "ñandú", "肿瘤", "🙂", "\u200b",
    "\ufeff", "a\nb", "a\r\nb", "\x00", "\x85", "\u2028", "é" * 3, "x" * 3000, "..", "a: b", "[1, 2]", "{a: 1}",
]  # fmt: skip
UTF8_CHARS = st.characters(codec="utf-8")
TEXT = st.one_of(st.sampled_from(WORDS), st.text(UTF8_CHARS, max_size=24))
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True), TEXT
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT | st.integers(-5, 5), inner, max_size=4),
    max_leaves=12,
)
NOT_UTF8 = st.binary(min_size=1, max_size=64).map(lambda b: b"\xff\xfe" + b + b"\xc3")


def yaml_text(doc) -> str:
    return yaml.safe_dump(doc, allow_unicode=True, sort_keys=False)


# -- prompt files -----------------------------------------------------------------------------------------------------
CONCEPT = st.one_of(
    TEXT,
    st.fixed_dictionaries(
        {"name": TEXT | SCALARS}, optional={"prompts": st.lists(TEXT, max_size=4) | VALUES, "colour": VALUES}
    ),
    VALUES,
)
PROMPT_DOC = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "concepts": st.lists(CONCEPT, max_size=6) | VALUES,
            "templates": st.lists(TEXT, max_size=4) | TEXT | VALUES,
            "colour": VALUES,
            1: VALUES,
        },
    ),
    VALUES,
)
PROMPT_FILE = st.one_of(
    st.tuples(st.just(".yaml"), PROMPT_DOC.map(yaml_text).map(str.encode)),
    st.tuples(st.sampled_from([".yaml", ".yml", ".json", ".txt"]), st.text(UTF8_CHARS, max_size=200).map(str.encode)),
    st.tuples(st.just(".txt"), st.lists(TEXT, max_size=8).map("\n".join).map(str.encode)),
    st.tuples(st.sampled_from([".yaml", ".txt"]), NOT_UTF8),
)


def well_formed_prompts(prompts: PromptSet) -> None:
    assert prompts.concepts and len(set(prompts.names)) == len(prompts.names)
    for concept in prompts.concepts:
        assert isinstance(concept.name, str) and concept.name.strip()
        assert concept.prompts and all(isinstance(p, str) and p.strip() for p in concept.prompts)
    assert len(prompts.set_hash) == 16


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("properties")


def fresh(scratch: Path) -> Path:
    folder = scratch / uuid.uuid4().hex[:12]
    folder.mkdir()
    return folder


@SHARED_FIXTURES
@given(PROMPT_FILE)
@example((".yaml", b"{1: a, colour: b, concepts: [x]}"))  # unknown keys of mixed types were sorted together: TypeError
@example((".yaml", b"[" * 5000))  # nesting deeper than the YAML parser's recursion: RecursionError
def test_prompt_files(scratch, prompt_file):
    suffix, content = prompt_file
    path = fresh(scratch) / f"prompts{suffix}"
    path.write_bytes(content)
    prompts = outcome(lambda: load_prompts(str(path)))
    event("read" if prompts is not None else "refused")
    if prompts is not None:
        well_formed_prompts(prompts)


# -- list files -------------------------------------------------------------------------------------------------------
LOCAL_URIS = [
    "a.jpg", "sub/b.png", "./c.jpg", "../up.jpg", "sub/../d.jpg", "/abs/e.jpg", "x y.jpg", "ü.jpg", "#c.jpg",
    "a.jpg # not a comment", "file:///tmp/f.jpg", "C:\\win\\g.jpg", "weird://h/i.jpg", "a\x00b.jpg", "/", ".",
    "~/j.jpg", "n" * 300 + ".jpg",
]  # fmt: skip
TEXT_LINE = st.sampled_from([*LOCAL_URIS, "", "   ", "# comment", "\ufeffa.jpg"]) | st.text(UTF8_CHARS, max_size=20)
TEXT_LIST = st.one_of(
    st.tuples(st.lists(TEXT_LINE, max_size=10), st.sampled_from(["\n", "\r\n", "\r"]), st.booleans()).map(
        lambda t: (("\ufeff" if t[2] else "") + t[1].join(t[0])).encode("utf-8")
    ),
    NOT_UTF8,
)
COLUMN_NAMES = ["uri", "size", "mtime", "etag", "label", "URI", " uri", ""]
CELLS = [
    "a.jpg", "s3://b/k.jpg", "gs://b/k.png", "", " ", "quoted, comma.jpg", 'say "hi".jpg', "12", "-1", "1.5", "nan",
    "NaN", "1e400", "true", "2024-01-01T00:00:00Z", "x\ny.jpg", "ü.jpg",
]  # fmt: skip
CELL = st.sampled_from(CELLS) | st.text(UTF8_CHARS, max_size=10)


@st.composite
def csv_lists(draw) -> bytes:
    header = draw(st.lists(st.sampled_from(COLUMN_NAMES), min_size=1, max_size=4))
    if draw(st.integers(0, 3)):  # mostly a uri column first
        header = ["uri", *header]
    width = st.just(len(header)) if draw(st.integers(0, 3)) else st.integers(0, len(header) + 1)  # mostly right
    rows = draw(st.lists(width.flatmap(lambda n: st.lists(CELL, min_size=n, max_size=n)), max_size=8))
    if draw(st.booleans()):  # written properly: quoted where needed
        sink = io.StringIO()
        csv.writer(sink).writerows([header, *rows])
        text = sink.getvalue()
    else:  # written by hand: broken quoting, ragged rows
        text = "\n".join(",".join(row) for row in [header, *rows]) + draw(st.sampled_from(["", "\n", '"']))
    data = (("\ufeff" if draw(st.booleans()) else "") + text).encode("utf-8")
    return data + draw(st.sampled_from([b"", b"\xff\xfe,\n"]))


ARROW_TYPES = {
    "string": (pa.string(), st.one_of(st.none(), CELL)),
    "large_string": (pa.large_string(), st.one_of(st.none(), CELL)),
    "int64": (pa.int64(), st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1))),
    "float64": (pa.float64(), st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True))),
    "null": (pa.null(), st.none()),
    "list": (pa.list_(pa.int64()), st.one_of(st.none(), st.lists(st.integers(-5, 5), max_size=3))),
    "binary": (pa.binary(), st.one_of(st.none(), st.binary(max_size=8), st.sampled_from([b"a.jpg", b"\xff.jpg"]))),
    "bool": (pa.bool_(), st.one_of(st.none(), st.booleans())),
    "timestamp": (pa.timestamp("ms", tz="UTC"), st.one_of(st.none(), st.integers(0, 2**41))),
    "date": (pa.date32(), st.one_of(st.none(), st.integers(0, 40_000))),
    "struct": (pa.struct([("a", pa.int64())]), st.one_of(st.none(), st.fixed_dictionaries({"a": st.integers(0, 9)}))),
    "dictionary": (pa.dictionary(pa.int32(), pa.string()), st.one_of(st.none(), CELL)),
    "image_key": (pa.string(), st.sampled_from(["a.jpg", "b/c.PNG", "d%20e.jpg", "f+g.tif", "h.txt", "", "i/"]) | CELL),
    "bucket_name": (pa.string(), st.sampled_from(["photos", "b-2", "", "no such/bucket"]) | st.none()),
}


@st.composite
def arrow_tables(draw, usual: dict[str, str], others: list[str]) -> pa.Table:
    """A table of 0-6 rows: each `usual` column (name: its ARROW_TYPES key) mostly there with its usual type, else
    missing or of any type; then 0-3 more columns named from `others` (repeats too), of any type."""
    rows = draw(st.integers(0, 6))
    names, kinds = [], []
    for name, kind in usual.items():
        choice = draw(st.sampled_from(["usual"] * 4 + ["missing", "other"]))
        if choice != "missing":
            names.append(name)
            kinds.append(kind if choice == "usual" else draw(st.sampled_from(sorted(ARROW_TYPES))))
    for name in draw(st.lists(st.sampled_from(others), min_size=0 if names else 1, max_size=3)):
        names.append(name)
        kinds.append(draw(st.sampled_from(sorted(ARROW_TYPES))))
    columns = []
    for kind in kinds:
        arrow_type, values = ARROW_TYPES[kind]
        items = draw(st.lists(values, min_size=rows, max_size=rows))
        if pa.types.is_dictionary(arrow_type):
            columns.append(pa.array(items, pa.string()).dictionary_encode())
        else:
            columns.append(pa.array(items, arrow_type))
    return pa.Table.from_arrays(columns, names=names)


@st.composite
def mutated(draw, valid: dict, names, values) -> dict:
    """A valid document with 0-3 mutations: a key dropped, a value replaced by any value, a key added."""
    doc = dict(valid)
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(sorted(doc, key=str)) | names) if doc else draw(names)
        if name in doc and draw(st.booleans()):
            del doc[name]
        else:
            doc[name] = draw(values)
    return doc


def parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


LIST_CONTENT = {
    ".txt": TEXT_LIST,
    ".csv": csv_lists() | NOT_UTF8 | st.binary(max_size=40),
    ".parquet": arrow_tables({"uri": "string"}, COLUMN_NAMES).map(parquet_bytes)
    | st.binary(max_size=40)
    | st.just(b"PAR1" * 3),
}
LIST_FILE = st.sampled_from(sorted(LIST_CONTENT)).flatmap(
    lambda suffix: st.tuples(st.just(suffix), LIST_CONTENT[suffix])
)
LIST_GLOB = st.sampled_from(sorted(LIST_CONTENT)).flatmap(
    lambda suffix: st.tuples(st.just(suffix), st.lists(LIST_CONTENT[suffix], min_size=1, max_size=3))
)


def well_formed_listing(table: pa.Table) -> None:
    assert table.schema == LISTING_SCHEMA and table.num_rows > 0
    assert all(isinstance(u, str) and u.strip() for u in table.column("uri").to_pylist())


def listed(source: str, folder: Path, storage_options: dict | None = None) -> pa.Table | None:
    """The listing of `source` as tools get it (whole) and as runs stream it (chunk files): the same rows, or the
    same kind of outcome (both a UserError)."""
    whole = outcome(lambda: list_inputs(source, storage_options))
    # beside the folder, not in it: a list may name its own folder (`.`), whose mtime must not change meanwhile
    streamed = outcome(lambda: write_listing(source, str(folder.with_name(folder.name + "-chunks")), storage_options))
    assert (whole is None) == (streamed is None), (whole, streamed)
    event("listed" if whole is not None else "refused")  # --hypothesis-show-statistics: both kinds are tried
    if whole is None:
        return None
    well_formed_listing(whole)
    chunks = pa.concat_tables([pq.read_table(f) for f in streamed[0]])
    assert chunks.sort_by("uri").to_pylist() == whole.to_pylist()
    return whole


@SHARED_FIXTURES
@given(LIST_FILE)
@example((".parquet", parquet_bytes(pa.table({"uri": [[1, 2]]}))))  # a list-typed column: ArrowNotImplementedError
@example((".parquet", parquet_bytes(pa.table({"uri": ["a.jpg"], "mtime": pa.array([1], pa.timestamp("s"))}))))
@example((".csv", b"uri,uri\na.jpg,b.jpg\n"))  # a column twice: KeyError
@example((".txt", b"a\x00b.jpg\n"))  # a relative uri with a NUL byte: ValueError
def test_list_files(scratch, list_file):
    suffix, content = list_file
    folder = fresh(scratch)
    path = folder / f"list{suffix}"
    path.write_bytes(content)
    table = listed(str(path), folder)
    if table is not None and suffix in (".txt", ".lst"):  # each line that is not blank or a comment is one uri
        lines = [ln.strip() for ln in io.StringIO(content.decode("utf-8-sig"), newline=None)]
        assert table.num_rows == sum(1 for ln in lines if ln and not ln.startswith("#"))


@SHARED_FIXTURES
@given(LIST_GLOB)
def test_globs_of_list_files(scratch, list_glob):
    """Several list files of one kind under one glob (in folders with glob characters in their names): errors name
    the file of the glob that has the problem."""
    suffix, contents = list_glob
    folder = fresh(scratch)
    for i, content in enumerate(contents):
        (folder / "lists [2024]" / f"part-{i}").mkdir(parents=True)
        (folder / "lists [2024]" / f"part-{i}" / f"list{suffix}").write_bytes(content)
    listed(str(folder / "lists [2024]" / "part-*" / f"list{suffix}"), folder)


def test_a_timestamp_mtime_column_is_epoch_seconds(tmp_path):
    """A manifest written from pandas has mtime as a timestamp: read as seconds since the epoch, not refused."""
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"uri": ["/x/a.jpg"], "mtime": pa.array([1_700_000_000_500], pa.timestamp("ms"))}), path)
    assert list_inputs(str(path)).column("mtime").to_pylist() == [1_700_000_000.5]


# -- S3 Inventory -----------------------------------------------------------------------------------------------------
INVENTORY_BUCKET = "inventory-properties"
CSV_SCHEMA = "Bucket, Key, VersionId, IsLatest, IsDeleteMarker, Size, LastModifiedDate, ETag, StorageClass"
INVENTORY_TYPES = {"bucket": "bucket_name", "key": "image_key", "size": "int64", "last_modified_date": "timestamp",
                   "e_tag": "string", "is_latest": "bool", "is_delete_marker": "bool"}  # fmt: skip


def inventory_data() -> dict[str, bytes]:
    """Data files an inventory may name: good ones in both formats, and broken ones."""
    good = pa.table(
        {
            "bucket": ["photos", "photos"],
            "key": ["a/1.jpg", "a/2.txt"],
            "size": [10, 20],
            "last_modified_date": pa.array([1_700_000_000_000, 0], pa.timestamp("ms", tz="UTC")),
            "e_tag": ["e1", "e2"],
            "is_latest": [True, True],
            "is_delete_marker": [False, False],
        }
    )
    row = '"photos","a/3.jpg","v","true","false","7","2024-01-01T00:00:00.000Z","e3","STANDARD"\n'
    return {
        "data/good.parquet": parquet_bytes(good),
        "data/good.csv.gz": gzip.compress(row.encode()),
        "data/plain.csv": row.encode(),
        "data/notgz.csv.gz": row.encode(),
        "data/corrupt.parquet": b"PAR1 not parquet",
        "data/empty.parquet": b"",
        "data/odd.parquet": parquet_bytes(pa.table({"bucket": [1], "key": [[1]], "size": ["big"]})),
        "data/nokey.parquet": parquet_bytes(pa.table({"path": ["a.jpg"]})),
    }


@pytest.fixture(scope="module")
def inventory(s3_server) -> dict:
    """The loopback S3 server with a bucket of inventory data files; storage_options and the bucket's name."""
    from pipeline.storage import write_bytes_atomic

    s3_server["create_bucket"](INVENTORY_BUCKET)
    options = s3_server["storage_options"]
    for key, data in inventory_data().items():
        write_bytes_atomic(f"s3://{INVENTORY_BUCKET}/{key}", data, options)
    return {"storage_options": options, "bucket": INVENTORY_BUCKET}


DATA_KEYS = [*inventory_data(), "data/gone.parquet", "", "data/", "/data/good.parquet", "data/good.parquet\n"]
ARN = f"arn:aws:s3:::{INVENTORY_BUCKET}"
FILE_ENTRIES = st.lists(
    st.fixed_dictionaries({"key": st.sampled_from(DATA_KEYS) | SCALARS}, optional={"size": SCALARS}) | VALUES,
    max_size=3,
)
VALID_MANIFESTS = [
    {"sourceBucket": "photos", "destinationBucket": ARN, "fileFormat": "Parquet", "fileSchema": "message s3 {}",
     "files": [{"key": "data/good.parquet", "size": 1}]},
    {"destinationBucket": ARN, "fileFormat": "CSV", "fileSchema": CSV_SCHEMA, "files": [{"key": "data/good.csv.gz"}]},
]  # fmt: skip
MANIFEST_NAMES = st.sampled_from(["fileFormat", "destinationBucket", "files", "fileSchema", "sourceBucket"]) | TEXT
MANIFEST_VALUES = st.one_of(
    st.sampled_from(["Parquet", "CSV", "ORC", "parquet", "csv", "", ARN, INVENTORY_BUCKET, "arn:aws:s3:::nosuch"]),
    st.sampled_from([CSV_SCHEMA, "Bucket, Key", "Key", "Bucket, Key, Key", "a,,b"]),
    FILE_ENTRIES,
    VALUES,
)
MANIFEST_DOC = st.one_of(
    st.sampled_from(VALID_MANIFESTS).flatmap(lambda valid: mutated(valid, MANIFEST_NAMES, MANIFEST_VALUES)),
    st.dictionaries(MANIFEST_NAMES, MANIFEST_VALUES, max_size=5),
    VALUES,
)
MANIFEST_TEXT = st.one_of(
    MANIFEST_DOC.map(lambda d: json.dumps(d).encode()), st.text(UTF8_CHARS, max_size=60).map(str.encode), NOT_UTF8
)


def well_formed_inventory_listing(table: pa.Table) -> None:
    well_formed_listing(table)
    assert all(u.startswith("s3://") for u in table.column("uri").to_pylist())


@settings(SHARED_FIXTURES, max_examples=50)
@given(MANIFEST_TEXT)
@example(json.dumps({**VALID_MANIFESTS[0], "destinationBucket": "Bucket, Key"}).encode())  # ParamValidationError
def test_s3_inventory_manifests(inventory, scratch, manifest):
    """A local manifest.json naming data files on the loopback S3 server."""
    folder = fresh(scratch)
    path = folder / "manifest.json"
    path.write_bytes(manifest)
    table = listed(str(path), folder, inventory["storage_options"])
    if table is not None:
        well_formed_inventory_listing(table)


@st.composite
def inventory_csv(draw) -> tuple[str, bytes]:
    """A CSV inventory: a fileSchema and rows that may or may not match it, gzipped or not."""
    others = ["Bucket", "Key", "Size", "LastModifiedDate", "ETag", "IsLatest", "IsDeleteMarker", "VersionId"]
    names = draw(st.lists(st.sampled_from(others), min_size=1, max_size=5))
    if draw(st.integers(0, 3)):  # mostly a schema that names the bucket and the key first
        names = ["Bucket", "Key", *(n for n in names if n not in ("Bucket", "Key"))]
    cells = st.sampled_from(["photos", "a/b.jpg", "a%20b.JPG", "a+b.png", "", "7", "x", "true", "false",
                             "2024-01-01T00:00:00.000Z", "2024-13-45", '"']) | CELL  # fmt: skip
    width = st.just(len(names)) if draw(st.integers(0, 3)) else st.integers(1, len(names) + 1)  # mostly right
    rows = draw(st.lists(width.flatmap(lambda n: st.lists(cells, min_size=n, max_size=n)), max_size=5))
    sink = io.StringIO()
    csv.writer(sink, quoting=csv.QUOTE_ALL).writerows(rows)
    data = sink.getvalue().encode("utf-8")
    return ", ".join(names), gzip.compress(data) if draw(st.booleans()) else data


INVENTORY_DATA = st.one_of(
    st.tuples(
        st.just("Parquet"),
        st.just(""),
        arrow_tables(INVENTORY_TYPES, ["key", "version_id", "storage_class"]).map(parquet_bytes),
    ),
    inventory_csv().map(lambda t: ("CSV", *t)),
)


@settings(SHARED_FIXTURES, max_examples=40)
@given(INVENTORY_DATA)
@example(
    (
        "Parquet",
        "",
        parquet_bytes(
            pa.Table.from_arrays(
                [pa.array(["b"]), pa.array(["c"]), pa.array(["k.jpg"])], names=["bucket", "bucket", "key"]
            )
        ),
    )
)  # KeyError
@example(("CSV", "Bucket, Key, Key", b'"b","k.jpg","k.jpg"\n'))  # the same, from a CSV inventory's fileSchema
@example(("Parquet", "", parquet_bytes(pa.table({"bucket": [["b"]], "key": ["k.jpg"]}))))  # ArrowNotImplementedError
@example(("Parquet", "", parquet_bytes(pa.table({"bucket": [None, ""], "key": ["a.jpg", "b.jpg"]}))))  # uri None
def test_s3_inventory_data_files(inventory, scratch, data_file):
    """Generated inventory data (Parquet columns of any type; CSV rows against a fileSchema) uploaded to the
    loopback server under a fresh key, named by a manifest.json on that server."""
    from pipeline.storage import write_bytes_atomic

    fmt, schema, data = data_file
    options, bucket = inventory["storage_options"], inventory["bucket"]
    prefix = f"gen/{uuid.uuid4().hex[:12]}"
    key = f"{prefix}/data/part-0.{'parquet' if fmt == 'Parquet' else 'csv.gz'}"
    write_bytes_atomic(f"s3://{bucket}/{key}", data, options)
    manifest = {"destinationBucket": f"arn:aws:s3:::{bucket}", "fileFormat": fmt, "files": [{"key": key}]}
    if schema:
        manifest["fileSchema"] = schema
    url = f"s3://{bucket}/{prefix}/manifest.json"
    write_bytes_atomic(url, json.dumps(manifest).encode(), options)
    table = listed(url, fresh(scratch), options)
    if table is not None:
        well_formed_inventory_listing(table)


# -- config files -----------------------------------------------------------------------------------------------------
OPTION_NAMES = sorted({*RunConfig.model_fields, *SlidesConfig.model_fields}) + [
    "mpp", "overlap", "batch-size", "Batch_Size", "inputs", "config", "storage-options", "",
]  # fmt: skip
OPTION_VALUES = VALUES | st.sampled_from(
    ["auto", "float32", "cuda", "-1", "0", "1e9", '{"anon": true}', "[1]", "s3://b/x"]
)
CONFIG_NAMES = st.sampled_from(OPTION_NAMES) | TEXT | st.integers(-3, 3)
CONFIG_DOC = st.one_of(
    st.fixed_dictionaries(
        {"input": TEXT, "output": TEXT, "model": TEXT},
        optional={
            "batch_size": st.integers(-2, 64),
            "dtype": st.sampled_from(["auto", "float16", "float64", "bf16"]),
            "storage_options": st.sampled_from([{}, {"anon": True}, '{"anon": true}', "", "[]", 5]),
            "incremental": st.booleans() | st.sampled_from(["yes", "maybe", 2]),
            "target_mpp": st.floats(allow_nan=True, allow_infinity=True),
        },
    ),
    mutated({"input": "in", "output": "out", "model": "m"}, CONFIG_NAMES, OPTION_VALUES),
    st.dictionaries(CONFIG_NAMES, OPTION_VALUES, max_size=5),
    VALUES,
)
CONFIG_FILE = st.one_of(
    CONFIG_DOC.map(yaml_text).map(str.encode),
    st.text(UTF8_CHARS, max_size=80).map(str.encode),
    NOT_UTF8,
)


@SHARED_FIXTURES
@given(CONFIG_FILE, st.sampled_from([RunConfig, SlidesConfig]))
@example(b"input: \xff", RunConfig)  # not UTF-8: UnicodeDecodeError
@example(b'"a\\nb": 1\ninput: x\noutput: y\nmodel: m\n', RunConfig)  # an option name with a line break: two lines
def test_config_files(scratch, content, config_class):
    path = fresh(scratch) / "job.yaml"
    path.write_bytes(content)
    cfg = outcome(lambda: make_config(config_class, load_config_file(path)))
    event("read" if cfg is not None else "refused")
    if cfg is not None:
        assert isinstance(cfg, config_class) and isinstance(cfg.storage_options, dict)
        assert all(isinstance(getattr(cfg, name), str) for name in ("input", "output", "model"))


# -- --storage-options ------------------------------------------------------------------------------------------------
S3FS_OPTIONS = [
    "anon", "key", "secret", "token", "client_kwargs", "config_kwargs", "endpoint_url", "requester_pays",
    "default_block_size", "version_aware", "cache_regions", "use_ssl", "s3_additional_kwargs", "session",
    "asynchronous", "loop", "max_concurrency", "profile", "username", "password", "skip_instance_cache",
    "listings_expiry_time", "default_cache_type", "fixed_upload_size",
]  # fmt: skip
SECRET = "sEcReT-do-not-print-7"
CLIENT_KWARGS = st.dictionaries(
    st.sampled_from(["endpoint_url", "region_name", "verify", "aws_access_key_id", "config", "use_ssl"]) | TEXT,
    VALUES | st.sampled_from(["http://127.0.0.1:9", "us-east-1", "not a region", "http://[::1", SECRET]),
    max_size=3,
)
OPTIONS = st.dictionaries(st.sampled_from(S3FS_OPTIONS) | TEXT, VALUES | CLIENT_KWARGS | st.just(SECRET), max_size=4)
LOOPBACK = {"key": "k", "secret": SECRET, "client_kwargs": {"endpoint_url": "http://127.0.0.1:9", "region_name": "x"}}
STORAGE_OPTIONS_TEXT = st.one_of(
    mutated(LOOPBACK, st.sampled_from(S3FS_OPTIONS) | TEXT, VALUES | CLIENT_KWARGS).map(json.dumps),
    OPTIONS.map(json.dumps),
    VALUES.map(json.dumps),
    st.text(UTF8_CHARS, max_size=40),
    st.sampled_from(["", " ", "{", "[" * 5000, "1" * 5000, '{"a": NaN}', "null", "{}"]),
)


@pytest.fixture(scope="module")
def offline_aws():
    """botocore asks the instance metadata service for credentials when none are given: not here (no network; a
    probe would only add its timeout to every example)."""
    saved = os.environ.get("AWS_EC2_METADATA_DISABLED")
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    yield
    if saved is None:
        os.environ.pop("AWS_EC2_METADATA_DISABLED", None)
    else:
        os.environ["AWS_EC2_METADATA_DISABLED"] = saved


@settings(SHARED_FIXTURES, max_examples=40)
@given(STORAGE_OPTIONS_TEXT)
@example("[" * 100_000)  # deeper than the JSON decoder's recursion: RecursionError
@example("1" * 5000)  # longer than Python's int limit: a ValueError that is not a JSONDecodeError
@example('{"client_kwargs": 5}')  # wrong value types: AttributeError, ...
@example('{"config_kwargs": {"retries": 5}}')
@example('{"asynchronous": true}')  # RuntimeError: Loop is not running
@example('{"session": 5}')
@example('{"key": 5, "secret": null}')  # botocore's PartialCredentialsError
@example('{"profile": "no-such-profile"}')  # botocore's ProfileNotFound
@example('{"key": "k", "username": "u"}')  # s3fs's KeyError
def test_storage_options(offline_aws, text):
    options = outcome(lambda: parse_storage_options(text))
    if options is None:
        event("not an object")
        return
    assert isinstance(options, dict) and all(isinstance(k, str) for k in options)
    try:
        check_storage_options(["s3://bucket/in", "/local/out"], options)
        event("accepted")
    except UserError as exc:
        assert SECRET not in one_line(exc), "a secret in an error message"
        event("refused")


# -- the real CLI -----------------------------------------------------------------------------------------------------
def cli(*argv: str) -> tuple[int, str]:
    """`featurize ARGV` in this process: its exit status and what it wrote to stderr."""
    from pipeline.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = main(list(argv))
    return status, err.getvalue()


def refused(status: int, stderr: str) -> None:
    assert status == 2, (status, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("featurize: error: "), stderr


@settings(SHARED_FIXTURES, max_examples=12)
@given(LIST_FILE)
def test_featurize_manifest_over_generated_lists(scratch, list_file):
    suffix, content = list_file
    folder = fresh(scratch)
    (folder / f"list{suffix}").write_bytes(content)
    status, stderr = cli("manifest", str(folder / f"list{suffix}"), str(folder / "m.parquet"))
    if status == 0:
        well_formed_listing(pq.read_table(folder / "m.parquet"))
    else:
        refused(status, stderr)


BAD_FILES = {
    "prompts.yaml": b"{1: a, colour: b, concepts: [x]}",
    "deep.yaml": b"[" * 5000,
    "prompts.txt": b"\xff\xfe not utf-8",
    "job.yaml": b"input: \xff",
    "renamed.yaml": b"mpp: 0.5\n",
    "list.csv": b"uri,uri\na.jpg,b.jpg\n",
    "list.parquet": parquet_bytes(pa.table({"uri": [[1, 2]]})),
}
BAD_COMMANDS = {
    "prompts-keys": ["images", "IN", "OUT", "--model", "MODEL", "--prompts", "prompts.yaml"],
    "prompts-deep": ["images", "IN", "OUT", "--model", "MODEL", "--prompts", "deep.yaml"],
    "prompts-not-utf8": ["images", "IN", "OUT", "--model", "MODEL", "--prompts", "prompts.txt"],
    "config-not-utf8": ["images", "--config", "job.yaml"],
    "config-renamed": ["slides", "IN", "OUT", "--model", "MODEL", "--config", "renamed.yaml"],
    "list-csv": ["manifest", "list.csv", "m.parquet"],
    "list-parquet": ["manifest", "list.parquet", "m.parquet"],
    "storage-options-type": ["manifest", "s3://b/x", "m.parquet", "--storage-options", '{"client_kwargs": 5}'],
    "storage-options-deep": ["manifest", "s3://b/x", "m.parquet", "--storage-options", "[" * 100_000],
    "storage-options-session": ["report", "s3://b/out", "--out", "r.html", "--storage-options", '{"session": 5}'],
}


@pytest.mark.parametrize("argv", BAD_COMMANDS.values(), ids=BAD_COMMANDS.keys())
def test_bad_inputs_through_the_cli_exit_2_with_one_line(argv, tmp_path, monkeypatch):
    for name, data in BAD_FILES.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "IN").mkdir()
    (tmp_path / "MODEL").mkdir()  # exists, and is no model: a valid prompt file would still stop the command
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    refused(*cli(*argv))
    assert not {"m.parquet", "OUT", "r.html"} & set(os.listdir(tmp_path))
