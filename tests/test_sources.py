"""Listing inputs: folders, globs and list files (.txt/.csv/.parquet) on the local disk, as real files."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import UserError
from pipeline.sources import LISTING_SCHEMA, image_id, list_inputs


def touch(path: Path, size: int = 10) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    return path


@pytest.fixture()
def tree(tmp_path) -> Path:
    """A folder with nested images, hidden files and folders, and files that are not images."""
    root = tmp_path / "data"
    for i, rel in enumerate(
        [
            "b.jpg",
            "a.PNG",
            "z.jpeg",
            "sub/c.tif",
            "sub/deeper/d.webp",
            "sub/deeper/e.gif",
            "other/f.bmp",
            "other/g with space.jpg",
            "other/ünï.png",
        ]
    ):
        touch(root / rel, size=10 + i)
    for rel in [
        ".hidden.jpg",
        "sub/.also_hidden.png",
        ".cache/h.jpg",
        "sub/.git/i.png",
        "notes.txt",
        "sub/data.csv",
        "sub/deeper/model.safetensors",
        "noext",
        "sub/x.jpg.bak",
    ]:
        touch(root / rel)
    (root / "empty_dir").mkdir()
    (root / "dir.jpg").mkdir()  # a folder that looks like an image
    return root


EXPECTED = [
    "a.PNG",
    "b.jpg",
    "other/f.bmp",
    "other/g with space.jpg",
    "other/ünï.png",
    "sub/c.tif",
    "sub/deeper/d.webp",
    "sub/deeper/e.gif",
    "z.jpeg",
]


def test_folder_listing(tree):
    table = list_inputs(str(tree))
    assert table.schema == LISTING_SCHEMA
    uris = table.column("uri").to_pylist()
    assert uris == sorted(str(tree / rel) for rel in EXPECTED)
    assert uris == sorted(uris)
    for row in table.to_pylist():
        st = os.stat(row["uri"])
        assert row["size"] == st.st_size
        assert row["mtime"] == pytest.approx(st.st_mtime)
        assert row["etag"] is None


def test_folder_listing_is_absolute_and_sorted_from_a_relative_path(tree, monkeypatch):
    monkeypatch.chdir(tree.parent)
    table = list_inputs("data/")
    assert table.column("uri").to_pylist() == sorted(str(tree / rel) for rel in EXPECTED)
    assert list_inputs(f"file://{tree}").column("uri").to_pylist() == table.column("uri").to_pylist()


def test_listing_sees_changed_size_and_mtime(tree):
    before = {r["uri"]: r for r in list_inputs(str(tree)).to_pylist()}
    path = tree / "b.jpg"
    path.write_bytes(b"y" * 1234)
    os.utime(path, (1_600_000_000, 1_600_000_000))
    after = {r["uri"]: r for r in list_inputs(str(tree)).to_pylist()}
    assert after[str(path)]["size"] == 1234 and after[str(path)]["mtime"] == 1_600_000_000
    assert before[str(path)]["size"] != 1234


def test_glob(tree):
    table = list_inputs(str(tree / "**" / "*.jpg"))
    assert table.column("uri").to_pylist() == sorted([str(tree / "b.jpg"), str(tree / "other/g with space.jpg")])
    table = list_inputs(str(tree / "sub" / "*"))  # one level, non-images and folders dropped
    assert table.column("uri").to_pylist() == [str(tree / "sub/c.tif")]
    row = table.to_pylist()[0]
    assert row["size"] == os.stat(tree / "sub/c.tif").st_size and row["mtime"] is not None


def test_glob_matching_nothing_is_user_error(tree):
    with pytest.raises(UserError, match="holds no images"):
        list_inputs(str(tree / "*.nothing"))


def test_txt_list(tmp_path, tree, monkeypatch):
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "local.jpg").write_bytes(b"x")
    text = (
        "\n".join(
            [
                "# a comment",
                "",
                "local.jpg",
                "  ../data/b.jpg  ",
                str(tree / "sub/c.tif"),
                "   ",
                "# another comment",
                "s3://bucket/key/img.png",
                "images/not listed yet.jpg",
            ]
        )
        + "\n"
    )
    (lists / "inputs.txt").write_text(text, encoding="utf-8")
    expected = sorted(
        [
            str(lists / "local.jpg"),
            str(tree / "b.jpg"),
            str(tree / "sub/c.tif"),
            "s3://bucket/key/img.png",
            str(lists / "images/not listed yet.jpg"),
        ]
    )
    table = list_inputs(str(lists / "inputs.txt"))
    assert table.schema == LISTING_SCHEMA
    assert table.column("uri").to_pylist() == expected
    # Each listed file is looked up (so --incremental sees a changed file); what cannot be found stays null.
    sizes = dict(zip(table.column("uri").to_pylist(), table.column("size").to_pylist()))
    mtimes = dict(zip(table.column("uri").to_pylist(), table.column("mtime").to_pylist()))
    for uri in expected:
        path = Path(uri)
        assert sizes[uri] == (path.stat().st_size if path.exists() else None)
        assert mtimes[uri] == (path.stat().st_mtime if path.exists() else None)
    assert sizes["s3://bucket/key/img.png"] is None
    # A relative list path resolves against the list file's folder, not the working directory.
    monkeypatch.chdir(tree)
    rel = os.path.relpath(lists / "inputs.txt", tree)
    assert list_inputs(rel).column("uri").to_pylist() == expected


def test_txt_list_with_crlf_line_endings(tmp_path):
    (tmp_path / "l.txt").write_bytes(b"a.jpg\r\nb.jpg\r\n\r\n# c\r\n")
    assert list_inputs(str(tmp_path / "l.txt")).column("uri").to_pylist() == [
        str(tmp_path / "a.jpg"),
        str(tmp_path / "b.jpg"),
    ]


def test_txt_list_with_byte_order_mark(tmp_path):
    (tmp_path / "l.txt").write_bytes("a.jpg\nb.jpg\n".encode("utf-8-sig"))
    assert list_inputs(str(tmp_path / "l.txt")).column("uri").to_pylist() == [
        str(tmp_path / "a.jpg"),
        str(tmp_path / "b.jpg"),
    ]


def test_csv_list(tmp_path, tree):
    folder = tmp_path / "csv"
    folder.mkdir()
    (folder / "inputs.csv").write_text(
        f'label,uri\n1,one.jpg\n2,{tree / "b.jpg"}\n3,"with, comma.png"\n4,gs://bucket/x.jpg\n', encoding="utf-8"
    )
    table = list_inputs(str(folder / "inputs.csv"))
    assert table.schema == LISTING_SCHEMA
    assert table.column("uri").to_pylist() == sorted(
        [str(folder / "one.jpg"), str(tree / "b.jpg"), str(folder / "with, comma.png"), "gs://bucket/x.jpg"]
    )


def test_parquet_list_and_manifest(tmp_path, tree):
    folder = tmp_path / "pq"
    folder.mkdir()
    pq.write_table(
        pa.table({"uri": ["z.jpg", str(tree / "b.jpg"), "a/y.png"], "other": [1, 2, 3]}), folder / "inputs.parquet"
    )
    table = list_inputs(str(folder / "inputs.parquet"))
    assert table.column("uri").to_pylist() == sorted(
        [str(folder / "z.jpg"), str(tree / "b.jpg"), str(folder / "a/y.png")]
    )
    # A manifest carries size, mtime and etag through, row by row.
    pq.write_table(
        pa.table(
            {"uri": ["s3://b/2.jpg", "s3://b/1.jpg"], "size": [20, 10], "mtime": [2.5, 1.5], "etag": ["e2", None]}
        ),
        folder / "manifest.parquet",
    )
    rows = list_inputs(str(folder / "manifest.parquet")).to_pylist()
    assert rows == [
        {"uri": "s3://b/1.jpg", "size": 10, "mtime": 1.5, "etag": None},
        {"uri": "s3://b/2.jpg", "size": 20, "mtime": 2.5, "etag": "e2"},
    ]


@pytest.mark.parametrize(
    "name, write",
    [
        ("no_uri.csv", lambda p: p.write_text("path,label\na.jpg,1\n", encoding="utf-8")),
        ("no_uri.parquet", lambda p: pq.write_table(pa.table({"path": ["a.jpg"]}), p)),
    ],
)
def test_list_without_uri_column(tmp_path, name, write):
    path = tmp_path / name
    write(path)
    with pytest.raises(UserError, match="uri") as info:
        list_inputs(str(path))
    assert str(path) in str(info.value)
    assert "path" in str(info.value)  # the columns it does have


def test_unreadable_list_file_is_user_error(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(UserError) as info:
        list_inputs(str(path))
    assert str(path) in str(info.value)


@pytest.mark.parametrize("name", ["missing_folder", "missing.txt", "missing.csv", "missing.parquet"])
def test_missing_input(tmp_path, name):
    source = str(tmp_path / name)
    with pytest.raises(UserError, match="does not exist") as info:
        list_inputs(source)
    assert source in str(info.value)


def test_empty_inputs(tmp_path, tree):
    empty = tmp_path / "empty"
    empty.mkdir()
    touch(empty / "readme.md")
    touch(empty / ".hidden.jpg")
    (tmp_path / "comments.txt").write_text("# nothing here\n\n", encoding="utf-8")
    for source in (str(empty), str(tmp_path / "comments.txt")):
        with pytest.raises(UserError, match="holds no images") as info:
            list_inputs(source)
        assert source in str(info.value)


def test_single_image_file_is_user_error(tree):
    with pytest.raises(UserError, match="is a file") as info:
        list_inputs(str(tree / "b.jpg"))
    assert str(tree / "b.jpg") in str(info.value)


def test_symlink_cycle(tmp_path):
    root = tmp_path / "root"
    touch(root / "sub" / "a.jpg")
    os.symlink("..", root / "sub" / "up")
    table = list_inputs(str(root))
    real = [os.path.realpath(u) for u in table.column("uri").to_pylist()]
    assert real == [str((root / "sub" / "a.jpg").resolve())]


def test_image_id():
    a = image_id("/data/a.jpg")
    assert a == image_id("/data/a.jpg")
    assert len(a) == 24 and all(c in "0123456789abcdef" for c in a)
    ids = {
        image_id(u)
        for u in ["/data/a.jpg", "/data/b.jpg", "/data/a.JPG", "s3://data/a.jpg", "/data/a.jpg ", "/data/ü.jpg"]
    }
    assert len(ids) == 6
    # Stable across processes and versions: it is part of the output format.
    assert image_id("s3://bucket/x.jpg") == __import__("hashlib").sha256(b"s3://bucket/x.jpg").hexdigest()[:24]


def test_a_folder_whose_name_looks_like_a_glob_is_taken_literally(tmp_path):
    """`scans [2024]` exists: it is that folder (not the pattern `scans 2`, `scans 0`, ...), as INPUT, inside a
    glob, and for `featurize manifest`; a pattern is a glob only where nothing by its exact name exists."""
    from pipeline.sources import write_manifest

    scans = tmp_path / "scans [2024]"
    touch(scans / "a.jpg")
    touch(scans / "sub" / "b.png")
    touch(tmp_path / "scans 2" / "decoy.jpg")
    expected = [str(scans / "a.jpg"), str(scans / "sub" / "b.png")]
    assert list_inputs(str(scans)).column("uri").to_pylist() == expected
    assert list_inputs(str(scans / "*.jpg")).column("uri").to_pylist() == expected[:1]
    assert list_inputs(str(scans / "**" / "*.png")).column("uri").to_pylist() == expected[1:]
    assert write_manifest(str(scans), str(tmp_path / "m.parquet")).column("uri").to_pylist() == expected
    decoy = [str(tmp_path / "scans 2" / "decoy.jpg")]
    assert list_inputs(str(tmp_path / "scans [2]" / "*.jpg")).column("uri").to_pylist() == decoy  # no such folder


def test_uris_in_lists_are_normalised_the_same_way_everywhere(tmp_path):
    """`..` and `.` segments resolve, for relative and absolute uris, local and object-store ones alike."""
    lists = tmp_path / "lists"
    touch(tmp_path / "img" / "a.jpg")
    (lists).mkdir()
    (lists / "l.txt").write_text(
        "../img/a.jpg\n./../img/./a.jpg\ns3://b/lists/../img/c.jpg\ns3://b/x/./y/../d.jpg\n", encoding="utf-8"
    )
    uris = sorted(set(list_inputs(str(lists / "l.txt")).column("uri").to_pylist()))
    assert uris == [str(tmp_path / "img" / "a.jpg"), "s3://b/img/c.jpg", "s3://b/x/d.jpg"]
