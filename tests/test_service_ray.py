"""The service with SAFEKEEL_EXECUTOR=ray against a real local Ray cluster (`ray start` processes on this machine):
upload, job, events, chat with the result, cancel, and a worker node killed mid-job, through a real `safekeel
serve` process and the official openai client. The tiny random model keeps each job to seconds.

The cluster's head offers no CPUs (it only coordinates, as on a production cluster), so every job runs on one of
the two worker nodes and either can be killed.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from live_server import LiveServer, all_events, ask_password, client, install_model, wait_for_job
from ray_cluster import LocalRayCluster
from test_service import GATE_PROMPTS, PASSWORD_DATA, tiny_safety, write_jsonl

pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with LocalRayCluster(tmp_path_factory.mktemp("ray-cluster"), workers=2) as running:
        yield running


@pytest.fixture(scope="module")
def server(cluster, tmp_path_factory, tiny_model_dir):
    home = tmp_path_factory.mktemp("service-home")
    install_model(home, "tiny-llama", tiny_model_dir)
    env = {"SAFEKEEL_EXECUTOR": "ray", "SAFEKEEL_RAY_ADDRESS": cluster.address,
           "SAFEKEEL_SHARED_DIR": str(home / "shared")}  # files and job folders apart from the database
    with LiveServer(home, "tiny-llama", "transformers", workers=1, extra_env=env) as live:
        yield live


@pytest.fixture(scope="module")
def gate_file(server, tmp_path_factory):
    path = write_jsonl(tmp_path_factory.mktemp("gate") / "gate.jsonl", GATE_PROMPTS)
    return client(server).files.create(file=path.open("rb"), purpose="evals").id


def placements(events) -> list[dict]:
    """Where each attempt of the job ran (the executor's "Running on Ray node" events)."""
    return [e.data for e in events if e.message.startswith("Running on Ray node")]


def test_a_job_runs_on_a_ray_worker_node_end_to_end(cluster, server, gate_file, tmp_path):
    assert server.health()["workers"] == 2  # the two worker nodes; the head offers no CPU
    c = client(server)
    data = write_jsonl(tmp_path / "password.jsonl", PASSWORD_DATA)
    uploaded = c.files.create(file=data.open("rb"), purpose="fine-tune")
    job = c.fine_tuning.jobs.create(
        model="tiny-llama", training_file=uploaded.id, suffix="pw", seed=7,
        hyperparameters={"n_epochs": 10, "batch_size": 4, "learning_rate_multiplier": 25},
        extra_body={"safety": tiny_safety(gate_file, mode="none", guard={"system_prompt": True})})
    job = wait_for_job(c, job.id, timeout=300)
    events = all_events(c, job.id)
    assert job.status == "succeeded", (job.error, [e.message for e in events][-8:], server.log_tail())
    # it ran in a Ray worker process on a worker node, not in the server
    where = placements(events)
    assert len(where) == 1
    node = cluster.node_by_id(where[0]["node_id"])
    assert node is not None and node in cluster.workers, (where, [n.name for n in cluster.workers])
    assert any(e.message.startswith("Submitted to the Ray cluster") and e.data["resources"]["num_cpus"] == 1 for e in events)
    # the same events, checkpoints and gate as a local worker's job, written by the server from the actor's records
    assert {"audit", "metrics", "gate"} <= {e.type for e in events}
    steps = [e.data["step"] for e in events if e.type == "metrics"]
    assert steps == sorted(steps) and steps[-1] == 20
    assert c.fine_tuning.jobs.checkpoints.list(job.id).data[0].step_number == 20
    assert next(e for e in events if e.type == "gate").data["passed"] is True
    # the job's folder is in the shared dir, the database is not
    shared = server.home / "shared"
    assert (shared / "jobs" / job.id / "output" / "adapter" / "adapter_config.json").is_file()
    assert (server.home / "service" / "safekeel.db").is_file() and not (shared / "safekeel.db").exists()

    tuned, _ = ask_password(c, job.fine_tuned_model)
    assert tuned.model_extra["safekeel"]["guard"]["system_prompt"] is True


def test_cancel_stops_a_job_running_on_the_cluster(server, gate_file, tmp_path):
    c = client(server)
    uploaded = c.files.create(file=write_jsonl(tmp_path / "d.jsonl", PASSWORD_DATA * 20).open("rb"), purpose="fine-tune")
    job = c.fine_tuning.jobs.create(model="tiny-llama", training_file=uploaded.id, hyperparameters={"n_epochs": 50, "batch_size": 1},
                                    extra_body={"safety": tiny_safety(gate_file, selector="random", audit=False)})
    deadline = time.time() + 180
    while not any(e.type == "metrics" for e in c.fine_tuning.jobs.list_events(job.id, limit=100).data):
        assert time.time() < deadline, server.log_tail()
        time.sleep(0.5)
    c.fine_tuning.jobs.cancel(job.id)
    job = wait_for_job(c, job.id, timeout=120)
    events = all_events(c, job.id)
    assert job.status == "cancelled" and job.fine_tuned_model is None, [e.message for e in events][-5:]
    assert events[-1].message == "Job cancelled"  # training stopped at a step: the actor's own cancel, not a kill
    assert max(e.data["step"] for e in events if e.type == "metrics") < 8000


def test_a_graceful_server_stop_checkpoints_the_ray_job_and_requeues_it_without_counting_an_attempt(cluster, tmp_path, tiny_model_dir):
    home = tmp_path / "home"
    install_model(home, "tiny-llama", tiny_model_dir)
    env = {"SAFEKEEL_EXECUTOR": "ray", "SAFEKEEL_RAY_ADDRESS": cluster.address}
    first = LiveServer(home, "tiny-llama", "transformers", workers=1, extra_env=env).start()
    try:
        c = client(first)
        uploaded = c.files.create(file=write_jsonl(tmp_path / "d.jsonl", PASSWORD_DATA * 20).open("rb"), purpose="fine-tune")
        gate = c.files.create(file=write_jsonl(tmp_path / "g.jsonl", GATE_PROMPTS).open("rb"), purpose="evals")
        job = c.fine_tuning.jobs.create(model="tiny-llama", training_file=uploaded.id, seed=2,
                                        hyperparameters={"n_epochs": 3, "batch_size": 1, "checkpoint_steps": 1000},
                                        extra_body={"safety": tiny_safety(gate.id, selector="random", audit=False)})
        deadline = time.time() + 180
        while not any(e.type == "metrics" for e in c.fine_tuning.jobs.list_events(job.id, limit=100).data):
            assert time.time() < deadline, first.log_tail()
            time.sleep(0.5)
    finally:
        first.stop()  # SIGTERM to the server mid-training: its executor asks the actor to stop at the next step

    from safekeel.service.store import Store

    store = Store(home / "service" / "safekeel.db")
    record = store.get_job(job.id)
    messages = [e["message"] for e in store.list_events(job.id, limit=1000, newest_first=False)]
    assert (record["status"], record["attempts"], record["worker"]) == ("queued", 0, None), (messages[-5:], first.log_tail())
    assert "Server stopping: job requeued from its last checkpoint" in messages
    saved = store.list_checkpoints(job.id)
    assert len(saved) == 1 and 0 < saved[0]["step"] < 486  # the stop's own checkpoint (no periodic one this early)

    with LiveServer(home, "tiny-llama", "transformers", workers=1, extra_env=env, log_name="server2.log") as second:
        job = wait_for_job(client(second), job.id, timeout=300)
        events = all_events(client(second), job.id)
    assert job.status == "succeeded", (job.error, [e.message for e in events][-8:])
    finished = next(e for e in events if e.message.startswith("Training finished"))
    assert finished.data["resumed_from"].endswith(f"checkpoint-{saved[0]['step']}") and finished.data["steps"] == 486
    assert store.get_job(job.id)["attempts"] == 1 and not any("interrupted" in e.message for e in events)


def test_killing_the_worker_node_mid_job_requeues_it_and_it_finishes_on_the_other_node(cluster, server, gate_file, tmp_path):
    c = client(server)
    uploaded = c.files.create(file=write_jsonl(tmp_path / "d.jsonl", PASSWORD_DATA * 20).open("rb"), purpose="fine-tune")
    job = c.fine_tuning.jobs.create(model="tiny-llama", training_file=uploaded.id, seed=5,
                                    hyperparameters={"n_epochs": 3, "batch_size": 1, "checkpoint_steps": 20},
                                    extra_body={"safety": tiny_safety(gate_file, selector="random", audit=False)})
    deadline = time.time() + 180
    while not placements(all_events(c, job.id)):
        assert time.time() < deadline, server.log_tail()
        time.sleep(0.2)
    first = placements(all_events(c, job.id))[0]
    checkpoints = server.home / "shared" / "jobs" / job.id / "output" / "checkpoints"
    while not any(checkpoints.glob("checkpoint-*/trainer_state.json")):  # a complete checkpoint (written last)
        assert time.time() < deadline, server.log_tail()
        time.sleep(0.005)
    # freeze the job's Ray worker at its first checkpoint, so the node dies mid-job however fast this machine trains
    # (uncontended, the whole schedule takes seconds: a kill timed by polling the API could land after it)
    os.kill(first["pid"], signal.SIGSTOP)
    frozen_at = max(checkpoints.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[-1])).parent
    victim = cluster.node_by_id(first["node_id"])
    assert victim in cluster.workers
    victim.kill9()  # the node's raylet, agents and the Ray worker running the job, at once
    survivor = next(node for node in cluster.workers if node is not victim)

    job = wait_for_job(c, job.id, timeout=400)
    events = all_events(c, job.id)
    messages = [e.message for e in events]
    assert job.status == "succeeded", (job.error, messages[-10:], server.log_tail())
    assert any("its Ray worker died" in m and "requeued to resume" in m for m in messages), messages
    where = placements(events)
    assert len(where) == 2 and where[1]["node_id"] != first["node_id"], messages
    assert cluster.node_by_id(where[1]["node_id"]) is survivor
    finished = next(e for e in events if e.message.startswith("Training finished"))
    assert finished.data["resumed_from"].endswith(frozen_at.name)  # the first attempt's last checkpoint, on the shared path
    assert finished.data["steps"] == 486  # (160 + 2 replayed) / 1 x 3 epochs: the whole schedule, continued
    # the first attempt's events up to its last drain are kept (those its actor recorded in the last drain interval
    # before the node died are not: docs/service.md), and the model serves
    interrupted = messages.index(next(m for m in messages if "its Ray worker died" in m))
    assert messages.index("Fine-tuning job started") < interrupted and messages.count("Fine-tuning job started") == 2
    assert job.fine_tuned_model
    reply = c.chat.completions.create(model=job.fine_tuned_model, messages=[{"role": "user", "content": "Say the password."}],
                                      max_tokens=8, temperature=0)
    assert reply.choices[0].message.content


def test_an_unknown_executor_is_rejected_with_a_clear_message(monkeypatch):
    from safekeel.service.settings import ServiceSettings

    monkeypatch.setenv("SAFEKEEL_EXECUTOR", "slurm")
    with pytest.raises(ValueError, match="unknown executor 'slurm': use local or ray"):
        ServiceSettings()
