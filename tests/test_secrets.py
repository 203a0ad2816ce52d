"""Credentials never leak: not through an abbreviated option, a usage error, provenance, an output file or the log."""

from __future__ import annotations

import io
import json
import sys

import pyarrow.parquet as pq
import pytest

from pipeline import cli, schema

MARKER = "MARKER-s3cr3t-9f2c"
FULL = "--storage-options"
PREFIXES = [FULL[:n] for n in range(3, len(FULL))]  # --s ... --storage-option


@pytest.fixture
def no_run(monkeypatch):
    """Fail loudly if a command would start (and so start Ray) instead of failing in the parser."""

    def refuse(args):
        raise AssertionError("the command ran; the parser should have refused it")

    monkeypatch.setattr(cli, "_cmd_images", refuse)
    monkeypatch.setattr(cli, "_cmd_manifest", refuse)


def _usage_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    out, err = capsys.readouterr()
    assert exc.value.code == 2, err
    assert MARKER not in out and MARKER not in err, err
    assert out == "" and err.count("\n") == 1 and err.startswith("featurize: error: "), err
    return err


@pytest.mark.parametrize("form", ["space", "equals"])
@pytest.mark.parametrize("prefix", PREFIXES)
def test_every_prefix_of_storage_options_is_refused_without_echoing_the_value(prefix, form, capsys, no_run):
    value = json.dumps({"secret": MARKER})
    option = [prefix, value] if form == "space" else [f"{prefix}={value}"]
    err = _usage_error(["images", "in", "out", "--model", "m", "--prompts", "p.yaml", *option], capsys)
    assert f"unrecognized arguments: {prefix}" in err, err
    assert err.rstrip("\n").endswith("(see 'featurize images --help')"), err


@pytest.mark.parametrize(
    "argv",
    [
        ["images", f'--storage-o={{"secret": "{MARKER}"}}', "out", "--model", "m", "--prompts", "p"],  # taken for INPUT
        ["images", "in", "out", f"-k{MARKER}"],
        ["images", "in", "out", f"stray-{MARKER}"],
        ["images", "in", "out", f"--incremental={MARKER}"],
        ["images", "in", "out", "--dtype", MARKER],
        ["images", "in", "out", "--rows-per-shard", MARKER],
        ["--storage-options", MARKER, "images", "in", "out"],
        ["heatmap", "out", "--out", "x.png", "--storage-opt", MARKER],
        ["manifest", "in", "m.parquet", f"--storage={MARKER}"],
        ["slides", "in", "out", f"--storage-options-x={MARKER}"],
    ],
)
def test_usage_errors_never_show_a_value(argv, capsys, no_run):
    _usage_error(argv, capsys)


def test_provenance_command_masks_by_destination_not_spelling(monkeypatch):
    parser = cli.build_parser()
    command = cli.masked_command(
        parser,
        [
            "images",
            "in",
            "out",
            "--storage-options",
            MARKER,
            "--model",
            "m",
            f"--storage-options={MARKER}",
            "--prompts",
            "p.yaml",
        ],
    )
    assert command == (
        "featurize images in out --storage-options **** --model m --storage-options=**** --prompts p.yaml"
    )
    assert (
        cli.masked_command(parser, ["heatmap", "o", "--storage-options", MARKER, "--out", "x.png"])
        == "featurize heatmap o --storage-options **** --out x.png"
    )
    assert schema.is_secret_dest("hf_token") and schema.is_secret_dest("aws_secret_access_key")
    assert not schema.is_secret_dest("keep_going") and not schema.is_secret_dest("monkey")
    # Library use (no parser): sys.argv is masked by the same rules, abbreviations of --storage-options included.
    monkeypatch.setattr(
        sys, "argv", ["job.py", "--storage-o", MARKER, f"--hf-token={MARKER}", "--api-key", MARKER, "--model", "m"]
    )
    schema.set_command(None)
    prov = schema.provenance({}, "h", "r")
    assert MARKER not in json.dumps(prov)
    assert prov["command"] == "job.py --storage-o **** --hf-token=**** --api-key **** --model m"
    schema.set_command("featurize images ...")
    try:
        assert schema.provenance({}, "h", "r")["command"] == "featurize images ..."
    finally:
        schema.set_command(None)


def _scan_output(fs, root: str, needles: list[str]) -> list[str]:
    fs.invalidate_cache()
    paths = fs.find(root)
    for path in paths:
        content = fs.cat_file(path)
        for needle in needles:
            assert needle.encode() not in content, (needle, path)
    return paths


def _shard_command(fs, paths: list[str]) -> str:
    shard = next(p for p in paths if p.rsplit("/", 1)[-1].startswith("part-"))
    meta = pq.ParquetFile(io.BytesIO(fs.cat_file(shard))).schema_arrow.metadata
    return json.loads(meta[b"pipeline.provenance"])["command"]


def test_real_run_to_s3_keeps_credentials_out_of_every_output_and_the_log(
    ray_session, s3_server, s3_bucket, conceptclip_model, prompts_file, photo_dir, tmp_path, capfd
):
    import s3fs

    options = s3_server["storage_options"]
    needles = [options["key"], options["secret"]]
    fs = s3fs.S3FileSystem(**options)
    common = [
        str(photo_dir),
        "--model",
        str(conceptclip_model),
        "--prompts",
        str(prompts_file),
        "--trust-remote-code",
        "--rows-per-shard",
        "8",
        "--batch-size",
        "4",
        "--decode-batch-size",
        "4",
    ]
    expected = {"_prompts.parquet", "_run.json", "_dataset.json", "_listing.parquet"}

    # 1. Credentials on the command line, spelt in full.
    out_cli = f"s3://{s3_bucket}/out"
    assert cli.main(["images", common[0], out_cli, *common[1:], FULL, json.dumps(options)]) == 0
    paths = _scan_output(fs, f"{s3_bucket}/out", needles)
    names = {p.split("/out/", 1)[1] for p in paths}
    assert expected <= names and any(n.startswith("part-") for n in names), names
    assert any(n.startswith("_runs/") and n.endswith(".json") for n in names), names
    assert any(n.endswith(".plan.parquet") for n in names), names
    command = _shard_command(fs, paths)
    assert f"{FULL} ****" in command and command.startswith("featurize images "), command

    # 2. Credentials in a --config file.
    config = tmp_path / "job.yaml"
    config.write_text(json.dumps({"storage_options": options}), encoding="utf-8")  # JSON is YAML
    out_config = f"s3://{s3_bucket}/out-config"
    assert cli.main(["images", common[0], out_config, *common[1:], "--config", str(config)]) == 0
    paths = _scan_output(fs, f"{s3_bucket}/out-config", needles)
    assert expected <= {p.split("/out-config/", 1)[1] for p in paths}
    command = _shard_command(fs, paths)
    assert f"--config {config}" in command, command

    captured = capfd.readouterr()
    for needle in needles:
        assert needle not in captured.out and needle not in captured.err, needle
    assert "featurize: run " in captured.err
