"""`aligner data hh|synthetic` end to end: files, summary, exit codes, one-line errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from services.cli import main

FIXTURE = Path(__file__).parents[1] / "fixtures" / "hh"


def test_hh_end_to_end(tmp_path, capsys):
    assert main(["data", "hh", "--input", str(FIXTURE), "--output", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "train: 19 records in 1 file(s) -> 14 pairs" in captured.out
    assert "prompt_mismatch 1, identical 1" in captured.out
    assert "train.jsonl.gz:6: bad_json" in captured.err
    assert "test.jsonl:5: missing_key" in captured.err
    for name in ("train_comparisons.jsonl", "train_prompts.jsonl", "test_comparisons.jsonl", "summary.json"):
        assert (tmp_path / name).is_file()
    assert len((tmp_path / "test_comparisons.jsonl").read_text().splitlines()) == 12


def test_hh_errors_are_one_line(tmp_path, capsys):
    assert main(["data", "hh", "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("aligner data: error: --input:")

    assert main(["data", "hh", "--input", str(FIXTURE), "--output", str(tmp_path / "o"), "--strict"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.jsonl.gz:6: bad_json" in err


def test_synthetic_end_to_end(tmp_path, capsys):
    args = [
        "data",
        "synthetic",
        "--output",
        str(tmp_path),
        "--seed",
        "11",
        "--num-train",
        "50",
        "--num-test",
        "20",
    ]
    assert main(args) == 0
    assert "say-word-n-times" in capsys.readouterr().out
    info = json.loads((tmp_path / "ground_truth.json").read_text())
    assert info["seed"] == 11 and info["sizes"] == {"train": 50, "test": 20}
    assert len((tmp_path / "train_comparisons.jsonl").read_text().splitlines()) == 100

    assert main(["data", "synthetic", "--output", str(tmp_path), "--num-train", "0"]) == 2
    assert "--num-train: must be >= 1" in capsys.readouterr().err


def test_usage_errors_exit_nonzero(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["data"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["data", "hh", "--output", "x"])  # --input is required
    assert exc.value.code == 2
    assert "--input" in capsys.readouterr().err


@pytest.mark.integration
def test_console_entry_point(tmp_path):
    """The installed `aligner` script: exit code 2 and one line on stderr for a missing input."""
    aligner = Path(sys.executable).with_name("aligner")
    result = subprocess.run(
        [str(aligner), "data", "hh", "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "is not a directory" in result.stderr
    ok = subprocess.run(
        [
            str(aligner),
            "data",
            "synthetic",
            "--output",
            str(tmp_path / "s"),
            "--num-train",
            "5",
            "--num-test",
            "5",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
