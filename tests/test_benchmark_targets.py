"""The one-command target table (`python -m benchmarks.targets`): each record's checks become rows with the bound
they were held to, GPU records read from `checks`, CPU ones from `targets`; notes are not rows. No timing here:
the targets are measured by the benchmark, never by tests."""

from __future__ import annotations

from benchmarks import common, targets


def test_each_check_becomes_a_row_with_its_bound():
    cpu = {
        "targets": {
            "whole_over_loop": {"value": 1.52, "minimum": 1.5, "pass": True},
            "first_shard_s": {"value": 11.0, "maximum": 10.0, "pass": False},
            "limit": "a note, not a check",
        }
    }
    assert targets.rows("cclip", cpu) == [
        ("cclip", "whole_over_loop >= 1.5", 1.52, True),
        ("cclip", "first_shard_s < 10.0", 11.0, False),
    ]
    gpu = {
        "checks": {"busy_streaming": {"value": 0.953, "minimum": 0.95, "pass": True}},
        "targets": {"images_per_s": 1000.0},
    }
    assert targets.rows("gpu", gpu) == [("gpu", "busy_streaming >= 0.95", 0.953, True)]
    assert targets.rows("base", {}) == []


def test_a_bad_part_name_is_refused_by_name(capsys):
    try:
        targets.main(["--skip", "cclip,nope"])
    except SystemExit as exc:
        assert exc.code == 2
    else:
        raise AssertionError("an unknown part was accepted")
    err = capsys.readouterr().err
    assert "--skip: unknown part(s) ['nope']" in err and "first-shard" in err
    assert common.target_bound({"maximum": 10.0}) == "< 10.0"
