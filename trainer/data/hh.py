"""Anthropic-HH (hh-rlhf) -> comparison and prompt jsonl files.

Input: a local directory with `train.jsonl` / `train.jsonl.gz` and `test.jsonl` / `test.jsonl.gz`,
either directly in it or one level down (the public data set ships one folder per subset,
e.g. `helpful-base/train.jsonl.gz`; every subset found is read, in sorted order). Each line is

    {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "\\n\\nHuman: ...\\n\\nAssistant: ..."}

Both dialogues are split after their last `"\\n\\nAssistant:"` marker (`format.split_dialogue`):
the part up to and including the marker is the prompt, the rest is the response (which starts
with a space). Output, per split, in the seed's format:

- `<split>_comparisons.jsonl`: `{"text": prompt + chosen}` then `{"text": prompt + rejected}` on
  consecutive lines (line 2i is preferred over line 2i+1);
- `<split>_prompts.jsonl`: `{"text": prompt}`, one line per written pair;
- `summary.json`: the counts below and every malformed line (file, line, problem).

Records that cannot be used are counted, never silently dropped:
- malformed (reported with file:line): `bad_json` (not JSON or not UTF-8), `missing_key`
  (not an object, or `chosen`/`rejected` missing or not a string), `no_assistant_turn` (a
  dialogue without an Assistant turn, or without a Human turn before it);
- skipped: `prompt_mismatch` (the two dialogues do not share the prompt, e.g. one response
  continues the conversation) and `identical` (chosen == rejected: nothing to learn).
`strict=True` stops at the first malformed record. A split that yields no pair is an error.
"""

from __future__ import annotations

import gzip
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import InvalidArgument, NotFound
from trainer.data.format import FormatError, split_dialogue

SPLITS = ("train", "test")
MALFORMED_KINDS = ("bad_json", "missing_key", "no_assistant_turn")
SKIP_KINDS = ("prompt_mismatch", "identical")


@dataclass
class Problem:
    """One unusable record: where it is and why."""

    file: str
    line: int
    kind: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.kind}: {self.message}"


