"""Tokenizer: offline byte-level BPE training, encode/decode, special tokens, Hugging Face
tokenizer directories (ours loaded by transformers, and a Llama-style one loaded by ours), CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.errors import InvalidArgument, NotFound
from trainer.tokenizer import Tokenizer, train_bpe

CORPUS = [
    "Human: What is the capital of France? Assistant: The capital of France is Paris.",
    "Human: Count to five. Assistant: one two three four five",
    "The quick brown fox jumps over the lazy dog.",
    "Ünïcödé text, emoji 🙂 and tabs\tand newlines\nare bytes too.",
] * 20


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    train_bpe(CORPUS, vocab_size=300, out_dir=out)
    return out


def test_train_bpe_special_tokens_and_vocab(tok_dir):
    tok = Tokenizer.load(tok_dir)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.vocab_size == 300
    assert sorted(p.name for p in tok_dir.iterdir()) == [
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]


@pytest.mark.parametrize(
    "text", ["", "The capital of France is Paris.", "never seen: ЖЖЖ 漢字 🙂\n\t  x", "</s> is text here"]
)
def test_encode_decode_round_trip(tok_dir, text):
    tok = Tokenizer.load(tok_dir)
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.encode(text, add_bos=True, add_eos=True) == [tok.bos_id, *ids, tok.eos_id]
    assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == text  # specials are skipped
    assert tok.decode([tok.bos_id, *ids], skip_special_tokens=False) == "<s>" + text


def test_special_token_strings_in_text_stay_text(tok_dir):
    tok = Tokenizer.load(tok_dir)
    ids = tok.encode("user says </s><s><pad> here")
    assert not {tok.bos_id, tok.eos_id, tok.pad_id} & set(ids)


def test_bpe_merges_frequent_words(tok_dir):
    tok = Tokenizer.load(tok_dir)
    text = "The capital of France is Paris."
    assert len(tok.encode(text)) < len(text.encode()) / 2


def test_load_tokenizer_json_file_alone(tok_dir):
    tok = Tokenizer.load(tok_dir / "tokenizer.json")  # no config files: known token names
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)


def test_transformers_loads_our_directory(tok_dir):
    from transformers import AutoTokenizer

    ours = Tokenizer.load(tok_dir)
    hf = AutoTokenizer.from_pretrained(str(tok_dir))
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (ours.bos_id, ours.eos_id, ours.pad_id)
    text = "Human: Count to three. Assistant: one two three"
    # transformers adds <s> through the tokenizer.json post-processor, like a Llama tokenizer.
    assert hf(text)["input_ids"] == ours.encode(text, add_bos=True)
    assert hf.decode(ours.encode(text), skip_special_tokens=True) == text


def _llama_style_dir(tmp_path: Path, tok_dir: Path, config: dict, special_map: dict | None) -> Path:
    """A HF directory whose tokens differ from our defaults: added tokens with other names."""
    tok = Tokenizer.load(tok_dir).tokenizer
    tok.add_special_tokens(["<|begin_of_text|>", "<|eot|>", "<|padding|>"])
    d = tmp_path / "hf"
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    if special_map is not None:
        (d / "special_tokens_map.json").write_text(json.dumps(special_map))
    return d


def test_hf_directory_names_the_special_tokens(tmp_path, tok_dir):
    d = _llama_style_dir(
        tmp_path,
        tok_dir,
        config={"bos_token": {"content": "<|begin_of_text|>", "special": True}, "eos_token": "<|eot|>"},
        special_map={"pad_token": "<|padding|>", "eos_token": "</s>"},  # tokenizer_config wins
    )
    tok = Tokenizer.load(d)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|begin_of_text|>", "<|eot|>", "<|padding|>")
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (300, 301, 302)
    assert tok.vocab_size == 303
    assert tok.encode("hi", add_bos=True)[0] == 300


def test_pad_defaults_to_eos_when_absent(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    raw = HFTokenizer(models.WordLevel({"a": 0, "<|endoftext|>": 1}, unk_token="a"))
    raw.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.load(tmp_path)
    assert tok.eos_id == 1 and tok.pad_id == 1 and tok.bos_id is None
    with pytest.raises(InvalidArgument, match="add_bos"):
        tok.encode("a", add_bos=True)


def test_save_and_reload_keeps_everything(tmp_path, tok_dir):
    tok = Tokenizer.load(tok_dir)
    tok.save(tmp_path / "copy")
    again = Tokenizer.load(tmp_path / "copy")
    text = CORPUS[0]
    assert again.encode(text) == tok.encode(text)
    assert (again.bos_id, again.eos_id, again.pad_id, again.vocab_size) == (
        tok.bos_id,
        tok.eos_id,
        tok.pad_id,
        tok.vocab_size,
    )


def test_errors_name_the_problem(tmp_path, tok_dir):
    with pytest.raises(NotFound, match="does not exist"):
        Tokenizer.load(tmp_path / "nope")
    with pytest.raises(NotFound, match="no tokenizer.json"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(InvalidArgument, match="tokenizer.json"):
        Tokenizer.load(tmp_path / "tokenizer.json")
    with pytest.raises(InvalidArgument, match="vocab_size"):
        train_bpe(CORPUS, vocab_size=100)
    bad = _llama_style_dir(tmp_path, tok_dir, config={"eos_token": "<|missing|>"}, special_map=None)
    with pytest.raises(InvalidArgument, match="eos_token"):
        Tokenizer.load(bad)


def _train_cli(*inputs: Path, vocab: int, out: Path, extra: tuple[str, ...] = ()) -> int:
    from services.cli import main

    args = ["tokenizer", "train", "--vocab-size", str(vocab), "--out", str(out), *extra]
    for path in inputs:
        args += ["--input", str(path)]
    return main(args)


def test_cli_train_from_jsonl_and_txt(tmp_path, capsys):
    from services.cli import main

    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text(
        "".join(json.dumps({"prompt": t[:20], "response": t[20:], "n": 3}) + "\n" for t in CORPUS)
    )
    txt = tmp_path / "more.txt"
    txt.write_text("zebra zebra zebra\n" * 50)
    out = tmp_path / "tok"
    assert _train_cli(jsonl, txt, vocab=290, out=out) == 0
    assert "vocab 290" in capsys.readouterr().out
    tok = Tokenizer.load(out)
    assert tok.vocab_size == 290
    assert len(tok.encode(" zebra")) == 1  # learnt from the .txt input
    assert tok.decode(tok.encode(CORPUS[0])) == CORPUS[0]

    assert main(["tokenizer", "encode", str(out), "zebra"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["ids"][0] == tok.bos_id and shown["decoded"] == "zebra"


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert _train_cli(tmp_path / "x.txt", vocab=300, out=tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "x.txt does not exist" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{oops\n')
    assert _train_cli(bad, vocab=300, out=tmp_path / "o") == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "ok"}\n')
    assert _train_cli(good, vocab=300, out=tmp_path / "o", extra=("--field", "prompt")) == 2
    assert "has no field 'prompt'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
