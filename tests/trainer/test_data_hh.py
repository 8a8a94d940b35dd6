"""Anthropic-HH conversion on the fixture in tests/fixtures/hh (its README lists what is where)."""

import gzip
import json
import shutil
from pathlib import Path

import pytest

from common.errors import InvalidArgument, NotFound
from trainer.data import format as fmt
from trainer.data import hh

FIXTURE = Path(__file__).parents[1] / "fixtures" / "hh"


def _texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


def _raw_records(path: Path) -> dict[int, dict]:
    """line number -> record, for the lines of a fixture file that parse."""
    opener = gzip.open if path.suffix == ".gz" else open
    out = {}
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            try:
                out[number] = json.loads(line)
            except json.JSONDecodeError:
                pass
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("hh_out")
    return hh.convert(FIXTURE, out), out


def test_split_dialogue_single_and_multi_turn():
    assert fmt.split_dialogue("\n\nHuman: Hi\n\nAssistant: Hello there.") == (
        "\n\nHuman: Hi\n\nAssistant:",
        " Hello there.",
    )
    text = "\n\nHuman: A?\n\nAssistant: B.\n\nHuman: C?\n\nAssistant: D."
    assert fmt.split_dialogue(text) == ("\n\nHuman: A?\n\nAssistant: B.\n\nHuman: C?\n\nAssistant:", " D.")
    with pytest.raises(fmt.FormatError, match="no Assistant turn"):
        fmt.split_dialogue("\n\nHuman: only a question")
    with pytest.raises(fmt.FormatError, match="no Human turn"):
        fmt.split_dialogue("\n\nAssistant: an answer to nobody")


def test_format_prompt_round_trips_with_split():
    prompt = fmt.format_prompt(["What's the capital of France?", "Paris.", "And of Italy?"])
    assert (
        prompt
        == "\n\nHuman: What's the capital of France?\n\nAssistant: Paris.\n\nHuman: And of Italy?\n\nAssistant:"
    )
    response = fmt.format_response("Rome is the capital of Italy.  ")
    assert fmt.split_dialogue(prompt + response) == (prompt, " Rome is the capital of Italy.")
    assert fmt.last_human_message(prompt) == "And of Italy?"
    with pytest.raises(fmt.FormatError):
        fmt.format_prompt(["question", "answer"])  # must end with a human turn


def test_counts_on_fixture(converted):
    reports, _ = converted
    train, test = reports["train"], reports["test"]
    assert (train.records, train.pairs) == (19, 14)
    assert dict(train.malformed) == {"bad_json": 1, "missing_key": 1, "no_assistant_turn": 1}
    assert dict(train.skipped) == {"prompt_mismatch": 1, "identical": 1}
    assert (test.records, test.pairs) == (8, 6)
    assert dict(test.malformed) == {"missing_key": 2}
    assert sum(test.skipped.values()) == 0


def test_problems_name_file_and_line(converted):
    reports, _ = converted
    train = [(Path(p.file).name, p.line, p.kind) for p in reports["train"].problems]
    assert train == [
        ("train.jsonl.gz", 6, "bad_json"),
        ("train.jsonl.gz", 8, "missing_key"),
        ("train.jsonl.gz", 10, "no_assistant_turn"),
    ]
    test = [(Path(p.file).name, p.line, p.kind) for p in reports["test"].problems]
    assert test == [("test.jsonl", 3, "missing_key"), ("test.jsonl", 5, "missing_key")]
    assert str(reports["train"].problems[1]).endswith("train.jsonl.gz:8: missing_key: no 'rejected' key")


def test_comparisons_are_consecutive_chosen_then_rejected(converted):
    _, out = converted
    records = _raw_records(FIXTURE / "train.jsonl.gz")
    usable = [n for n in sorted(records) if n not in (8, 10, 13, 14)]  # 6 does not parse
    comparisons = _texts(out / "train_comparisons.jsonl")
    prompts = _texts(out / "train_prompts.jsonl")
    assert len(comparisons) == 2 * len(usable) == 28
    assert len(prompts) == len(usable)
    for i, number in enumerate(usable):
        assert comparisons[2 * i] == records[number]["chosen"]
        assert comparisons[2 * i + 1] == records[number]["rejected"]
        assert comparisons[2 * i].startswith(prompts[i]) and comparisons[2 * i + 1].startswith(prompts[i])
        assert prompts[i].endswith(fmt.ASSISTANT)


def test_expected_prompt_and_responses_multi_turn(converted):
    _, out = converted
    comparisons = _texts(out / "train_comparisons.jsonl")
    prompts = _texts(out / "train_prompts.jsonl")
    i = 3  # fixture line 4
    assert (
        prompts[i]
        == "\n\nHuman: What's the capital of France?\n\nAssistant: Paris.\n\nHuman: And of Italy?\n\nAssistant:"
    )
    assert fmt.split_dialogue(comparisons[2 * i]) == (prompts[i], " Rome is the capital of Italy.")
    assert fmt.split_dialogue(comparisons[2 * i + 1]) == (prompts[i], " I think it is Milan.")
    assert any("Écris" in p for p in prompts)  # non-ASCII survives


def test_summary_json(converted):
    _, out = converted
    summary = json.loads((out / "summary.json").read_text())
    assert summary["splits"]["train"]["pairs"] == 14
    assert summary["splits"]["train"]["skipped"] == {"prompt_mismatch": 1, "identical": 1}
    assert summary["splits"]["test"]["problems"][0]["line"] == 3
    assert not list(out.glob("*.tmp"))


def test_strict_fails_on_first_malformed(tmp_path):
    with pytest.raises(InvalidArgument, match=r"train\.jsonl\.gz:6: bad_json"):
        hh.convert(FIXTURE, tmp_path, strict=True)
    assert not list(tmp_path.glob("train_*"))  # nothing half-written


def test_all_malformed_is_one_line_error(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "train.jsonl").write_text('{"chosen": "no markers", "rejected": "at all"}\nnot json\n')
    with pytest.raises(InvalidArgument) as err:
        hh.convert(src, tmp_path / "out")
    message = str(err.value)
    assert "\n" not in message
    assert "none of the 2 records" in message and "train.jsonl:1: no_assistant_turn" in message


def test_missing_input(tmp_path):
    with pytest.raises(NotFound, match="not a directory"):
        hh.convert(tmp_path / "nope", tmp_path / "out")
    with pytest.raises(NotFound, match="no train.jsonl"):
        hh.convert(tmp_path, tmp_path / "out")


def test_subset_folders_and_duplicate_files(tmp_path):
    src = tmp_path / "hh-rlhf"
    for subset in ("helpful-base", "harmless-base"):
        (src / subset).mkdir(parents=True)
        shutil.copy(FIXTURE / "train.jsonl.gz", src / subset / "train.jsonl.gz")
    reports = hh.convert(src, tmp_path / "out")
    assert list(reports) == ["train"]
    assert [Path(f).parent.name for f in reports["train"].files] == ["harmless-base", "helpful-base"]
    assert reports["train"].pairs == 28
    shutil.copy(FIXTURE / "test.jsonl", src / "helpful-base" / "train.jsonl")
    with pytest.raises(InvalidArgument, match="keep one"):
        hh.convert(src, tmp_path / "out2")
