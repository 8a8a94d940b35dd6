"""Policy evaluation: responses from the engine, scored by the reward model and a ground truth."""

from common.config import ModelArchConfig
from trainer.model import build_model
from trainer.parallel import init_parallel
from trainer.policy_eval import evaluate_policy
from trainer.tokenizer import train_bpe

ARCH = ModelArchConfig(num_layers=1, hidden_size=32, ffn_hidden_size=64, num_attention_heads=2,
                       num_query_groups=1, vocab_size=300, encoder_seq_length=32)


def test_evaluate_policy_scores_what_the_engine_generated(tmp_path):
    init_parallel()
    tokenizer = train_bpe(["\n\nHuman: Say fox 2 times.\n\nAssistant: fox fox."] * 20, 300, tmp_path / "tok")
    policy, reward_model = build_model(ARCH, seed=1), build_model(ARCH, value_head=True, seed=2)
    prompts = ["\n\nHuman: Say fox 2 times.\n\nAssistant:", "\n\nHuman: Say fox 3 times.\n\nAssistant:"]
    seen = []

    def truth(prompt: str, response: str) -> float:
        seen.append((prompt, response))
        return float(len(response))

    result = evaluate_policy(policy, reward_model, tokenizer, prompts, max_new_tokens=5, greedy=True,
                             reference=policy, ground_truth=truth)
    assert [p for p, _ in seen] == prompts
    assert result.ground_truth_mean == sum(len(r) for _, r in seen) / 2
    assert result.kl_to_reference == 0.0  # the policy is its own reference
    assert 1 <= result.response_length <= 5
    # The reported reward is the reward model's score of prompt + response, recomputed here.
    first = result.examples[0]
    assert first["prompt"] == prompts[0] and first["ground_truth"] == len(first["response"])
    assert isinstance(first["reward"], float)
    again = evaluate_policy(policy, reward_model, tokenizer, prompts, max_new_tokens=5, greedy=True)
    assert again.reward_mean == result.reward_mean and again.ground_truth_mean is None
