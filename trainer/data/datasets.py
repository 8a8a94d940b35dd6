"""Readers and torch Datasets over the jsonl files of `aligner data` (formats: docs/data.md).

- `read_jsonl`: records of a jsonl / jsonl.gz file; errors name the file and line.
- `ComparisonDataset`: preference pairs from consecutive `{"text"}` lines (chosen, then rejected).
- `SftDataset`: `{"prompt", "response"}` or `{"text"}` records -> tokens and a loss mask that is 1
  on response tokens (and the EOS) only.
- `PromptDataset`: `{"text": prompt}` records -> prompt tokens, for PPO rollouts.
- `EpochSampler`: a seeded permutation per epoch plus a position in it, so a trainer can save
  its exact data position in a checkpoint and resume there.

Tokenisation is the same everywhere (`encode_prompt`, `encode_example`): BOS (when the tokenizer
has one), the prompt's tokens, the response's tokens, EOS. Prompt and response are encoded
separately, so the prompt tokens of an SFT example are exactly the tokens PPO samples after. The
tokenizer is anything with `encode(text) -> list[int]` (no special tokens added, as
`trainer.tokenizer.Tokenizer.encode` does by default) and `bos_id`, `eos_id`, `pad_id`.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from common.errors import InvalidArgument, NotFound
from trainer.data.format import FormatError, split_dialogue


class TokenizerLike(Protocol):
    bos_id: int | None
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All records (JSON objects) of a .jsonl or .jsonl.gz file; blank lines are ignored."""
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"{path}: no such file")
    opener = gzip.open if path.name.endswith(".gz") else open
    records = []
    try:
        with opener(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                    raise InvalidArgument(f"{path}:{number}", f"invalid JSON line ({exc})") from None
                if not isinstance(record, dict):
                    raise InvalidArgument(
                        f"{path}:{number}", f"expected a JSON object, got {type(record).__name__}"
                    )
                records.append(record)
    except (OSError, EOFError) as exc:
        raise InvalidArgument(str(path), f"cannot read ({exc})") from None
    return records


def _string_field(record: dict, key: str, where: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        problem = "missing" if key not in record else f"is {type(value).__name__}, not a string"
        raise InvalidArgument(f"{where}.{key}", problem)
    return value


def read_texts(path: str | Path, key: str = "text") -> list[str]:
    """The `key` string of every record of a jsonl file."""
    return [_string_field(r, key, f"{path}:{i + 1}") for i, r in enumerate(read_jsonl(path))]


def _paths(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    if isinstance(paths, str | Path):
        return [Path(paths)]
    if not paths:
        raise InvalidArgument("data_prefix", "no files given")
    return [Path(p) for p in paths]


# ---------------------------------------------------------------------------------------------
# Tokenisation
# ---------------------------------------------------------------------------------------------


def encode_prompt(tokenizer: TokenizerLike, prompt: str) -> list[int]:
    """[BOS] + prompt tokens: what generation starts from."""
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    return bos + list(tokenizer.encode(prompt))


def encode_example(tokenizer: TokenizerLike, prompt: str, response: str) -> tuple[list[int], int]:
    """([BOS] + prompt + response + [EOS], number of prompt tokens incl. BOS)."""
    prompt_ids = encode_prompt(tokenizer, prompt)
    return prompt_ids + list(tokenizer.encode(response)) + [tokenizer.eos_id], len(prompt_ids)


def encode_dialogue(tokenizer: TokenizerLike, text: str) -> tuple[list[int], int]:
    """A full text -> (ids, prompt length), split at the last Assistant marker.

    A text without the dialogue markers is all response (prompt length = BOS only).
    """
    try:
        prompt, response = split_dialogue(text)
    except FormatError:
        prompt, response = "", text
    return encode_example(tokenizer, prompt, response)


def pad_batch(sequences: Sequence[torch.Tensor], pad_value: float) -> torch.Tensor:
    """Right-pad 1-D tensors to the longest: [B, L]."""
    return torch.nn.utils.rnn.pad_sequence(list(sequences), batch_first=True, padding_value=pad_value)


# ---------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------


class ComparisonDataset(Dataset):
    """Preference pairs: lines 2i (chosen) and 2i+1 (rejected) of each comparisons file.

    Item: {"chosen": LongTensor, "rejected": LongTensor} (each `encode_dialogue`d, EOS last: the
    reward is read at the EOS). Pairs where either side is longer than `max_seq_length` are
    dropped and counted in `num_dropped` (cutting them would cut off the end the reward is read
    at). Without a tokenizer, items are the texts: {"chosen": str, "rejected": str}.
    """

    def __init__(
        self,
        paths: str | Path | Sequence[str | Path],
        tokenizer: TokenizerLike | None = None,
        max_seq_length: int | None = None,
    ):
        self.tokenizer = tokenizer
        self.pairs: list[tuple[str, str]] = []
        self.num_dropped = 0
        self.tokens: list[tuple[list[int], list[int]]] = []
        for path in _paths(paths):
            texts = read_texts(path)
            if not texts:
                raise InvalidArgument(str(path), "no comparisons (empty file)")
            if len(texts) % 2:
                raise InvalidArgument(
                    str(path),
                    f"odd number of lines ({len(texts)}): comparisons come in chosen/rejected pairs",
                )
            for chosen, rejected in zip(texts[0::2], texts[1::2], strict=True):
                if tokenizer is not None:
                    ids = (encode_dialogue(tokenizer, chosen)[0], encode_dialogue(tokenizer, rejected)[0])
                    if max_seq_length is not None and max(map(len, ids)) > max_seq_length:
                        self.num_dropped += 1
                        continue
                    self.tokens.append(ids)
                self.pairs.append((chosen, rejected))
        if not self.pairs:
            raise InvalidArgument(
                ", ".join(map(str, _paths(paths))),
                f"all {self.num_dropped} pairs are longer than max_seq_length={max_seq_length}",
            )

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self.tokenizer is None:
            chosen, rejected = self.pairs[index]
            return {"chosen": chosen, "rejected": rejected}
        chosen, rejected = self.tokens[index]
        return {"chosen": torch.tensor(chosen), "rejected": torch.tensor(rejected)}


def collate_comparisons(items: Sequence[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """B pairs -> {"tokens": [2B, L] (rows :B chosen, B: rejected), "lengths": [2B]}."""
    sequences = [item["chosen"] for item in items] + [item["rejected"] for item in items]
    return {"tokens": pad_batch(sequences, pad_id), "lengths": torch.tensor([len(s) for s in sequences])}


class SftDataset(Dataset):
    """Supervised examples with a loss on the response only.

    Records are {"prompt", "response"} (preferred: the split is explicit) or {"text"} (split at the
    last Assistant marker; a text without markers is trained on whole). Item:
    {"tokens": LongTensor [L], "loss_mask": FloatTensor [L-1]} where loss_mask[t] = 1 when token
    t+1 is a response token or the EOS (next-token space, as `trainer.losses.sft_loss` takes it).
    Examples longer than `max_seq_length` are cut at the right (counted in `num_truncated`);
    those whose prompt alone does not fit are dropped (`num_dropped`).
    """

    def __init__(
        self,
        paths: str | Path | Sequence[str | Path],
        tokenizer: TokenizerLike,
        max_seq_length: int | None = None,
    ):
        self.examples: list[tuple[list[int], int]] = []
        self.num_truncated = self.num_dropped = 0
        for path in _paths(paths):
            records = read_jsonl(path)
            if not records:
                raise InvalidArgument(str(path), "no examples (empty file)")
            for number, record in enumerate(records, start=1):
                ids, prompt_len = self._encode(tokenizer, record, f"{path}:{number}")
                if max_seq_length is not None and len(ids) > max_seq_length:
                    if prompt_len >= max_seq_length:
                        self.num_dropped += 1
                        continue
                    ids = ids[:max_seq_length]
                    self.num_truncated += 1
                self.examples.append((ids, prompt_len))
        if not self.examples:
            raise InvalidArgument(
                ", ".join(map(str, _paths(paths))),
                f"every prompt is longer than max_seq_length={max_seq_length}",
            )

    @staticmethod
    def _encode(tokenizer: TokenizerLike, record: dict, where: str) -> tuple[list[int], int]:
        if "prompt" in record or "response" in record:
            prompt, response = (
                _string_field(record, "prompt", where),
                _string_field(record, "response", where),
            )
            return encode_example(tokenizer, prompt, response)
        return encode_dialogue(tokenizer, _string_field(record, "text", where))

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids, prompt_len = self.examples[index]
        loss_mask = torch.zeros(len(ids) - 1)
        loss_mask[max(prompt_len - 1, 0) :] = 1.0  # position t predicts token t+1
        return {"tokens": torch.tensor(ids), "loss_mask": loss_mask}


def collate_sft(items: Sequence[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """-> {"tokens": [B, L], "loss_mask": [B, L-1] (0 on padding), "lengths": [B]}."""
    return {
        "tokens": pad_batch([item["tokens"] for item in items], pad_id),
        "loss_mask": pad_batch([item["loss_mask"] for item in items], 0.0),
        "lengths": torch.tensor([len(item["tokens"]) for item in items]),
    }


class PromptDataset(Dataset):
    """PPO prompts: {"text": prompt} records -> {"tokens": LongTensor, "text": str}.

    Prompts longer than `max_prompt_length` tokens are dropped and counted in `num_dropped`.
    """

    def __init__(
        self,
        paths: str | Path | Sequence[str | Path],
        tokenizer: TokenizerLike,
        max_prompt_length: int | None = None,
    ):
        self.texts: list[str] = []
        self.tokens: list[list[int]] = []
        self.num_dropped = 0
        for path in _paths(paths):
            texts = read_texts(path)
            if not texts:
                raise InvalidArgument(str(path), "no prompts (empty file)")
            for text in texts:
                ids = encode_prompt(tokenizer, text)
                if max_prompt_length is not None and len(ids) > max_prompt_length:
                    self.num_dropped += 1
                    continue
                self.texts.append(text)
                self.tokens.append(ids)
        if not self.texts:
            raise InvalidArgument(
                ", ".join(map(str, _paths(paths))),
                f"every prompt is longer than max_prompt_length={max_prompt_length}",
            )

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"tokens": torch.tensor(self.tokens[index]), "text": self.texts[index]}


# ---------------------------------------------------------------------------------------------
# Resumable order
# ---------------------------------------------------------------------------------------------


class EpochSampler:
    """Indices into a data set of `size` items, epoch after epoch, resumable.

    Epoch e visits every index once, in the permutation drawn from `numpy.random.default_rng((seed,
    e))` (identity order when shuffle=False). `take(n)` returns the next n indices, running on
    into the next epoch when one ends. The position is two integers (`state_dict()`), so a
    checkpoint can restore it exactly; every data-parallel rank keeps the same sampler and takes
    its own slice of each global batch (`shard`).
    """

    def __init__(self, size: int, seed: int, shuffle: bool = True):
        if size < 1:
            raise InvalidArgument("dataset", "is empty")
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.epoch = 0
        self.position = 0  # next index into this epoch's order
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.size)
        return np.random.default_rng((self.seed, epoch)).permutation(self.size)

    def take(self, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            if self.position == self.size:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
            step = min(n - len(out), self.size - self.position)
            out += self._order[self.position : self.position + step].tolist()
            self.position += step
        return out

    def state_dict(self) -> dict[str, int | bool]:
        return {
            "size": self.size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "epoch": self.epoch,
            "position": self.position,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("size", "seed", "shuffle"):
            if state.get(key) != getattr(self, key):
                raise InvalidArgument(
                    f"data_position.{key}",
                    f"checkpoint has {state.get(key)!r}, this run has {getattr(self, key)!r} (different data or seed)",
                )
        epoch, position = state.get("epoch"), state.get("position")
        if (
            not isinstance(epoch, int)
            or not isinstance(position, int)
            or epoch < 0
            or not 0 <= position <= self.size
        ):
            raise InvalidArgument(
                "data_position", f"bad epoch {epoch!r} / position {position!r} for {self.size} items"
            )
        self.epoch, self.position = epoch, position
        self._order = self._epoch_order(self.epoch)


def shard(indices: Sequence[int], rank: int, world_size: int) -> list[int]:
    """This data-parallel rank's contiguous share of a global batch (sizes must divide)."""
    if len(indices) % world_size:
        raise InvalidArgument(
            "global_batch_size", f"{len(indices)} is not divisible by the data-parallel size {world_size}"
        )
    per_rank = len(indices) // world_size
    return list(indices[rank * per_rank : (rank + 1) * per_rank])
