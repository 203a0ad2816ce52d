"""One-line answers to the small mistakes a newcomer makes on a fresh clone (issue 22's list): each a clear line and
exit status 2, or a right answer."""

from __future__ import annotations

import json

import pytest

from pipeline.cli import main
from pipeline.decode import open_image
from pipeline.errors import InputError


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_a_missing_input_says_to_give_it_as_an_argument(capsys):
    assert main(["images", "--model", "m"]) == 2
    err = one_line(capsys)
    assert "give INPUT as an argument" in err and "pass --input" not in err


@pytest.mark.parametrize("typo,meant", [("--prompt", "--prompts"), ("--storage-option", "--storage-options")])
def test_a_mistyped_option_gets_the_closest_one(typo, meant, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["images", "in", "out", "--model", "m", typo, "x"])
    assert exit_info.value.code == 2
    assert f"did you mean {meant}?" in one_line(capsys)


def test_help_shows_no_pydantic_placeholder(capsys):
    with pytest.raises(SystemExit):
        main(["images", "--help"])
    assert "PydanticUndefined" not in capsys.readouterr().out


def test_a_dry_run_into_an_output_that_is_a_file(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "out").write_text("a file")
    assert main(["images", str(tmp_path / "in"), str(tmp_path / "out"), "--model", "m", "--dry-run"]) == 2
    assert "is a file, not a folder" in one_line(capsys)


def test_error_reasons_carry_no_memory_addresses():
    with pytest.raises(InputError) as info:
        open_image(b"not an image at all" * 10, 10**8)
    assert "0x" not in str(info.value) and "BytesIO" not in str(info.value)


def test_analysis_on_an_output_without_shards_says_so(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "_dataset.json").write_text(json.dumps({"identity": {"model": "m", "kind": "clip"}, "version": 1}))
    for args in (
        ["labels", str(out), "--out", str(tmp_path / "l.csv")],
        ["report", str(out), "--out", str(tmp_path / "r.html")],
    ):
        assert main(args) == 2
        err = one_line(capsys)
        assert "holds no shards" in err and "features-only" not in err


def test_negative_counts_are_refused(tmp_path, capsys):
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r.html"), "--max-slides", "-1"]) == 2
    assert "--max-slides must be 0 or more" in one_line(capsys)
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r.html"), "--top-k", "51"]) == 2
    assert "--top-k must be 0 to 50, not 51" in one_line(capsys)
