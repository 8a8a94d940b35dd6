"""Tokenizers: Hugging Face `tokenizers` loaded from a local path, and a small byte-level BPE
trained offline for the demo models.

`Tokenizer.load(path)` takes a `tokenizer.json` file or a Hugging Face tokenizer directory
(`tokenizer.json` plus `tokenizer_config.json` and/or `special_tokens_map.json` naming the
bos/eos/pad tokens). Where those files name no token, well-known token strings found in the vocab
are used (`<s>`/`</s>`/`<pad>` and the Llama-3/GPT-2 equivalents); a tokenizer without a pad
token pads with its eos token (padding is masked or sits after the last real token anyway).

`encode` adds special tokens only when asked (`add_bos`/`add_eos`), whatever post-processor the
`tokenizer.json` carries, so the caller always knows where the bos is. A special token's string
inside the text (say a user prompt containing "</s>") is encoded as ordinary text, never as the
control token: text cannot end a sequence early or forge a turn.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from common.errors import InvalidArgument, NotFound

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = [PAD, BOS, EOS]  # ids 0, 1, 2 in a tokenizer made by train_bpe

# Token strings tried, in order, when the config files do not name a special token.
_KNOWN = {
    "bos": ("<s>", "<|begin_of_text|>", "<|startoftext|>", "<bos>"),
    "eos": ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "<|im_end|>"),
    "pad": ("<pad>", "<|pad|>", "<|finetune_right_pad_id|>", "[PAD]"),
}


def _token_content(value) -> str | None:
    """A special token in tokenizer_config.json is a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(str(path), f"is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidArgument(str(path), "must hold a JSON object")
    return data


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


class Tokenizer:
    """A `tokenizers.Tokenizer` plus its bos/eos/pad tokens."""

    def __init__(
        self, tokenizer: HFTokenizer, bos_token: str | None, eos_token: str, pad_token: str | None = None
    ):
        self.tokenizer = tokenizer
        self.tokenizer.encode_special_tokens = True  # "</s>" in text is text (see module doc)
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.pad_token = pad_token or eos_token
        for role, token in (
            ("bos_token", bos_token),
            ("eos_token", eos_token),
            ("pad_token", self.pad_token),
        ):
            if token is not None and tokenizer.token_to_id(token) is None:
                raise InvalidArgument(role, f"{token!r} is not in the vocabulary")

    # -- loading -----------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """From a `tokenizer.json` file or a Hugging Face tokenizer directory."""
        path = Path(path)
        if not path.exists():
            raise NotFound(f"tokenizer: {path} does not exist")
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise NotFound(f"tokenizer: {path} has no tokenizer.json")
        try:
            tokenizer = HFTokenizer.from_file(str(file))
        except Exception as exc:  # tokenizers raises a bare Exception on a malformed file
            raise InvalidArgument(str(file), f"is not a tokenizers JSON file: {exc}") from exc

        named: dict[str, str] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the config wins
            if (file.parent / name).is_file():
                config = _read_json(file.parent / name)
                for role in ("bos", "eos", "pad"):
                    token = _token_content(config.get(f"{role}_token"))
                    if token is not None:
                        named[role] = token

        vocab = tokenizer.get_vocab(with_added_tokens=True)

        def pick(role: str) -> str | None:
            if role in named:
                return named[role]
            return next((t for t in _KNOWN[role] if t in vocab), None)

        eos = pick("eos")
        if eos is None:
            raise InvalidArgument(
                "eos_token", f"{path}: no eos token is named and none of {_KNOWN['eos']} is in the vocab"
            )
        return cls(tokenizer, bos_token=pick("bos"), eos_token=eos, pad_token=pick("pad"))

    # -- ids ---------------------------------------------------------------------------------

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.tokenizer.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_id(self) -> int:
        return self._id(self.eos_token)

    @property
    def pad_id(self) -> int:
        return self._id(self.pad_token)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if add_bos:
            if self.bos_id is None:
                raise InvalidArgument("add_bos", "this tokenizer has no bos token")
            ids = [self.bos_id, *ids]
        if add_eos:
            ids = [*ids, self.eos_id]
        return ids

    def encode_batch(self, texts: list[str], add_bos: bool = False, add_eos: bool = False) -> list[list[int]]:
        return [self.encode(t, add_bos=add_bos, add_eos=add_eos) for t in texts]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # -- saving ------------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> Path:
        """Write a Hugging Face tokenizer directory (`tokenizer.json`, `tokenizer_config.json`,
        `special_tokens_map.json`) that `transformers.AutoTokenizer.from_pretrained` loads."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        special = {"eos_token": self.eos_token, "pad_token": self.pad_token}
        if self.bos_token is not None:
            special["bos_token"] = self.bos_token
        added = {
            str(self.tokenizer.token_to_id(t)): {
                "content": t, "lstrip": False, "rstrip": False, "normalized": False,
                "single_word": False, "special": True,
            }
            for t in dict.fromkeys(special.values())
        }  # fmt: skip
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000_000_000_000_019_884_624_838_656,  # transformers' "no limit"
            "added_tokens_decoder": added,
            **special,
        }
        _write_atomic(directory / "tokenizer.json", self.tokenizer.to_str())
        _write_atomic(directory / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
        _write_atomic(directory / "special_tokens_map.json", json.dumps(special, indent=2) + "\n")
        return directory


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike | None = None) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style: any byte string round-trips, no unknown token) with
    the special tokens `<pad>`=0, `<s>`=1, `</s>`=2. The tokenizer.json's post-processor prepends
    `<s>` (as Llama's does) for `transformers` users; `Tokenizer.encode` adds it only on request.
    Saved to `out_dir` as a Hugging Face tokenizer directory when given."""
    minimum = len(SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < minimum:
        raise InvalidArgument(
            "vocab_size", f"must be at least {minimum} (256 bytes + 3 special tokens), got {vocab_size}"
        )
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
            ),
        ]
    )
    result = Tokenizer(tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    if out_dir is not None:
        result.save(out_dir)
    return result
