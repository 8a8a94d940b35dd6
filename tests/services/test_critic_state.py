"""The critic's state over the wire: each rollout id is applied once (a retry after a missed
deadline waits for the training still running instead of training again), the applied ids
travel with Save/Load, Info says who the critic is, a failed Load changes nothing, a half-written
checkpoint is never loaded (not even after a kill -9 mid-Save), and Save/Load paths stay inside
`server.checkpoint_root`.

Most tests run the real critic component behind a real gRPC server on 127.0.0.1 in this process
(its event loop in a thread), so that a test can hold the model thread busy and order a retry
before the first training ends. The kill test runs `aligner serve critic` as a subprocess."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from aligner.v1 import critic_pb2

from common.codec import ragged_to_proto
from services.critic.client import CriticClient

pytestmark = pytest.mark.integration

TRAINING = {
    "model.optim.lr": 1e-3,
    "model.optim.weight_decay": 0.0,
    "model.optim.sched.name": "Constant",
    "model.micro_batch_size": 4,
    "model.global_batch_size": 64,
}
PROMPT = 4


def _sequences(n: int = 6, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 320, (int(k),), generator=g) for k in torch.randint(8, 24, (n,), generator=g)]


SEQUENCES = _sequences()


def _rollout(old_values: list[torch.Tensor]):
    g = torch.Generator().manual_seed(1)
    mask = [torch.tensor([0.0] * (PROMPT - 1) + [1.0] * (len(s) - PROMPT)) for s in SEQUENCES]
    returns = [torch.rand(len(s) - 1, generator=g) * 2 - 1 for s in SEQUENCES]
    return SEQUENCES, mask, returns, old_values


def _requests(rollout, rollout_id: str, chunk_size: int = 4) -> list[critic_pb2.TrainRequest]:
    tokens, mask, returns, old_values = rollout
    return [
        critic_pb2.TrainRequest(
            tokens=ragged_to_proto(tokens[i : i + chunk_size], dtype=torch.int64),
            mask=ragged_to_proto(mask[i : i + chunk_size], dtype=torch.float32),
            returns=ragged_to_proto(returns[i : i + chunk_size], dtype=torch.float32),
            old_values=ragged_to_proto(old_values[i : i + chunk_size], dtype=torch.float32),
            rollout_id=rollout_id if i == 0 else "",
        )
        for i in range(0, len(tokens), chunk_size)
    ]


def _wait_until(condition, what: str, timeout: float = 120.0) -> None:
    """Poll `condition` (a bound on a hang, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.01)


@dataclass
class InProcessCritic:
    component: object  # services.critic.server.CriticComponent
    target: str
    root: Path

    def client(self, **kwargs) -> CriticClient:
        return CriticClient(self.target, **kwargs)

    def block_model_thread(self) -> threading.Event:
        """Keep the model thread busy until the returned event is set."""
        release = threading.Event()
        self.component.worker.executor.submit(release.wait)
        return release


@pytest.fixture(scope="module")
def critic(checkpoints, service_config, tmp_path_factory):
    """The critic component behind a GrpcServer on 127.0.0.1:<free port>, loop in a thread; its
    checkpoint root is a fresh directory. Stopped (and its model thread joined) at module end."""
    from common.grpc_server import GrpcServer
    from services.critic.server import CriticComponent
    from services.model_server import ModelWorker

    root = tmp_path_factory.mktemp("critic_root")
    config = service_config(
        "critic", {**TRAINING, "server.checkpoint_root": str(root), "server.metrics_port": -1}
    )
    worker = ModelWorker()
    component = CriticComponent(config, worker)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="critic-test-loop", daemon=True)
    thread.start()
    holder = {}

    async def start() -> int:
        server = GrpcServer(config.server, "critic")
        holder["server"] = server
        component.add_to(server)
        port = await server.start()
        await loop.run_in_executor(worker.executor, component.load)
        await component.start()
        await server.set_serving(True)
        return port

    async def stop() -> None:
        if "server" in holder:
            await holder["server"].stop(1.0)
        await component.close()

    try:
        port = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=300)
        yield InProcessCritic(component, f"127.0.0.1:{port}", root)
    finally:
        asyncio.run_coroutine_threadsafe(stop(), loop).result(timeout=60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=60)
        worker.shutdown()


