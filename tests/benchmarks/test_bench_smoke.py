"""The PPO benchmark's pieces (no timings asserted): the in-process twins of the services
(`services/orchestrator/local.py`) follow the services' rules, a PPO step runs over them, and they
compute what the real services compute."""

from __future__ import annotations

import inspect
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
from services.orchestrator.local import LocalGeneration, LocalModels, use_in_process  # noqa: E402

SAMPLE = dict(max_new_tokens=bench_ppo.NEW_TOKENS, temperature=1.0, top_k=0, top_p=1.0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    return bench_ppo.make_setup(tmp_path_factory.mktemp("bench_ppo"))


def _model_config(setup: dict, name: str, checkpoint: Path) -> ModelServiceConfig:
    config = ModelServiceConfig(
        name=name, checkpoint_path=str(checkpoint), tokenizer_path=str(setup["tokenizer"])
    )
    config.model.global_batch_size, config.model.micro_batch_size = bench_ppo.PROMPTS, bench_ppo.MICRO_BATCH
    return config


@pytest.fixture(scope="module")
def models(setup):
    twin = LocalModels(
        _model_config(setup, "reward-critic", setup["reward"]),
        _model_config(setup, "reference", setup["policy"]),
    )
    yield twin
    twin.close()


def _generation(setup: dict) -> LocalGeneration:
    return LocalGeneration(GenerationServiceConfig(checkpoint_path=str(setup["policy"])))


@pytest.fixture(scope="module")
def generation(setup):
    twin = _generation(setup)
    yield twin
    twin.close()


def _tokens(results) -> list[list[int]]:
    return [r.tokens for r in results]


def _methods(cls) -> dict[str, list[str]]:
    return {
        name: list(inspect.signature(fn).parameters)
        for name, fn in inspect.getmembers(cls, inspect.isfunction)
        if not name.startswith("_")
    }


def test_twins_have_the_methods_of_what_they_stand_in_for():
    from services.generation.client import GenerationClient
    from services.orchestrator.remote import RemoteModels

    remote, local = _methods(RemoteModels), _methods(LocalModels)
    assert {name: local.get(name) for name in remote} == remote
    client, local = _methods(GenerationClient), _methods(LocalGeneration)
    for name in ("generate", "push_weights", "wait_ready", "info", "close"):  # what the orchestrator calls
        assert set(local[name]) <= set(client[name]), name


def test_generation_twin_sampling_rules(setup, generation):
    prompts = setup["prompt_ids"][:6]
    eos = generation.limits.default_end_id
    first = generation.generate(prompts, seeds=list(range(6)), end_id=eos, **SAMPLE)
    again = generation.generate(prompts, seeds=list(range(6)), end_id=eos, **SAMPLE)
    other = generation.generate(prompts, seeds=list(range(100, 106)), end_id=eos, **SAMPLE)
    assert _tokens(first) == _tokens(again)  # a seed fixes a response
    assert _tokens(first) != _tokens(other)
    for r in first:
        assert len(r.tokens) == len(r.logprobs) <= bench_ppo.NEW_TOKENS
        assert r.ended == (r.tokens[-1] == eos or len(r.tokens) < bench_ppo.NEW_TOKENS)
        assert all(lp <= 0.0 for lp in r.logprobs)
    # Greedy (also top-1, as the server reads it) ignores the seeds.
    greedy = [
        _tokens(generation.generate(prompts, seeds=seeds, greedy=True, end_id=eos, **SAMPLE))
        for seeds in (list(range(6)), list(range(50, 56)))
    ]
    top1 = generation.generate(prompts, seeds=list(range(6)), end_id=eos, **(SAMPLE | {"top_k": 1}))
    assert greedy[0] == greedy[1] == _tokens(top1)


def test_generation_twin_weight_versions(setup):
    twin = _generation(setup)
    try:
        prompts = setup["prompt_ids"][:4]
        greedy = dict(SAMPLE, greedy=True, end_id=None)
        before = _tokens(twin.generate(prompts, **greedy))
        assert twin.wait_ready().policy_version == 0
        with pytest.raises(StaleVersion, match="policy_version"):
            twin.generate(prompts, policy_version=1, **greedy)  # weights newer than the engine's
        state = {
            k: v.clone() for k, v in twin.engine.model.state_dict().items() if isinstance(v, torch.Tensor)
        }
        out = next(k for k in state if k.endswith("output_layer.weight"))
        state[out] = torch.randn_like(state[out])
        reply = twin.push_weights(state, version=1)
        assert (reply.policy_version, twin.info().policy_version) == (1, 1)
        assert reply.num_bytes == sum(
            t.numel() * t.element_size() for k, t in state.items() if "_extra" not in k
        )
        assert _tokens(twin.generate(prompts, policy_version=1, **greedy)) != before
        with pytest.raises(StaleVersion, match="not newer"):
            twin.push_weights(state, version=1)
    finally:
        twin.close()


def test_ppo_steps_over_the_twins(setup, models, generation, tmp_path):
    from services.orchestrator.run import PpoRun

    # Two rollout micro-batches of 8: scoring of the first overlaps generation of the second.
    run = PpoRun(bench_ppo.ppo_config(setup, tmp_path, [], 1, 8), tmp_path)
    use_in_process(run, models, generation)
    probe = [torch.tensor(p) for p in setup["prompt_ids"][:3]]
    try:
        run.connect()  # a fresh run resets the critic
        initial_values = models.score(probe)[1]
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
    engine_state = generation.engine.model.state_dict()
    for name, value in run.actor.state_dict().items():
        if isinstance(value, torch.Tensor) and not name.endswith("_extra_state"):
            assert value.data_ptr() != engine_state[name].data_ptr(), name
            torch.testing.assert_close(engine_state[name], value, rtol=0, atol=0, msg=name)
    # The critic trained; a reset brings back its initial weights and step.
    assert any(not torch.equal(a, b) for a, b in zip(models.score(probe)[1], initial_values, strict=True))
    models.reset_critic()
    assert models.critic_trainer.step == 0
    for a, b in zip(models.score(probe)[1], initial_values, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.integration
def test_twins_compute_what_the_services_compute(setup, tmp_path):
    """Same requests to the launched services (gRPC) and to the twins built from the configs
    those services loaded: equal responses, scores, logprobs and critic updates."""
    from services.generation.client import GenerationClient
    from services.orchestrator.remote import RemoteModels

    with bench_ppo.launched_services(setup, service_threads=1) as (group, overrides, configs):
        remote = RemoteModels(bench_ppo.ppo_config(setup, tmp_path, overrides, 1, bench_ppo.PROMPTS))
        info = group["generation"].info
        client = GenerationClient(
            f"{info['host']}:{info['triton_grpc_port']}", control_url=f"{info['host']}:{info['port']}"
        )
        models = LocalModels(configs["reward-critic"], configs["reference"])
        generation = LocalGeneration(configs["generation"])
        try:
            prompts = setup["prompt_ids"][:8]
            eos = generation.limits.default_end_id
            asked = dict(SAMPLE, seeds=list(range(8)), end_id=eos)
            over_grpc, in_process = client.generate(prompts, **asked), generation.generate(prompts, **asked)
            assert _tokens(over_grpc) == _tokens(in_process)
            assert [r.ended for r in over_grpc] == [r.ended for r in in_process]
            for a, b in zip(over_grpc, in_process, strict=True):
                torch.testing.assert_close(
                    torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=1e-4, atol=1e-4
                )

            sequences = [torch.tensor(p + r.tokens) for p, r in zip(prompts, in_process, strict=True)]
            (rewards_a, values_a), (rewards_b, values_b) = remote.score(sequences), models.score(sequences)
            torch.testing.assert_close(rewards_a, rewards_b, rtol=1e-4, atol=1e-5)
            for a, b in zip(
                values_a + remote.ref_logprobs(sequences),
                values_b + models.ref_logprobs(sequences),
                strict=True,
            ):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

            # One critic update on the same rollout from the same initial critic.
            g = torch.Generator().manual_seed(0)
            mask = [
                (torch.arange(len(s) - 1) >= len(p) - 1).float()
                for s, p in zip(sequences, prompts, strict=True)
            ]
            returns = [torch.randn(len(s) - 1, generator=g) for s in sequences]
            trained = [
                m.train_critic(sequences, mask, returns, values_b, chunk_size=3) for m in (remote, models)
            ]
            assert trained[0].keys() == trained[1].keys()
            for key in ("critic_value_loss", "critic_grad_norm", "critic_num_tokens", "critic_step"):
                assert trained[0][key] == pytest.approx(trained[1][key], rel=1e-4), key
        finally:
            client.close()
            models.close()
            generation.close()
