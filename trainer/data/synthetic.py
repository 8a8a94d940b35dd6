"""A synthetic preference task with a hidden ground truth ("say WORD N times").

Nothing can be downloaded here, so the demo and the tests align a tiny model on a task whose true
quality is a known function. A prompt asks for one word a number of times, in the HH format:

    "\\n\\nHuman: Say fox 4 times.\\n\\nAssistant:"  ->  " fox fox fox fox."

Ground truth (`ground_truth_score`): with c = how many words of the response are the asked word,
k = how many other words, n = the asked count,

    score = 1 - 0.25 * |c - n| - 0.25 * k          (1.0 = perfect; unbounded below)

Where the data come from: a noisy "writer" (`sample_response`) answers every prompt. It
UNDER-counts often (offsets -3..-1 from n, 46%), never over-counts, and sometimes puts a wrong word
in place of a right one (15%). Its answers are
- the SFT data, so the SFT policy is mediocre (about 45% of its answers are exactly right, mean
  true score about 0.75) and PPO has room to raise the ground-truth score;
- the preference pairs: two answers to the same prompt, the one with the higher true score is
  chosen (ties are redrawn).

Why a reward model can be gamed: since the writer never over-counts, no pair ever shows that too
many words is bad. The number of words (`proxy_feature`) is correlated with the truth on the data
but not identical to it: the chosen answer is the longer one in ~77% of the pairs, as long in ~16%,
and shorter in ~8% (a wrong word made the longer one worse). Off the data it keeps growing where
the truth falls (12 repetitions when 3 were asked score -1.25). A reward model that ranks the pairs
well (>= 95%) scores "more of the asked word" higher past the asked count. Measured while designing
the task with a stand-alone 2-layer, width-128 RoPE transformer on a byte-level BPE (seeds 1234
and 7): 98.4% / 98.8% test pair accuracy, and a reward that peaks at 6-8 repetitions whatever count
was asked. PPO without a KL penalty can climb that slope (reward up, true score down); the KL
penalty keeps the policy where the SFT policy puts mass (never past the asked count), where
"a bit longer" means "more often exactly right".

Everything is drawn from `random.Random` streams seeded with `"<seed>:<purpose>"`, so the same
seed gives byte-identical files on any machine. Texts are short: at most 6 asked words plus a
few prompt words, about 20 tokens with a byte-level BPE of 512 entries, so PPO rollouts of 16-32
new tokens are cheap.
"""

from __future__ import annotations

import json
import os
import random
import re
import string
from dataclasses import dataclass
from pathlib import Path

from common.errors import InvalidArgument
from trainer.data.format import FormatError, format_prompt, last_human_message

TASK_NAME = "say-word-n-times"
TASK_VERSION = 1

WORDS = (
    "cat", "dog", "sun", "red", "box", "cup", "hat", "pen", "map", "egg",
    "owl", "bee", "fox", "ink", "jam", "key", "leaf", "moon", "nut", "star",
)  # fmt: skip
TEMPLATES = ("Say {word} {n} times.", "Repeat {word} {n} times.", "Write the word {word} {n} times.")
MIN_COUNT, MAX_COUNT = 2, 6
PENALTY = 0.25  # per missing/extra asked word and per other word

# The noisy writer behind the SFT data and the preference pairs.
# It never over-counts: no labelled pair shows that too many is bad (see the module docstring).
COUNT_OFFSETS = (-3, -2, -1, 0)
OFFSET_WEIGHTS = (0.08, 0.14, 0.24, 0.54)
WRONG_WORD_PROB = 0.15


def _template_regex(template: str) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{word\}", r"(?P<word>[a-z]+)").replace(r"\{n\}", r"(?P<n>\d+)")
    return re.compile(f"^{pattern}$")


_PROMPT_RES = [_template_regex(t) for t in TEMPLATES]


@dataclass(frozen=True)
class Task:
    word: str
    count: int
    template: int = 0

    @property
    def prompt(self) -> str:
        return format_prompt(TEMPLATES[self.template].format(word=self.word, n=self.count))


def parse_prompt(prompt: str) -> Task:
    """Recover the task from its prompt (a full HH prompt or just the human message)."""
    try:
        message = last_human_message(prompt) if "Human:" in prompt else prompt.strip()
    except FormatError as exc:
        raise InvalidArgument("prompt", str(exc)) from None
    for template, regex in enumerate(_PROMPT_RES):
        match = regex.match(message)
        if match:
            return Task(word=match["word"], count=int(match["n"]), template=template)
    raise InvalidArgument("prompt", f"not a {TASK_NAME} prompt: {message!r}")


def response_words(response: str) -> list[str]:
    """Lower-cased words of a response, punctuation around each word removed."""
    words = (w.strip(string.punctuation).lower() for w in response.split())
    return [w for w in words if w]


