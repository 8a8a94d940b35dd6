"""jsonl readers, the SFT/comparison/prompt datasets and the resumable sampler."""

import gzip
import json

import pytest
import torch

from common.errors import InvalidArgument, NotFound
from trainer.data import synthetic
from trainer.data.datasets import (
    ComparisonDataset,
    EpochSampler,
    PromptDataset,
    SftDataset,
    collate_comparisons,
    collate_sft,
    encode_example,
    encode_prompt,
    read_jsonl,
    shard,
)
from trainer.data.format import split_dialogue
from trainer.tokenizer import train_bpe


class CharTokenizer:
    """One id per character (offset past the specials), no special tokens added by encode."""

    pad_id, bos_id, eos_id = 0, 1, 2

    def encode(self, text: str) -> list[int]:
        return [3 + ord(c) for c in text]


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    synthetic.generate(out, seed=3, num_train=200, num_test=40)
    return out


def test_read_jsonl_errors_name_file_and_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": \n')
    with pytest.raises(InvalidArgument, match=r"x\.jsonl:3: invalid JSON"):
        read_jsonl(path)
    path.write_text('{"text": "a"}\n[1, 2]\n')
    with pytest.raises(InvalidArgument, match=r"x\.jsonl:2: expected a JSON object, got list"):
        read_jsonl(path)
    with pytest.raises(NotFound, match="nope.jsonl: no such file"):
        read_jsonl(tmp_path / "nope.jsonl")
    gz = tmp_path / "y.jsonl.gz"
    gz.write_bytes(gzip.compress(b'{"text": "a"}\n\n{"text": "b"}\n'))
    assert read_jsonl(gz) == [{"text": "a"}, {"text": "b"}]


def test_comparisons_pairs_and_errors(tmp_path):
    path = _write(tmp_path / "c.jsonl", [{"text": t} for t in ["p c1", "p r1", "q c2", "q r2"]])
    ds = ComparisonDataset(path)
    assert len(ds) == 2 and ds[1] == {"chosen": "q c2", "rejected": "q r2"}

    odd = _write(tmp_path / "odd.jsonl", [{"text": "a"}, {"text": "b"}, {"text": "c"}])
    with pytest.raises(InvalidArgument) as err:
        ComparisonDataset([path, odd])
    assert "odd.jsonl" in str(err.value) and "odd number of lines (3)" in str(err.value)
    assert "\n" not in str(err.value)

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(InvalidArgument, match="empty.jsonl: no comparisons"):
        ComparisonDataset(empty)
    with pytest.raises(InvalidArgument, match=r"bad\.jsonl:2\.text: missing"):
        ComparisonDataset(_write(tmp_path / "bad.jsonl", [{"text": "a"}, {"txt": "b"}]))


def test_comparison_tokens_end_with_eos_and_long_pairs_dropped(tmp_path):
    tok = CharTokenizer()
    texts = ["\n\nHuman: hi\n\nAssistant: yes", "\n\nHuman: hi\n\nAssistant: no", "x" * 50, "y"]
    ds = ComparisonDataset(_write(tmp_path / "c.jsonl", [{"text": t} for t in texts]), tok, max_seq_length=40)
    assert len(ds) == 1 and ds.num_dropped == 1
    item = ds[0]
    assert item["chosen"].tolist() == [1] + tok.encode(texts[0]) + [2]
    batch = collate_comparisons([item, item], pad_id=tok.pad_id)
    assert batch["tokens"].shape == (4, len(item["chosen"]))
    assert batch["lengths"].tolist() == [len(item["chosen"])] * 2 + [len(item["rejected"])] * 2
    assert batch["tokens"][2, len(item["rejected"]) :].eq(tok.pad_id).all()


