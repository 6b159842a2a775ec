"""The probe suite: what users actually feed the CLI, each case ending in one line, exit 2, and
nothing written (docs/guarantees.md lists what is checked when). Internal bugs keep a traceback.

Run in-process through `rankwise.cli.app.main` (the same error path as the installed command,
without a subprocess's start-up per case); test_cli.py runs a few of the same cases as subprocesses.
"""

from __future__ import annotations

import errno
import json
import pickle
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_model, make_windows, model_output, word_text, word_tokenizer

import rankwise
import rankwise.cli.compress
from rankwise.cli.app import main
from rankwise.core.errors import CalibrationError, ModelNotFoundError, OutputNotWritableError
from rankwise.core.recipe import Recipe


def run_cli(
    args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> tuple[int, list[str]]:
    """Exit code and stderr lines of `rankwise ARGS` (0 when it returned normally)."""
    monkeypatch.setattr(sys, "argv", ["rankwise", *args])
    code = 0
    try:
        main()
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    return code, capsys.readouterr().err.strip().splitlines()


def one_error(lines: list[str]) -> str:
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, lines
    assert not any("Traceback" in line for line in lines)
    return errors[0]


@pytest.fixture
def dense_dir(tmp_path: Path) -> Path:
    """A tiny Llama with a word tokenizer, saved as a user's HF directory."""
    directory = tmp_path / "dense"
    make_model("llama").save_pretrained(directory)
    word_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture
def compressed_dir(tmp_path: Path) -> Path:
    recipe = Recipe(method="svd", ratio=0.3, allocation="uniform", calib_dtype="float32")
    result = rankwise.compress(make_model("llama"), recipe, windows=make_windows())
    return Path(rankwise.save(result, str(tmp_path / "compressed")))


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def compress_args(model: Path | str, *extra: str) -> list[str]:
    return ["compress", str(model), "--out", "out", "--method", "svd", "--ratio", "0.3", *extra]


# --- models ------------------------------------------------------------------------------------


def test_a_config_without_model_type(dense_dir: Path, in_tmp: Path, monkeypatch, capsys) -> None:
    config = json.loads((dense_dir / "config.json").read_text())
    del config["model_type"]
    (dense_dir / "config.json").write_text(json.dumps(config))
    code, lines = run_cli(compress_args(dense_dir), monkeypatch, capsys)
    line = one_error(lines)
    assert code == 2 and "config.json" in line and "model_type" in line
    assert list(in_tmp.iterdir()) == []


def test_a_config_that_is_not_json(dense_dir: Path, in_tmp: Path, monkeypatch, capsys) -> None:
    (dense_dir / "config.json").write_text("{not json")
    code, lines = run_cli(compress_args(dense_dir), monkeypatch, capsys)
    assert code == 2 and "not valid JSON" in one_error(lines)


class Payload:
    """Unpickling this writes a file: the proof that a pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.write_text, (self.marker, "executed"))


def test_pickle_only_weights_are_refused_and_never_run(
    dense_dir: Path, in_tmp: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    marker = tmp_path / "payload-ran"
    (dense_dir / "model.safetensors").unlink()
    with (dense_dir / "pytorch_model.bin").open("wb") as file:
        pickle.dump({"weight": Payload(marker)}, file)
    code, lines = run_cli(compress_args(dense_dir), monkeypatch, capsys)
    line = one_error(lines)
    assert code == 2 and "pytorch_model.bin" in line and "safetensors" in line
    assert "convert" in line
    assert not marker.exists()
    with pytest.raises(ModelNotFoundError, match="pickles"):
        rankwise.load_model(str(dense_dir))
    assert not marker.exists()


def test_a_truncated_compressed_model(compressed_dir: Path, monkeypatch, capsys) -> None:
    weights = compressed_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(ModelNotFoundError, match="truncated"):
        rankwise.load(compressed_dir)
    code, lines = run_cli(["eval", str(compressed_dir), "--windows", "1"], monkeypatch, capsys)
    line = one_error(lines)
    assert code == 2 and "model.safetensors" in line and "truncated" in line


def test_a_safetensors_file_with_a_broken_header(compressed_dir: Path) -> None:
    (compressed_dir / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{oops")
    with pytest.raises(ModelNotFoundError, match="model.safetensors"):
        rankwise.load(compressed_dir)


def test_a_missing_model(in_tmp: Path, monkeypatch, capsys) -> None:
    code, lines = run_cli(compress_args("no/such/model"), monkeypatch, capsys)
    assert code == 2 and "no/such/model" in one_error(lines)


# --- options: refused before the model is loaded --------------------------------------------


@pytest.fixture
def no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(rankwise.cli.compress, "load_model", refuse)


def test_an_unknown_method(in_tmp: Path, no_loading: None, monkeypatch, capsys) -> None:
    args = ["compress", "default", "--out", "out", "--method", "foo"]
    code, lines = run_cli(args, monkeypatch, capsys)
    line = one_error(lines)
    assert code == 2 and "'foo'" in line and "whiten" in line
    assert list(in_tmp.iterdir()) == []


def test_an_unknown_option(in_tmp: Path, no_loading: None, monkeypatch, capsys) -> None:
    code, lines = run_cli(compress_args("default", "--no-such-flag"), monkeypatch, capsys)
    assert code == 2 and any("no-such-flag" in line for line in lines)


def test_a_bad_dtype(in_tmp: Path, no_loading: None, monkeypatch, capsys) -> None:
    code, lines = run_cli(compress_args("default", "--calib-dtype", "int8"), monkeypatch, capsys)
    assert code == 2 and "calib_dtype" in one_error(lines)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (bytes(range(256)) * 12, "not UTF-8"),  # 3 KB of random-looking bytes
        ("\x01\x02\x03\x04 some text \x05\x06\x07\x08\x0b\x0c\x0e\x0f" * 50, "does not look"),
        ("", "empty"),
    ],
)
def test_calibration_files_that_are_not_text(
    in_tmp: Path, no_loading: None, monkeypatch, capsys, content: str | bytes, match: str
) -> None:
    path = in_tmp / "calib.txt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    code, lines = run_cli(compress_args("default", "--calib", str(path)), monkeypatch, capsys)
    line = one_error(lines)
    assert code == 2 and "calib" in line and match in line
    assert sorted(p.name for p in in_tmp.iterdir()) == ["calib.txt"]


def test_calibration_text_shorter_than_one_window(
    dense_dir: Path, in_tmp: Path, monkeypatch, capsys
) -> None:
    (in_tmp / "short.txt").write_text(word_text(10))
    args = compress_args(dense_dir, "--calib", "short.txt", "--method", "whiten", "--seq-len", "64")
    code, lines = run_cli(args, monkeypatch, capsys)
    line = one_error(lines)
    assert code == 2 and "too short" in line
    assert sorted(p.name for p in in_tmp.iterdir()) == ["short.txt"]


def test_fewer_windows_than_asked_is_a_warning_with_both_numbers(
    dense_dir: Path, in_tmp: Path, monkeypatch, capsys
) -> None:
    (in_tmp / "calib.txt").write_text(word_text(200))
    calib = ["--calib", "calib.txt", "--seq-len", "32", "--samples", "50"]
    args = compress_args(dense_dir, *calib, "--method", "whiten")
    code, lines = run_cli([*args, "--allocation", "uniform"], monkeypatch, capsys)
    assert code == 0
    warning = [line for line in lines if line.startswith("warning: calibration text gives")]
    assert len(warning) == 1 and "(asked 50)" in warning[0]
    assert (in_tmp / "out" / "model.safetensors").is_file()


# --- output ------------------------------------------------------------------------------------


def test_an_existing_output(dense_dir: Path, in_tmp: Path, monkeypatch, capsys) -> None:
    (in_tmp / "out").mkdir()
    (in_tmp / "out" / "keep.txt").write_text("mine")
    code, lines = run_cli(compress_args(dense_dir), monkeypatch, capsys)
    assert code == 2 and "--overwrite" in one_error(lines)
    assert (in_tmp / "out" / "keep.txt").read_text() == "mine"


def test_a_disk_that_fills_up_during_save(
    dense_dir: Path, in_tmp: Path, monkeypatch, capsys
) -> None:
    import rankwise.storage.saved

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rankwise.storage.saved, "save_file", full)
    code, lines = run_cli(compress_args(dense_dir), monkeypatch, capsys)
    line = one_error(lines)
    assert code == 2 and "disk filled up" in line and "nothing was written" in line
    assert list(in_tmp.iterdir()) == []


def test_a_disk_full_error_from_safetensors_text_is_recognised(tmp_path: Path) -> None:
    from rankwise.core.atomic import atomic_directory

    with pytest.raises(OutputNotWritableError), atomic_directory(tmp_path / "m"):
        raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")
    assert list(tmp_path.iterdir()) == []


# --- internal bugs keep their traceback ------------------------------------------------------


def test_an_internal_bug_is_not_dressed_as_a_user_error(
    dense_dir: Path, in_tmp: Path, monkeypatch, capsys
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(rankwise.cli.compress, "compress", broken)
    monkeypatch.setattr(sys, "argv", ["rankwise", *compress_args(dense_dir)])
    with pytest.raises(ZeroDivisionError):
        main()  # the installed command then exits 1 with the traceback
    assert list(in_tmp.iterdir()) == []


# --- the API gets the same named errors -------------------------------------------------------


def test_the_api_reads_calibration_files_with_the_same_checks(tmp_path: Path) -> None:
    from rankwise.data.corpora import read_user_text

    (tmp_path / "noise.txt").write_bytes(bytes(range(128, 256)) * 4)
    with pytest.raises(CalibrationError, match="not UTF-8"):
        read_user_text(tmp_path / "noise.txt")


def test_loading_twice_gives_the_same_network(compressed_dir: Path) -> None:
    first, second = rankwise.load(compressed_dir), rankwise.load(compressed_dir)
    assert [type(m).__name__ for m in first.modules()] == [
        type(m).__name__ for m in second.modules()
    ]
    ids = make_windows(1, 8)
    assert torch.equal(model_output(first, ids), model_output(second, ids))


@pytest.mark.parametrize("content", [b"not a gguf at all", b"GGUF\x03\x00\x00\x00" + b"\x00" * 20])
def test_a_gguf_file_that_is_not_one_or_is_cut_short(
    content: bytes, in_tmp: Path, monkeypatch, capsys
) -> None:
    (in_tmp / "model.gguf").write_bytes(content)
    code, lines = run_cli(compress_args(in_tmp / "model.gguf"), monkeypatch, capsys)
    line = one_error(lines)
    assert code == 2 and "model.gguf" in line
    assert sorted(p.name for p in in_tmp.iterdir()) == ["model.gguf"]
