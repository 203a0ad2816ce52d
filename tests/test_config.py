"""Configuration: the typed RunConfig, config files, and the CLI's one-line errors (through a real subprocess)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import _subparsers, build_parser, main, options_from_args
from pipeline.config import RunConfig, SlidesConfig, load_config_file, make_config
from pipeline.errors import UserError

REQUIRED = {"input": "/data/in", "output": "/data/out", "model": "/models/m", "prompts": "/p.yaml"}


# ------------------------------------------------------------------------------------------------ RunConfig
def test_valid_config_and_defaults():
    cfg = make_config(RunConfig, dict(REQUIRED))
    assert cfg.input == "/data/in" and cfg.model == "/models/m"
    assert cfg.trust_remote_code is False and cfg.dtype == "auto" and cfg.storage_options == {}
    assert cfg.max_image_pixels == 178_956_970 and cfg.decode_batch_size == 32


def test_unknown_option_is_named():
    with pytest.raises(UserError) as info:
        make_config(RunConfig, {**REQUIRED, "modle": "x", "batchsize": 4})
    msg = str(info.value)
    assert "modle" in msg and "batchsize" in msg and "unknown option" in msg
    assert "\n" not in msg


def test_missing_model_names_the_flag():
    options = dict(REQUIRED)
    del options["model"]
    with pytest.raises(UserError) as info:
        make_config(RunConfig, options)
    assert "--model" in str(info.value)


def test_missing_several_required():
    with pytest.raises(UserError) as info:
        make_config(RunConfig, {"input": "/x"})
    msg = str(info.value)
    for flag in ("OUTPUT as an argument", "--model"):  # OUTPUT is positional: never "--output"
        assert flag in msg
    assert "--prompts" not in msg  # optional: without it, a features-only run


@pytest.mark.parametrize(
    "value, expected",
    [
        (
            '{"anon": true, "client_kwargs": {"endpoint_url": "http://localhost:9000"}}',
            {"anon": True, "client_kwargs": {"endpoint_url": "http://localhost:9000"}},
        ),
        ("", {}),
        ("   ", {}),
        ({"key": "v"}, {"key": "v"}),
    ],
)
def test_storage_options_json_string(value, expected):
    assert make_config(RunConfig, {**REQUIRED, "storage_options": value}).storage_options == expected


def test_storage_options_bad_json_is_named():
    with pytest.raises(UserError) as info:
        make_config(RunConfig, {**REQUIRED, "storage_options": "{anon: true"})
    assert "storage_options" in str(info.value) and "JSON" in str(info.value)


@pytest.mark.parametrize(
    "key, value",
    [
        ("dtype", "float64"),
        ("batch_size", -1),
        ("device", "tpu"),
        ("max_image_pixels", 0),
        ("decode_batch_size", "many"),
    ],
)
def test_bad_values_are_named(key, value):
    with pytest.raises(UserError) as info:
        make_config(RunConfig, {**REQUIRED, key: value})
    assert key in str(info.value)


def test_config_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "input: /a\noutput: /b\nmodel: /m\nprompts: /p.yaml\nbatch-size: 8\ntrust-remote-code: true\n", encoding="utf-8"
    )
    options = load_config_file(path)
    assert options["batch_size"] == 8 and options["trust_remote_code"] is True
    cfg = make_config(RunConfig, options)
    assert cfg.batch_size == 8 and cfg.trust_remote_code


def test_config_file_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config_file(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("input: [unclosed\n", encoding="utf-8")
    with pytest.raises(UserError, match="not valid YAML") as info:
        load_config_file(bad)
    assert str(bad) in str(info.value)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(UserError, match="mapping"):
        load_config_file(listy)
    empty = tmp_path / "empty.yaml"
    empty.write_text("", encoding="utf-8")
    assert load_config_file(empty) == {}


def test_command_line_wins_over_config_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("input: /a\noutput: /b\nmodel: /from-file\nprompts: /p.yaml\nbatch_size: 8\n", encoding="utf-8")
    args = build_parser().parse_args(["images", "--config", str(path), "--model", "/from-cli", "--batch-size", "16"])
    cfg = make_config(RunConfig, options_from_args(args, RunConfig))
    assert cfg.model == "/from-cli" and cfg.batch_size == 16 and cfg.input == "/a"
    args = build_parser().parse_args(["images", "/in", "/out", "--config", str(path)])
    cfg = make_config(RunConfig, options_from_args(args, RunConfig))
    assert (cfg.input, cfg.output, cfg.model) == ("/in", "/out", "/from-file")


# ------------------------------------------------------------------------------- SlidesConfig: renamed options
def test_slides_options_carry_their_units():
    cfg = make_config(SlidesConfig, {**REQUIRED, "target_mpp": 0.25, "overlap_px": 16})
    assert (cfg.target_mpp, cfg.overlap_px, cfg.slide_mpp) == (0.25, 16, None)
    args = build_parser().parse_args(["slides", "/in", "/out", "--target-mpp", "1", "--overlap-px", "8"])
    assert (args.target_mpp, args.overlap_px) == (1.0, 8)
    assert not {"mpp", "overlap"} & set(vars(args))  # the old spellings only refuse; they set nothing
    usage = _subparsers(build_parser())["slides"].format_help()
    assert "--target-mpp" in usage and not re.search(r"--mpp\b|--overlap\b(?!-)", usage)  # nor are they shown


@pytest.mark.parametrize(
    "argv, old, new",
    [
        (["--mpp", "0.5"], "--mpp", "--target-mpp"),
        (["--mpp=0.5"], "--mpp", "--target-mpp"),
        (["--overlap", "16"], "--overlap", "--overlap-px"),
    ],
)
def test_old_slides_option_is_refused_naming_the_new_one(argv, old, new, capsys):
    with pytest.raises(SystemExit) as info:
        main(["slides", "/in", "/out", "--model", "/m", *argv])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"featurize: error: {old} is now {new} (see 'featurize slides --help')"), err
    assert "0.5" not in err and "16" not in err  # the value is never shown


def test_old_slides_keys_in_a_config_file_are_refused_naming_the_new_ones(tmp_path, capsys):
    path = tmp_path / "slides.yaml"
    path.write_text("model: /m\nmpp: 0.5\noverlap: 16\n", encoding="utf-8")
    with pytest.raises(UserError) as info:
        make_config(SlidesConfig, {**load_config_file(path), "input": "/in", "output": "/out"})
    assert str(info.value) == (
        "option mpp is now target_mpp (--target-mpp); option overlap is now overlap_px (--overlap-px)"
    )
    assert main(["slides", "/in", "/out", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert (
        err == "featurize: error: option mpp is now target_mpp (--target-mpp); option overlap is now "
        "overlap_px (--overlap-px)\n"
    )
    with pytest.raises(UserError, match="unknown option"):  # `featurize images` never had them
        make_config(RunConfig, {**REQUIRED, "mpp": 0.5})


# ------------------------------------------------------------------------------------------ CLI, end to end
def featurize_command() -> list[str]:
    script = Path(sys.executable).parent / "featurize"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "pipeline.cli"]


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    for name in ("RAY_ADDRESS", "FEATURIZE_DEBUG"):
        env.pop(name, None)
    return subprocess.run(featurize_command() + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode != 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith("featurize: error:"), line
    for needle in needles:
        assert needle in line, (needle, line)
    return line


@pytest.fixture()
def images_dir(tmp_path) -> Path:
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (32, 24), (10, 200, 30)).save(folder / "a.jpg")
    return folder


def test_cli_misspelt_key_in_config_file(tmp_path, images_dir, clip_model, prompts_file):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {clip_model}\nprompts: {prompts_file}\nbatch_szie: 8\n", encoding="utf-8")
    out = tmp_path / "out"
    proc = run_cli(["images", str(images_dir), str(out), "--config", str(cfg)], tmp_path)
    assert_one_line_error(proc, "batch_szie", "unknown option")
    assert not out.exists()


def test_cli_missing_model_folder(tmp_path, images_dir, prompts_file):
    missing = tmp_path / "models" / "nope"
    out = tmp_path / "out"
    proc = run_cli(
        ["images", str(images_dir), str(out), "--model", str(missing), "--prompts", str(prompts_file)], tmp_path
    )
    assert_one_line_error(proc, str(missing))
    assert not out.exists()


def test_cli_model_folder_without_config_json(tmp_path, images_dir, prompts_file):
    folder = tmp_path / "not_a_model"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"\x00" * 16)
    out = tmp_path / "out"
    proc = run_cli(
        ["images", str(images_dir), str(out), "--model", str(folder), "--prompts", str(prompts_file)], tmp_path
    )
    assert_one_line_error(proc, str(folder), "config.json")
    assert not out.exists()


def test_cli_missing_prompt_file(tmp_path, images_dir, clip_model):
    prompts = tmp_path / "missing_prompts.yaml"
    out = tmp_path / "out"
    proc = run_cli(
        ["images", str(images_dir), str(out), "--model", str(clip_model), "--prompts", str(prompts)], tmp_path
    )
    assert_one_line_error(proc, str(prompts), "does not exist")
    assert not out.exists()


def test_cli_malformed_prompt_file(tmp_path, images_dir, clip_model):
    prompts = tmp_path / "bad_prompts.yaml"
    prompts.write_text("concepts: [tumor, stroma\ntemplates: [\n", encoding="utf-8")
    out = tmp_path / "out"
    proc = run_cli(
        ["images", str(images_dir), str(out), "--model", str(clip_model), "--prompts", str(prompts)], tmp_path
    )
    assert_one_line_error(proc, str(prompts), "YAML")
    assert not out.exists()


def test_cli_input_folder_does_not_exist(tmp_path, clip_model, prompts_file):
    missing = tmp_path / "no_such_images"
    out = tmp_path / "out"
    proc = run_cli(
        ["images", str(missing), str(out), "--model", str(clip_model), "--prompts", str(prompts_file)], tmp_path
    )
    assert_one_line_error(proc, str(missing), "does not exist")
    assert not out.exists()


def test_cli_bad_storage_options(tmp_path, images_dir, clip_model, prompts_file):
    out = tmp_path / "out"
    proc = run_cli(
        [
            "images",
            str(images_dir),
            str(out),
            "--model",
            str(clip_model),
            "--prompts",
            str(prompts_file),
            "--storage-options",
            "{not json",
        ],
        tmp_path,
    )
    assert_one_line_error(proc, "storage_options")
    assert not out.exists()


def test_cli_remote_code_needs_trust_remote_code(tmp_path, images_dir, conceptclip_model, prompts_file):
    out = tmp_path / "out"
    proc = run_cli(
        ["images", str(images_dir), str(out), "--model", str(conceptclip_model), "--prompts", str(prompts_file)],
        tmp_path,
    )
    assert_one_line_error(proc, str(conceptclip_model), "--trust-remote-code")
    assert not out.exists()


def test_cli_module_entry_point_agrees(tmp_path, images_dir, clip_model):
    """`python -m pipeline.cli` gives the same one-line error as the console script."""
    prompts = tmp_path / "missing.txt"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("FEATURIZE_DEBUG", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "images",
            str(images_dir),
            str(tmp_path / "out"),
            "--model",
            str(clip_model),
            "--prompts",
            str(prompts),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert_one_line_error(proc, str(prompts))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["images", "manifest", "labels"])
def test_cli_storage_options_the_store_does_not_take_are_one_line(command, tmp_path, images_dir, clip_model):
    """An option s3fs does not know is refused before anything runs (it once crashed every decode task with a Ray
    traceback); a non-object is refused by every command alike (a list once reached fsspec.filesystem(**...))."""
    bogus = '{"key": "k", "secret": "sEcReT-42", "bogus_option": 1}'
    args = {
        "images": ["images", "s3://b/in", str(tmp_path / "out"), "--model", str(clip_model)],
        "manifest": ["manifest", "s3://b/in", str(tmp_path / "m.parquet")],
        "labels": ["labels", "s3://b/out", "--out", str(tmp_path / "l.csv")],
    }[command]
    line = assert_one_line_error(run_cli([*args, "--storage-options", bogus], tmp_path), "bogus_option")
    assert "s3://" in line and "sEcReT-42" not in line
    assert_one_line_error(run_cli([*args, "--storage-options", "[1, 2]"], tmp_path), "JSON object")
    assert not (tmp_path / "out").exists()