def test_sft_mask_covers_response_and_eos_only(tmp_path):
    tok = CharTokenizer()
    path = _write(
        tmp_path / "sft.jsonl",
        [
            {"prompt": "\n\nHuman: hi\n\nAssistant:", "response": " hello"},
            {"text": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d."},
            {"text": "plain text"},
        ],
    )
    ds = SftDataset(path, tok)
    tokens, mask = ds[0]["tokens"], ds[0]["loss_mask"]
    prompt_len = 1 + len("\n\nHuman: hi\n\nAssistant:")
    assert tokens.tolist() == [1] + tok.encode("\n\nHuman: hi\n\nAssistant:") + tok.encode(" hello") + [2]
    assert mask.shape == (len(tokens) - 1,)
    # mask[t] = 1 <=> token t+1 is a response token or the EOS
    assert mask.tolist() == [0.0] * (prompt_len - 1) + [1.0] * (len(" hello") + 1)
    trained = tokens[1:][mask.bool()].tolist()
    assert trained == tok.encode(" hello") + [2]

    # a text record is split at the LAST Assistant marker
    tokens, mask = ds[1]["tokens"], ds[1]["loss_mask"]
    assert tokens[1:][mask.bool()].tolist() == tok.encode(" d.") + [2]
    # a text without markers is trained on whole
    assert ds[2]["loss_mask"].sum().item() == len("plain text") + 1

    batch = collate_sft([ds[0], ds[2]], pad_id=tok.pad_id)
    assert batch["tokens"].shape[1] == batch["loss_mask"].shape[1] + 1
    assert batch["loss_mask"][1, len(ds[2]["loss_mask"]) :].eq(0).all()


def test_sft_truncation_and_bad_records(tmp_path):
    tok = CharTokenizer()
    path = _write(
        tmp_path / "s.jsonl", [{"prompt": "pp", "response": "r" * 20}, {"prompt": "p" * 30, "response": "r"}]
    )
    ds = SftDataset(path, tok, max_seq_length=10)
    assert len(ds) == 1 and ds.num_truncated == 1 and ds.num_dropped == 1
    assert len(ds[0]["tokens"]) == 10 and ds[0]["loss_mask"].sum() == 10 - 3
    with pytest.raises(InvalidArgument, match=r"s2\.jsonl:1\.response: missing"):
        SftDataset(_write(tmp_path / "s2.jsonl", [{"prompt": "p"}]), tok)
    with pytest.raises(InvalidArgument, match=r"s3\.jsonl:1\.prompt: is int"):
        SftDataset(_write(tmp_path / "s3.jsonl", [{"prompt": 3, "response": "r"}]), tok)


def test_prompts(tmp_path):
    tok = CharTokenizer()
    path = _write(tmp_path / "p.jsonl", [{"text": "\n\nHuman: a\n\nAssistant:"}, {"text": "x" * 100}])
    ds = PromptDataset(path, tok, max_prompt_length=64)
    assert len(ds) == 1 and ds.num_dropped == 1
    assert ds[0]["tokens"].tolist() == encode_prompt(tok, ds[0]["text"])
    with pytest.raises(InvalidArgument, match="every prompt is longer"):
        PromptDataset(path, tok, max_prompt_length=3)


def test_real_tokenizer_split_encoding_matches_whole_text(synth):
    """Encoding prompt and response apart gives the same ids as encoding the text whole (what the
    reward server does with text), so SFT, RM and PPO see the same tokens."""
    texts = [r["text"] for r in read_jsonl(synth / "sft_train.jsonl")]
    tok = train_bpe(texts, vocab_size=512)  # the demo model's vocabulary size
    for text in texts[:100]:
        prompt, response = split_dialogue(text)
        ids, prompt_len = encode_example(tok, prompt, response)
        assert ids == tok.encode(text, add_bos=True, add_eos=True)
        assert ids[:prompt_len] == encode_prompt(tok, prompt)
    ds = SftDataset(synth / "sft_train.jsonl", tok)
    assert max(len(ds[i]["tokens"]) for i in range(len(ds))) <= 32  # short enough for cheap PPO
    assert len(ComparisonDataset(synth / "train_comparisons.jsonl", tok)) == 200


def test_sampler_is_a_permutation_per_epoch_and_resumes():
    sampler = EpochSampler(10, seed=5)
    first = sampler.take(10)
    assert sorted(first) == list(range(10)) and first != list(range(10))
    second = sampler.take(10)
    assert sorted(second) == list(range(10)) and second != first
    assert EpochSampler(10, seed=5).take(20) == first + second  # deterministic from the seed

    sampler = EpochSampler(10, seed=5)
    sampler.take(7)
    state = sampler.state_dict()
    rest = sampler.take(9)  # crosses into epoch 1
    resumed = EpochSampler(10, seed=5)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip
    assert resumed.take(9) == rest == (first + second)[7:16]
    assert EpochSampler(4, seed=0, shuffle=False).take(6) == [0, 1, 2, 3, 0, 1]


def test_sampler_state_mismatch_and_shard():
    state = EpochSampler(10, seed=5).state_dict()
    with pytest.raises(InvalidArgument, match="data_position.size"):
        EpochSampler(11, seed=5).load_state_dict(state)
    with pytest.raises(InvalidArgument, match="data_position.seed"):
        EpochSampler(10, seed=6).load_state_dict(state)
    with pytest.raises(InvalidArgument, match="data_position: bad epoch"):
        EpochSampler(10, seed=5).load_state_dict({**state, "position": 11})
    with pytest.raises(InvalidArgument, match="data_position: bad epoch None"):
        EpochSampler(10, seed=5).load_state_dict({k: v for k, v in state.items() if k != "epoch"})
    with pytest.raises(InvalidArgument, match="dataset: is empty"):
        EpochSampler(0, seed=1)
    batch = list(range(8))
    assert shard(batch, 0, 2) + shard(batch, 1, 2) == batch
    with pytest.raises(InvalidArgument, match="global_batch_size"):
        shard(batch, 0, 3)


def test_dataset_items_are_tensors(tmp_path):
    ds = SftDataset(_write(tmp_path / "s.jsonl", [{"prompt": "a", "response": "b"}]), CharTokenizer())
    assert ds[0]["tokens"].dtype == torch.long and ds[0]["loss_mask"].dtype == torch.float32
