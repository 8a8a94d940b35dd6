"""`aligner tokenizer`: train a byte-level BPE tokenizer on local text, or try one out.

    aligner tokenizer train --input data.jsonl [--input more.txt] --vocab-size 512 --out DIR
    aligner tokenizer encode DIR "some text"

Inputs: `.txt` (one text per line), `.jsonl` / `.jsonl.gz` (every string value of each record,
or only the `--field` ones). The output directory is a Hugging Face tokenizer directory.
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections.abc import Iterator
from pathlib import Path

from common.errors import InvalidArgument, NotFound
from trainer.tokenizer import Tokenizer, train_bpe


def _strings(value) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def read_texts(path: Path, fields: list[str] | None = None) -> Iterator[str]:
    """Texts from a .txt (one per line) or .jsonl[.gz] file; errors name the file and line."""
    if not path.is_file():
        raise NotFound(f"--input: {path} does not exist")
    opener = gzip.open if path.suffix == ".gz" else open
    is_jsonl = path.name.endswith((".jsonl", ".jsonl.gz", ".json"))
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if not is_jsonl:
                yield line.rstrip("\n")
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidArgument(f"{path}:{lineno}", f"invalid JSON: {exc.msg}") from exc
            if fields:
                if not isinstance(record, dict):
                    raise InvalidArgument(f"{path}:{lineno}", "is not a JSON object")
                missing = [k for k in fields if k not in record]
                if missing:
                    raise InvalidArgument(f"{path}:{lineno}", f"has no field {missing[0]!r}")
                record = [record[k] for k in fields]
            yield from _strings(record)


def _train(args) -> int:
    paths = [Path(p) for p in args.input]
    for p in paths:  # fail before training, not halfway through the stream
        if not p.is_file():
            raise NotFound(f"--input: {p} does not exist")
    texts = (t for p in paths for t in read_texts(p, args.field))
    tok = train_bpe(texts, vocab_size=args.vocab_size, out_dir=args.out)
    print(f"wrote {args.out}: vocab {tok.vocab_size}, bos={tok.bos_id} eos={tok.eos_id} pad={tok.pad_id}")
    return 0


def _encode(args) -> int:
    tok = Tokenizer.load(args.tokenizer)
    ids = tok.encode(args.text, add_bos=args.add_bos and tok.bos_id is not None)
    print(
        json.dumps(
            {"ids": ids, "tokens": [tok.tokenizer.id_to_token(i) for i in ids], "decoded": tok.decode(ids)}
        )
    )
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="aligner tokenizer", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    train = sub.add_parser("train", help="train a byte-level BPE tokenizer offline")
    train.add_argument("--input", action="append", required=True, help=".txt or .jsonl[.gz] (repeatable)")
    train.add_argument("--field", action="append", help="jsonl: only these keys (repeatable)")
    train.add_argument("--vocab-size", type=int, required=True)
    train.add_argument("--out", required=True, help="output directory (Hugging Face tokenizer layout)")
    train.set_defaults(run=_train)
    encode = sub.add_parser("encode", help="show how a tokenizer splits a text")
    encode.add_argument("tokenizer", help="tokenizer.json or tokenizer directory")
    encode.add_argument("text")
    encode.add_argument("--no-bos", dest="add_bos", action="store_false")
    encode.set_defaults(run=_encode)
    args = parser.parse_args(argv)
    return args.run(args)