class RecordError(Exception):
    """A record that is malformed (kind in MALFORMED_KINDS) or skipped (kind in SKIP_KINDS)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass
class SplitReport:
    split: str
    files: list[str] = field(default_factory=list)
    records: int = 0
    pairs: int = 0
    malformed: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    problems: list[Problem] = field(default_factory=list)  # malformed records, in file order

    def to_json(self) -> dict:
        return {
            "files": self.files,
            "records": self.records,
            "pairs": self.pairs,
            "malformed": {k: self.malformed[k] for k in MALFORMED_KINDS},
            "skipped": {k: self.skipped[k] for k in SKIP_KINDS},
            "problems": [vars(p) for p in self.problems],
        }


def parse_record(raw: bytes) -> tuple[str, str, str]:
    """One HH jsonl line -> (prompt, chosen_response, rejected_response); RecordError otherwise."""
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise RecordError("bad_json", f"not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise RecordError("bad_json", f"invalid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise RecordError(
            "missing_key", f"expected an object with chosen/rejected, got {type(record).__name__}"
        )
    for key in ("chosen", "rejected"):
        if key not in record:
            raise RecordError("missing_key", f"no '{key}' key")
        if not isinstance(record[key], str):
            raise RecordError("missing_key", f"'{key}' is {type(record[key]).__name__}, not a string")
    try:
        chosen_prompt, chosen = split_dialogue(record["chosen"])
    except FormatError as exc:
        raise RecordError("no_assistant_turn", f"chosen: {exc}") from None
    try:
        rejected_prompt, rejected = split_dialogue(record["rejected"])
    except FormatError as exc:
        raise RecordError("no_assistant_turn", f"rejected: {exc}") from None
    if chosen_prompt != rejected_prompt:
        raise RecordError("prompt_mismatch", "chosen and rejected dialogues have different prompts")
    if chosen == rejected:
        raise RecordError("identical", "chosen and rejected responses are identical")
    return chosen_prompt, chosen, rejected


def find_split_files(input_dir: Path, split: str) -> list[Path]:
    """`<split>.jsonl[.gz]` in input_dir and in its immediate subdirectories, sorted."""
    found = []
    for folder in [input_dir, *sorted(p for p in input_dir.iterdir() if p.is_dir())]:
        plain, gz = folder / f"{split}.jsonl", folder / f"{split}.jsonl.gz"
        if plain.is_file() and gz.is_file():
            raise InvalidArgument("input", f"both {plain} and {gz} exist; keep one")
        found += [p for p in (plain, gz) if p.is_file()]
    return found


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw line) for non-blank lines of a jsonl or jsonl.gz file."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                if raw.strip():
                    yield number, raw
    except (OSError, EOFError) as exc:  # a truncated or corrupt .gz
        raise InvalidArgument("input", f"{path}: cannot read ({exc})") from None


class _AtomicJsonl:
    """Writes `{"text": ...}` lines to `<path>.tmp` and renames it into place on commit()."""

    def __init__(self, path: Path):
        self.path, self.tmp = path, path.with_name(path.name + ".tmp")
        self.file = open(self.tmp, "w", encoding="utf-8")

    def write(self, text: str) -> None:
        self.file.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")

    def commit(self) -> None:
        self.file.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def convert_split(files: list[Path], output_dir: Path, split: str, strict: bool = False) -> SplitReport:
    """Stream the HH files of one split into `<split>_comparisons.jsonl` and `<split>_prompts.jsonl`."""
    report = SplitReport(split=split, files=[str(p) for p in files])
    comparisons = _AtomicJsonl(output_dir / f"{split}_comparisons.jsonl")
    prompts = _AtomicJsonl(output_dir / f"{split}_prompts.jsonl")
    try:
        for path in files:
            for number, raw in _lines(path):
                report.records += 1
                try:
                    prompt, chosen, rejected = parse_record(raw)
                except RecordError as exc:
                    if exc.kind in SKIP_KINDS:
                        report.skipped[exc.kind] += 1
                        continue
                    problem = Problem(str(path), number, exc.kind, str(exc))
                    if strict:
                        raise InvalidArgument("input", f"{problem} (--strict)") from None
                    report.malformed[exc.kind] += 1
                    report.problems.append(problem)
                    continue
                comparisons.write(prompt + chosen)
                comparisons.write(prompt + rejected)
                prompts.write(prompt)
                report.pairs += 1
        if report.pairs == 0:
            raise InvalidArgument("input", _no_pairs_message(report))
    except BaseException:
        comparisons.abort()
        prompts.abort()
        raise
    comparisons.commit()
    prompts.commit()
    return report


def _no_pairs_message(report: SplitReport) -> str:
    where = ", ".join(report.files)
    if report.records == 0:
        return f"{report.split}: no records in {where}"
    first = f"; first: {report.problems[0]}" if report.problems else ""
    return (
        f"{report.split}: none of the {report.records} records in {where} gave a pair "
        f"({sum(report.malformed.values())} malformed, {sum(report.skipped.values())} skipped){first}"
    )


def convert(input_dir: str | Path, output_dir: str | Path, strict: bool = False) -> dict[str, SplitReport]:
    """Convert every split found in input_dir; writes the jsonl files and `summary.json`."""
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if not input_dir.is_dir():
        raise NotFound(f"--input: {input_dir} is not a directory")
    files = {split: find_split_files(input_dir, split) for split in SPLITS}
    if not any(files.values()):
        raise NotFound(f"--input: no train.jsonl[.gz] or test.jsonl[.gz] in {input_dir} or its subfolders")
    output_dir.mkdir(parents=True, exist_ok=True)
    reports = {
        split: convert_split(paths, output_dir, split, strict) for split, paths in files.items() if paths
    }
    summary = {"input": str(input_dir), "splits": {s: r.to_json() for s, r in reports.items()}}
    tmp = output_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, output_dir / "summary.json")
    return reports
