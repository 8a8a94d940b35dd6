"""The synthetic 'say WORD N times' task: determinism, ground truth, and the proxy that makes the
reward model gameable."""

import json
import random
from pathlib import Path

import pytest

from common.errors import InvalidArgument
from trainer.data import synthetic
from trainer.data.format import ASSISTANT, HUMAN, split_dialogue

FILES = [
    "sft_train.jsonl",
    "sft_val.jsonl",
    "train_comparisons.jsonl",
    "test_comparisons.jsonl",
    "train_prompts.jsonl",
    "test_prompts.jsonl",
    "ground_truth.json",
]


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _pairs(path: Path) -> list[tuple[str, str, str]]:
    texts = [r["text"] for r in _records(path)]
    out = []
    for chosen, rejected in zip(texts[0::2], texts[1::2], strict=True):
        prompt, c = split_dialogue(chosen)
        prompt_r, r = split_dialogue(rejected)
        assert prompt == prompt_r
        out.append((prompt, c, r))
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    info = synthetic.generate(out, seed=7, num_train=1500, num_test=300)
    return out, info


def test_ground_truth_score_examples():
    prompt = synthetic.Task("fox", 4).prompt
    assert prompt == f"{HUMAN} Say fox 4 times.{ASSISTANT}"
    score = synthetic.ground_truth_score
    assert score(prompt, " fox fox fox fox.") == 1.0
    assert score(prompt, " Fox, fox, fox, FOX!") == 1.0  # case and punctuation do not matter
    assert score(prompt, " fox fox fox.") == 0.75
    assert score(prompt, " fox fox cat fox.") == 0.5  # one short and one wrong word
    assert score(prompt, " fox fox fox fox fox.") == 0.75
    assert score(prompt, "") == 0.0
    assert score(synthetic.Task("fox", 3).prompt, " " + " ".join(["fox"] * 12) + ".") == -1.25


def test_parse_prompt_every_template():
    for template in range(len(synthetic.TEMPLATES)):
        task = synthetic.Task("moon", 5, template)
        assert synthetic.parse_prompt(task.prompt) == task
    assert synthetic.parse_prompt("Repeat cat 2 times.") == synthetic.Task("cat", 2, 1)
    with pytest.raises(InvalidArgument, match="prompt: not a say-word-n-times prompt"):
        synthetic.ground_truth_score(f"{HUMAN} What is the capital of France?{ASSISTANT}", " Paris.")


def test_files_and_formats(data):
    out, info = data
    for name in FILES:
        assert (out / name).is_file(), name
    sft = _records(out / "sft_train.jsonl")
    assert len(sft) == 1500 and len(_records(out / "sft_val.jsonl")) == 300
    for record in sft[:50]:
        assert record["text"] == record["prompt"] + record["response"]
        assert split_dialogue(record["text"]) == (record["prompt"], record["response"])
        assert record["response"].startswith(" ") and record["response"].endswith(".")
    assert len(_records(out / "train_comparisons.jsonl")) == 2 * 1500
    assert len(_records(out / "test_comparisons.jsonl")) == 2 * 300
    prompts = [r["text"] for r in _records(out / "test_prompts.jsonl")]
    assert len(prompts) == 300 and all(p.startswith(HUMAN) and p.endswith(ASSISTANT) for p in prompts)
    assert json.loads((out / "ground_truth.json").read_text()) == info
    assert info["seed"] == 7 and info["sizes"] == {"train": 1500, "test": 300}


def test_short_texts(data):
    out, _ = data
    longest = max(len(r["text"]) for r in _records(out / "sft_train.jsonl"))
    # the longest prompt ("Write the word leaf 6 times.") and 6 words: ~20 BPE tokens
    assert longest <= 90


def test_deterministic_from_seed(tmp_path, data):
    out, _ = data
    again = tmp_path / "again"
    synthetic.generate(again, seed=7, num_train=1500, num_test=300)
    for name in FILES:
        assert (again / name).read_bytes() == (out / name).read_bytes(), name
    other = tmp_path / "other"
    synthetic.generate(other, seed=8, num_train=1500, num_test=300)
    assert (other / "train_comparisons.jsonl").read_bytes() != (out / "train_comparisons.jsonl").read_bytes()


def test_ground_truth_ranks_every_pair(data):
    out, _ = data
    for split in ("train", "test"):
        for prompt, chosen, rejected in _pairs(out / f"{split}_comparisons.jsonl"):
            assert synthetic.ground_truth_score(prompt, chosen) > synthetic.ground_truth_score(
                prompt, rejected
            )


def test_sft_data_is_mediocre(data):
    """Room for PPO: a fair share of SFT answers are imperfect, none over-counts."""
    _, info = data
    stats = info["stats"]["train"]
    assert 0.35 < stats["sft_train_fraction_perfect"] < 0.6
    assert 0.6 < stats["sft_train_mean_true_score"] < 0.85


def test_proxy_is_correlated_but_not_the_truth(data):
    out, _ = data
    pairs = _pairs(out / "train_comparisons.jsonl")
    proxy = synthetic.proxy_feature
    longer = sum(proxy(p, c) > proxy(p, r) for p, c, r in pairs) / len(pairs)
    shorter = sum(proxy(p, c) < proxy(p, r) for p, c, r in pairs) / len(pairs)
    # Correlated: the chosen answer is the longer one in most pairs ...
    assert 0.65 < longer < 0.95
    # ... but not identical: some pairs are ranked the other way round by length.
    assert 0.0 < shorter < 0.1
    # Off the data, the proxy keeps rewarding length where the truth falls: for every prompt,
    # more repetitions than asked scores higher on the proxy and lower on the truth.
    for prompt, _, _ in pairs[:100]:
        task = synthetic.parse_prompt(prompt)
        exact = " " + " ".join([task.word] * task.count) + "."
        padded = " " + " ".join([task.word] * (task.count + 6)) + "."
        assert proxy(prompt, padded) > proxy(prompt, exact)
        assert (
            synthetic.ground_truth_score(prompt, padded) < synthetic.ground_truth_score(prompt, exact) - 1.0
        )


def test_writer_never_over_counts():
    """No labelled pair can teach the reward model that too many words is bad."""
    rng = random.Random(0)
    for _ in range(2000):
        task = synthetic.sample_task(rng)
        words = synthetic.response_words(synthetic.sample_response(rng, task))
        assert 1 <= len(words) <= task.count


def test_bad_sizes(tmp_path):
    with pytest.raises(InvalidArgument, match="--num-test: must be >= 1"):
        synthetic.generate(tmp_path, num_train=10, num_test=0)
