"""The PPO benchmark's pieces (no timings asserted): the services' components in the
orchestrator's process (`services/orchestrator/in_process.py`) follow the services' rules, a PPO
step runs over them, and they compute what the launched services compute over gRPC."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `benchmarks` is not an installed package (run.py does the same)
    sys.path.insert(0, str(ROOT))

from benchmarks import bench_ppo  # noqa: E402
from common.config import GenerationServiceConfig, ModelServiceConfig  # noqa: E402
from services.generation.weights import StaleVersion  # noqa: E402
from services.orchestrator.in_process import InProcessServices  # noqa: E402
from trainer.engine import SamplingParams  # noqa: E402

SAMPLE = SamplingParams(max_new_tokens=bench_ppo.NEW_TOKENS, temperature=1.0, top_k=0, top_p=1.0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    return bench_ppo.make_setup(tmp_path_factory.mktemp("bench_ppo"))


def _model_config(setup: dict, name: str, checkpoint: Path) -> ModelServiceConfig:
    config = ModelServiceConfig(
        name=name, checkpoint_path=str(checkpoint), tokenizer_path=str(setup["tokenizer"])
    )
    config.model.global_batch_size, config.model.micro_batch_size = bench_ppo.PROMPTS, bench_ppo.MICRO_BATCH
    return config


def _services(setup: dict) -> InProcessServices:
    return InProcessServices(
        _model_config(setup, "reward-critic", setup["reward"]),
        _model_config(setup, "reference", setup["policy"]),
        GenerationServiceConfig(checkpoint_path=str(setup["policy"])),
    )


@pytest.fixture(scope="module")
def services(setup):
    local = _services(setup)
    yield local
    local.close()


def _tokens(results) -> list[list[int]]:
    return [r.tokens for r in results]


def _sampling(**changes) -> SamplingParams:
    return SamplingParams(**{**SAMPLE.__dict__, **changes})


def test_in_process_generation_follows_the_servers_sampling_rules(setup, services):
    generator, prompts = services.generator, setup["prompt_ids"][:6]
    eos = services.generation.limits.default_end_id
    sampling = _sampling(end_id=eos)
    first = generator.generate(prompts, sampling, list(range(6)), 0)
    again = generator.generate(prompts, sampling, list(range(6)), 0)
    other = generator.generate(prompts, sampling, list(range(100, 106)), 0)
    assert _tokens(first) == _tokens(again)  # a seed fixes a response
    assert _tokens(first) != _tokens(other)
    for r in first:
        assert len(r.tokens) == len(r.logprobs) <= bench_ppo.NEW_TOKENS
        assert r.ended == (r.tokens[-1] == eos or len(r.tokens) < bench_ppo.NEW_TOKENS)
        assert all(lp <= 0.0 for lp in r.logprobs)
    # Greedy (also top-1, as the server reads it) ignores the seeds.
    greedy = [_tokens(generator.generate(prompts, _sampling(end_id=eos, greedy=True), seeds, 0))
              for seeds in (list(range(6)), list(range(50, 56)))]  # fmt: skip
    top1 = generator.generate(prompts, _sampling(end_id=eos, top_k=1), list(range(6)), 0)
    assert greedy[0] == greedy[1] == _tokens(top1)


def test_in_process_generation_weight_versions(setup):
    local = _services(setup)
    try:
        generator, prompts = local.generator, setup["prompt_ids"][:4]
        greedy = _sampling(greedy=True)
        before = _tokens(generator.generate(prompts, greedy, [0] * 4, 0))
        assert generator.wait_ready(5) == 0
        with pytest.raises(StaleVersion, match="policy_version"):
            generator.generate(prompts, greedy, [0] * 4, 1)  # weights newer than the engine's
        engine = local.generation.engine
        state = {k: v.clone() for k, v in engine.model.state_dict().items() if isinstance(v, torch.Tensor)}
        out = next(k for k in state if k.endswith("output_layer.weight"))
        state[out] = torch.randn_like(state[out])
        generator.push_weights(state, 1)
        assert generator.served_version() == 1
        assert _tokens(generator.generate(prompts, greedy, [0] * 4, 1)) != before
        with pytest.raises(StaleVersion, match="not newer"):
            generator.push_weights(state, 1)
    finally:
        local.close()


def test_ppo_steps_over_in_process_services(setup, services, tmp_path):
    from services.orchestrator.run import PpoRun

    # Two rollout micro-batches of 8: scoring of the first overlaps generation of the second.
    run = PpoRun(bench_ppo.ppo_config(setup, tmp_path, [], 1, 8), tmp_path,
                 scorer=services.scorer, generator=services.generator)  # fmt: skip
    probe = [torch.tensor(p) for p in setup["prompt_ids"][:3]]
    try:
        run.connect()  # a fresh run resets the critic
        initial_values = services.scorer.score(probe)[1]
        first, second = run.step(), run.step()
    finally:
        run.collector.close()
        run.critic_pool.shutdown(wait=True)
    for result in (first, second):
        for phase in bench_ppo.PHASES:
            assert result[f"time_{phase}"] > 0.0, phase
        assert result["consumed_samples"] == bench_ppo.PROMPTS * result["step"]
    assert second["policy_version"] == first["policy_version"] + 1
    assert second["critic_step"] == first["critic_step"] + 1
    assert first["critic_num_sequences"] == bench_ppo.PROMPTS
    # The engine holds its own copy of the weights, equal to the actor's after the sync.
    engine_state = services.generation.engine.model.state_dict()
    for name, value in run.actor.state_dict().items():
        if isinstance(value, torch.Tensor) and not name.endswith("_extra_state"):
            assert value.data_ptr() != engine_state[name].data_ptr(), name
            torch.testing.assert_close(engine_state[name], value, rtol=0, atol=0, msg=name)
    # The critic trained; a reset brings back its initial weights.
    assert any(not torch.equal(a, b) for a, b in zip(services.scorer.score(probe)[1], initial_values, strict=True))
    services.scorer.reset_critic()
    for a, b in zip(services.scorer.score(probe)[1], initial_values, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.integration
def test_in_process_services_compute_what_the_launched_services_compute(setup, tmp_path):
    """Same calls through `clients.connect` (gRPC to the launched services) and through the
    in-process components built from the configs those services loaded: equal responses, scores,
    logprobs and critic updates."""
    from services.orchestrator import clients

    with bench_ppo.launched_services(setup, service_threads=1) as (_group, overrides, configs):
        scorer, generator = clients.connect(bench_ppo.ppo_config(setup, tmp_path, overrides, 1, bench_ppo.PROMPTS))
        local = InProcessServices(configs["reward-critic"], configs["reference"], configs["generation"])
        try:
            prompts = setup["prompt_ids"][:8]
            sampling = _sampling(end_id=local.generation.limits.default_end_id)
            over_grpc = generator.generate(prompts, sampling, list(range(8)), 0)
            in_process = local.generator.generate(prompts, sampling, list(range(8)), 0)
            assert _tokens(over_grpc) == _tokens(in_process)
            assert [r.ended for r in over_grpc] == [r.ended for r in in_process]
            for a, b in zip(over_grpc, in_process, strict=True):
                torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=1e-4, atol=1e-4)

            sequences = [torch.tensor(p + r.tokens) for p, r in zip(prompts, in_process, strict=True)]
            (rewards_a, values_a), (rewards_b, values_b) = scorer.score(sequences), local.scorer.score(sequences)
            torch.testing.assert_close(rewards_a, rewards_b, rtol=1e-4, atol=1e-5)
            for a, b in zip(values_a + scorer.ref_logprobs(sequences),
                            values_b + local.scorer.ref_logprobs(sequences), strict=True):  # fmt: skip
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

            # One critic update on the same rollout from the same initial critic.
            g = torch.Generator().manual_seed(0)
            mask = [(torch.arange(len(s) - 1) >= len(p) - 1).float() for s, p in zip(sequences, prompts, strict=True)]
            returns = [torch.randn(len(s) - 1, generator=g) for s in sequences]
            scorer.reset_critic()
            local.scorer.reset_critic()
            trained = [s.train_critic("test:1", sequences, mask, returns, values_b, chunk_size=3)
                       for s in (scorer, local.scorer)]  # fmt: skip
            assert trained[0].keys() == trained[1].keys()
            for key in ("critic_value_loss", "critic_grad_norm", "critic_num_tokens", "critic_step"):
                assert trained[0][key] == pytest.approx(trained[1][key], rel=1e-4), key
        finally:
            scorer.close()
            generator.close()
            local.close()