def _rpc_error(fn) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value


# ---------------------------------------------------------------------------------------------
# Exactly once
# ---------------------------------------------------------------------------------------------


def test_train_needs_one_rollout_id_naming_the_field(critic):
    client = critic.client(retry=None)
    rollout = _rollout([torch.zeros(len(s) - 1) for s in SEQUENCES])
    step = client.info().step
    for rollout_id, problem in (("", "is required"), ("x" * 257, "longer than 256")):
        err = _rpc_error(
            lambda rollout_id=rollout_id: client._stub.Train(iter(_requests(rollout, rollout_id)))
        )
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.details().startswith("rollout_id:") and problem in err.details(), err.details()
    requests = _requests(rollout, "one")
    requests[1].rollout_id = "another"
    err = _rpc_error(lambda: client._stub.Train(iter(requests)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("rollout_id:") and "stream message 1" in err.details(), err.details()
    assert client.info().step == step  # nothing trained
    # ... and "one" was not applied by the refused stream: it trains now.
    assert not client.train_rollout(*rollout, rollout_id="one").replayed


def test_a_retried_rollout_is_applied_once(critic):
    client = critic.client()
    rollout = _rollout(client.values(SEQUENCES))
    first = client.train_rollout(*rollout, rollout_id="retried")
    values = client.values(SEQUENCES)
    again = client.train_rollout(*rollout, chunk_size=2, rollout_id="retried")
    assert not first.replayed and again.replayed
    assert (again.step, again.metrics) == (first.step, first.metrics)
    for got, want in zip(client.values(SEQUENCES), values, strict=True):
        assert torch.equal(got, want)  # the retry did not train
    info = client.info()
    assert (info.step, info.last_rollout_id) == (first.step, "retried")
    assert info.remembered_rollouts >= 1 and len(info.incarnation) == 32


def test_a_retry_after_a_missed_deadline_waits_for_the_training_still_running(critic):
    """The first call's deadline passes while its rollout trains (the model thread is held busy);
    its retry arrives while that training still runs and waits for it: one optimizer step."""
    client = critic.client(retry=None)
    rollout = _rollout(client.values(SEQUENCES))
    step = client.info().step
    training = critic.component.training
    release = critic.block_model_thread()
    try:
        first = client._stub.Train.future(iter(_requests(rollout, "slow")), timeout=5)
        _wait_until(lambda: "slow" in training or first.done(), "the first call to start training")
        assert "slow" in training, first.exception()
        assert _rpc_error(first.result).code() == grpc.StatusCode.DEADLINE_EXCEEDED
        retry = client._stub.Train.future(iter(_requests(rollout, "slow")), timeout=300)
        _wait_until(lambda: training["slow"].waiting == 1, "the retry to wait for the first training")
    finally:
        release.set()
    reply = retry.result()
    assert reply.replayed and reply.step == step + 1 and reply.rollout_id == "slow"
    assert client.info().step == step + 1  # trained once
    again = client.train_rollout(*rollout, rollout_id="slow")
    assert again.replayed and again.step == step + 1 and again.metrics == dict(reply.metrics)


def test_applied_ids_travel_with_save_and_load(critic):
    client = critic.client()
    rollout = _rollout(client.values(SEQUENCES))
    applied = client.train_rollout(*rollout, rollout_id="before-save")
    client.save("travel/ckpt")
    saved = json.loads((critic.root / "travel" / "ckpt" / "meta.json").read_text())["extra"]
    assert saved["kind"] == "critic" and saved["applied_rollouts"][-1]["id"] == "before-save"
    after = client.train_rollout(*rollout, rollout_id="after-save")

    client.reset()  # a fresh critic: no rollout applied
    info = client.info()
    assert (info.step, info.last_rollout_id, info.initial, info.remembered_rollouts) == (0, "", True, 0)
    assert info.checkpoint_path == str(critic.component.config.checkpoint_path)

    assert client.load("travel/ckpt") == applied.step
    info = client.info()
    assert (info.step, info.last_rollout_id, info.initial) == (applied.step, "before-save", False)
    assert info.checkpoint_path == "travel/ckpt"  # as the caller sent it
    replay = client.train_rollout(*rollout, rollout_id="before-save")
    assert replay.replayed and (replay.step, replay.metrics) == (applied.step, applied.metrics)
    # Applied after the checkpoint: news to the loaded critic, and the same update again.
    again = client.train_rollout(*rollout, rollout_id="after-save")
    assert not again.replayed and (again.step, again.metrics) == (after.step, after.metrics)


def test_the_remembered_ids_are_bounded(critic, monkeypatch):
    from services.critic import server

    monkeypatch.setattr(server, "REMEMBERED_ROLLOUTS", 3)
    record = server.Applied(1, {"value_loss": 0.5})
    kept = server.AppliedRollouts([(f"r{i}", record) for i in range(5)])
    assert [r["id"] for r in kept.to_json()] == ["r2", "r3", "r4"]
    kept.add("r5", record)
    assert kept.get("r2") is None and kept.get("r5") == record and len(kept) == 3


# ---------------------------------------------------------------------------------------------
# All-or-nothing Load
# ---------------------------------------------------------------------------------------------


def _other_shape_critic_checkpoint(path: Path, checkpoints) -> None:
    """A critic checkpoint (weights, Adam moments, schedule) of a narrower model."""
    import dataclasses

    from common.config import CriticModelConfig
    from trainer.checkpoint import save_checkpoint
    from trainer.critic import CriticTrainer, pad_rollout
    from trainer.model import build_model

    arch = dataclasses.replace(checkpoints.arch, hidden_size=32, ffn_hidden_size=64)
    model = build_model(arch, value_head=True, seed=5)
    trainer = CriticTrainer(model, CriticModelConfig(), gradient_clip_val=1.0, max_steps=10)
    seqs, mask, returns, old = _rollout([torch.zeros(len(s) - 1) for s in SEQUENCES])
    trainer.train(pad_rollout(list(seqs), mask, returns, old))
    save_checkpoint(
        path, model, trainer.optimizer, trainer.scheduler, step=1, arch=arch, extra={"kind": "critic"}
    )


def test_a_failed_load_changes_nothing(critic, checkpoints):
    client = critic.client(retry=None)
    rollout = _rollout(client.values(SEQUENCES))
    client.train_rollout(*rollout, rollout_id="load-1")
    client.save("failed_load/good")
    client.train_rollout(*rollout, rollout_id="load-2")
    client.save("failed_load/now")  # the state every failed Load must leave alone
    values, info = client.values(SEQUENCES), client.info()

    d = critic.root / "failed_load"
    good_meta = (d / "good" / "meta.json").read_text()
    shutil.copytree(d / "good", d / "broken_meta")
    (d / "broken_meta" / "meta.json").write_text("{not json")
    shutil.copytree(checkpoints.reward, d / "reward_model")  # a checkpoint, but not a critic's
    shutil.copytree(d / "good", d / "half_written")  # what a killed Save leaves: no meta.json
    (d / "half_written" / "meta.json").unlink()
    other = json.loads(good_meta)
    other["arch"]["hidden_size"] = 32
    shutil.copytree(d / "good", d / "other_arch")
    (d / "other_arch" / "meta.json").write_text(json.dumps(other))
    # Weights of another shape under a meta.json that fits: fails while reading the weights,
    # after the loader began to replace the optimizer state.
    _other_shape_critic_checkpoint(d / "wrong_shapes", checkpoints)
    (d / "wrong_shapes" / "meta.json").write_text(good_meta)
    applied = json.loads(good_meta)
    applied["extra"]["applied_rollouts"] = [{"id": "x"}]
    shutil.copytree(d / "good", d / "bad_ids")
    (d / "bad_ids" / "meta.json").write_text(json.dumps(applied))

    cases = {
        "failed_load/missing": (grpc.StatusCode.NOT_FOUND, "does not exist"),
        "failed_load/broken_meta": (grpc.StatusCode.INVALID_ARGUMENT, "not valid JSON"),
        "failed_load/reward_model": (grpc.StatusCode.INVALID_ARGUMENT, "not a critic checkpoint"),
        "failed_load/half_written": (grpc.StatusCode.INVALID_ARGUMENT, "not a complete checkpoint"),
        str(d / "other_arch"): (grpc.StatusCode.INVALID_ARGUMENT, "hidden_size 32"),
        "failed_load/wrong_shapes": (grpc.StatusCode.INVALID_ARGUMENT, "could not be loaded"),
        "failed_load/bad_ids": (grpc.StatusCode.INVALID_ARGUMENT, "applied_rollouts"),
    }
    for path, (code, problem) in cases.items():
        err = _rpc_error(lambda path=path: client.load(path))
        details = err.details()
        assert err.code() == code and problem in details, (path, details)
        assert details.startswith("path:") and "Traceback" not in details and "\n" not in details, details
        assert str(critic.root) not in details.replace(path, ""), details  # only the caller's path
        assert client.info() == info, path
        for got, want in zip(client.values(SEQUENCES), values, strict=True):
            assert torch.equal(got, want), path

    # Optimizer state and schedule too: the next update equals the one from the saved state.
    after_failures = client.train_rollout(*rollout, rollout_id="load-3")
    values_after = client.values(SEQUENCES)
    client.load("failed_load/now")
    reference = client.train_rollout(*rollout, rollout_id="load-3-again")
    assert (after_failures.step, after_failures.metrics) == (reference.step, reference.metrics)
    for got, want in zip(client.values(SEQUENCES), values_after, strict=True):
        assert torch.equal(got, want)


# ---------------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------------


def test_save_and_load_paths_stay_inside_the_checkpoint_root(critic, tmp_path):
    client = critic.client(retry=None)
    root = critic.root
    outside = tmp_path / "outside"  # tmp_path is not under the critic's root
    (root / "link_out").symlink_to(tmp_path, target_is_directory=True)
    client.save("paths/inside")
    shutil.copytree(root / "paths" / "inside", outside)
    refused = ["../escape", "paths/../../escape", str(outside), "link_out/ckpt", ".", str(root), "/"]
    for path in refused:
        for call in (client.save, client.load):
            err = _rpc_error(lambda call=call, path=path: call(path))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (path, err.details())
            assert err.details().startswith("path:") and "checkpoint_root" in err.details(), err.details()
            assert str(root) not in err.details().replace(path, "")
    assert not (root.parent / "escape").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["outside"]
    # Inside: relative to the root, or absolute, also through a symlink that stays inside.
    (root / "link_in").symlink_to(root / "paths", target_is_directory=True)
    step = client.info().step
    assert client.save(str(root / "paths" / "absolute")) == step
    assert client.load("link_in/absolute") == step
    assert client.load("paths/./inside") == step


def test_save_replaces_only_a_critic_checkpoint_or_an_empty_directory(critic):
    client = critic.client(retry=None)
    d = critic.root / "replace"
    client.save("replace/ckpt")
    (d / "ckpt" / "marker").write_text("old")
    client.save("replace/ckpt")  # a critic checkpoint: replaced atomically
    assert not (d / "ckpt" / "marker").exists() and (d / "ckpt" / "meta.json").is_file()
    (d / "empty").mkdir()
    client.save("replace/empty")
    assert (d / "empty" / "meta.json").is_file()

    (d / "data").mkdir()
    (d / "data" / "prompts.jsonl").write_text("keep me")
    (d / "file").write_text("keep me too")
    shutil.copytree(d / "ckpt", d / "half_written")
    (d / "half_written" / "meta.json").unlink()
    for name, problem in (("data", "not a critic checkpoint"), ("file", "not a directory"),
                          ("half_written", "not a critic checkpoint")):  # fmt: skip
        err = _rpc_error(lambda name=name: client.save(f"replace/{name}"))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and problem in err.details(), err.details()
    assert (d / "data" / "prompts.jsonl").read_text() == "keep me" and (
        d / "file"
    ).read_text() == "keep me too"
    assert (d / "half_written" / "weights").is_dir()
    assert sorted(p.name for p in d.iterdir()) == ["ckpt", "data", "empty", "file", "half_written"]


def test_the_default_checkpoint_root_is_the_working_directory(
    checkpoints, service_config, tmp_path, monkeypatch
):
    from services.critic.server import CriticComponent
    from services.model_server import ModelWorker

    monkeypatch.chdir(tmp_path)
    component = CriticComponent(service_config("critic"), ModelWorker())
    try:
        assert component.checkpoint_root == tmp_path.resolve()
        assert component.checkpoint_path("runs/critic") == tmp_path.resolve() / "runs" / "critic"
        with pytest.raises(Exception, match="^path: .*checkpoint_root"):
            component.checkpoint_path(str(tmp_path.parent / "elsewhere"))
    finally:
        component.worker.shutdown()


# ---------------------------------------------------------------------------------------------
# kill -9 mid-Save
# ---------------------------------------------------------------------------------------------


def test_a_critic_killed_mid_save_leaves_the_previous_checkpoint(service_config, critic, tmp_path):
    """SIGKILL the critic process while its Save writes: the checkpoint's name still holds the
    previous complete checkpoint (it loads), and what the killed Save left is never taken for one."""
    from tests.services.conftest import Server

    root = critic.root / "killed"
    config = service_config("critic", {**TRAINING, "server.checkpoint_root": str(root)})
    server = Server("critic", config, tmp_path / "killed_server")
    try:
        server.wait_serving()
        client = CriticClient(server.target, retry=None)
        rollout = _rollout(client.values(SEQUENCES))
        client.train_rollout(*rollout, rollout_id="k1")
        first_step = client.save("ckpt")
        client.train_rollout(*rollout, rollout_id="k2")
        saving = threading.Thread(target=lambda: _rpc_error(lambda: client.save("ckpt")), daemon=True)
        saving.start()
        _wait_until(
            lambda: any(".tmp-" in p.name for p in root.iterdir()), "the second Save to start writing"
        )
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait()
        saving.join(timeout=60)
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()

    meta = json.loads((root / "ckpt" / "meta.json").read_text())
    leftovers = [p for p in root.iterdir() if p.name != "ckpt"]
    if meta["step"] == first_step:  # killed while writing (the usual case)
        assert leftovers and all(".tmp-" in p.name for p in leftovers), leftovers
    # Whatever the moment of the kill, the name holds a complete critic checkpoint: it loads
    # (through the in-process critic, whose root holds this directory), with its applied ids.
    before = critic.component.progress
    client = critic.client(retry=None)
    try:
        assert client.load("killed/ckpt") == meta["step"]
        assert client.info().last_rollout_id == ("k1" if meta["step"] == first_step else "k2")
        for leftover in leftovers:
            if not (leftover / "meta.json").is_file():  # half written: refused
                err = _rpc_error(lambda leftover=leftover: client.load(f"killed/{leftover.name}"))
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a complete" in err.details()
    finally:
        client.reset() if before.initial else client.load(before.checkpoint_path)