def ground_truth_score(prompt: str, response: str) -> float:
    """The hidden true quality of `response` to `prompt` (1.0 is perfect; see module docstring)."""
    task = parse_prompt(prompt)
    words = response_words(response)
    right = sum(w == task.word for w in words)
    other = len(words) - right
    return 1.0 - PENALTY * abs(right - task.count) - PENALTY * other


def proxy_feature(prompt: str, response: str) -> float:
    """The shallow feature the preference pairs correlate with: the response's number of words."""
    del prompt  # the proxy ignores what was asked: that is what makes it a proxy
    return float(len(response_words(response)))


def sample_task(rng: random.Random) -> Task:
    return Task(rng.choice(WORDS), rng.randint(MIN_COUNT, MAX_COUNT), rng.randrange(len(TEMPLATES)))


def sample_response(rng: random.Random, task: Task) -> str:
    """One answer of the noisy writer: a count near (mostly below) the asked one, maybe a wrong word."""
    count = max(1, task.count + rng.choices(COUNT_OFFSETS, OFFSET_WEIGHTS)[0])
    words = [task.word] * count
    if rng.random() < WRONG_WORD_PROB:
        words[rng.randrange(count)] = rng.choice([w for w in WORDS if w != task.word])
    return " " + " ".join(words) + "."


def sample_pair(rng: random.Random, task: Task) -> tuple[str, str]:
    """(chosen, rejected): two writer answers with different true scores, better one first."""
    while True:
        a, b = sample_response(rng, task), sample_response(rng, task)
        sa, sb = ground_truth_score(task.prompt, a), ground_truth_score(task.prompt, b)
        if sa != sb:
            return (a, b) if sa > sb else (b, a)


def _write_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    os.replace(tmp, path)


def generate(output_dir: str | Path, seed: int = 1234, num_train: int = 4000, num_test: int = 500) -> dict:
    """Write the task's files (see docs/data.md) and return the `ground_truth.json` description.

    num_train / num_test: number of SFT examples (train / val), preference pairs and prompts per
    split.
    """
    for name, value in (("--num-train", num_train), ("--num-test", num_test)):
        if value < 1:
            raise InvalidArgument(name, f"must be >= 1, got {value}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    sizes = {"train": num_train, "test": num_test}
    stats: dict[str, dict] = {}

    for split, sft_name in (("train", "sft_train"), ("test", "sft_val")):
        rng = random.Random(f"{seed}:{split}:sft")
        sft = []
        for _ in range(sizes[split]):
            task = sample_task(rng)
            response = sample_response(rng, task)
            sft.append({"prompt": task.prompt, "response": response, "text": task.prompt + response})
        _write_jsonl(output_dir / f"{sft_name}.jsonl", sft)

        rng = random.Random(f"{seed}:{split}:pairs")
        comparisons, agree = [], 0
        for _ in range(sizes[split]):
            task = sample_task(rng)
            chosen, rejected = sample_pair(rng, task)
            comparisons += [{"text": task.prompt + chosen}, {"text": task.prompt + rejected}]
            agree += proxy_feature(task.prompt, chosen) > proxy_feature(task.prompt, rejected)
        _write_jsonl(output_dir / f"{split}_comparisons.jsonl", comparisons)

        rng = random.Random(f"{seed}:{split}:prompts")
        _write_jsonl(
            output_dir / f"{split}_prompts.jsonl",
            [{"text": sample_task(rng).prompt} for _ in range(sizes[split])],
        )

        scores = [ground_truth_score(r["prompt"], r["response"]) for r in sft]
        stats[split] = {
            f"{sft_name}_mean_true_score": sum(scores) / len(scores),
            f"{sft_name}_fraction_perfect": sum(s == 1.0 for s in scores) / len(scores),
            "pairs_where_longer_is_chosen": agree / sizes[split],
        }

    description = {
        "task": TASK_NAME,
        "version": TASK_VERSION,
        "seed": seed,
        "sizes": sizes,
        "words": list(WORDS),
        "templates": list(TEMPLATES),
        "count_range": [MIN_COUNT, MAX_COUNT],
        "ground_truth": f"1 - {PENALTY} * |c - n| - {PENALTY} * k  (c = asked word count, k = other words, n = asked count)",
        "ground_truth_function": "trainer.data.synthetic.ground_truth_score",
        "proxy_feature": "number of words in the response (trainer.data.synthetic.proxy_feature)",
        "writer": {
            "count_offsets": list(COUNT_OFFSETS),
            "offset_weights": list(OFFSET_WEIGHTS),
            "wrong_word_prob": WRONG_WORD_PROB,
        },
        "stats": stats,
        "files": {
            "sft": ["sft_train.jsonl", "sft_val.jsonl"],
            "comparisons": ["train_comparisons.jsonl", "test_comparisons.jsonl"],
            "prompts": ["train_prompts.jsonl", "test_prompts.jsonl"],
        },
    }
    tmp = output_dir / "ground_truth.json.tmp"
    tmp.write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, output_dir / "ground_truth.json")
    return description
