"""The distributed fixtures are real: two Ray nodes that each run work, and a PostgreSQL study that separate
processes write trials into."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

# Each writer is its own process with its own connection, as a trial worker on another machine would be.
WRITER = """
import sys
import optuna

url, study_name, writer = sys.argv[1:]
optuna.logging.set_verbosity(optuna.logging.WARNING)
study = optuna.load_study(study_name=study_name, storage=optuna.storages.RDBStorage(url))


def objective(trial):
    trial.set_user_attr("writer", writer)
    return 2 * trial.suggest_int("x", 0, 1000)


study.optimize(objective, n_trials=3)
"""


def test_ray_cluster_runs_a_task_on_each_of_its_two_nodes(ray_cluster):
    """A task pinned to each node runs there, in a worker process, on a cluster bound to 127.0.0.1.

    Catches: the fixture not adding the second node (one node, one node id), and a cluster not on loopback.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=1)
    def where() -> tuple[str, int]:
        return ray.get_runtime_context().get_node_id(), os.getpid()

    ray.init(address=ray_cluster)
    try:
        nodes = [node for node in ray.nodes() if node["Alive"]]
        assert len(nodes) == 2
        assert {node["NodeManagerAddress"] for node in nodes} == {"127.0.0.1"}
        node_ids = [node["NodeID"] for node in nodes]
        ran = ray.get(
            [where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote() for node_id in node_ids],
            timeout=120,
        )
    finally:
        ray.shutdown()
    assert [node_id for node_id, _ in ran] == node_ids
    assert len(set(node_ids)) == 2
    worker_pids = {pid for _, pid in ran}
    assert len(worker_pids) == 2 and os.getpid() not in worker_pids


def test_optuna_study_on_postgres_takes_trials_from_two_processes(postgres_url, postgres_server_url, unique_study_name):
    """Two processes write trials into one PostgreSQL study at the same time; all six read back intact.

    Catches: ``postgres_url`` not being PostgreSQL (e.g. an SQLite file), not being a database of its own (the
    server's shared database), and writers whose trials do not reach the shared storage.
    """
    import optuna
    import sqlalchemy

    storage = optuna.storages.RDBStorage(postgres_url)
    assert storage.engine.dialect.name == "postgresql"
    assert sqlalchemy.make_url(postgres_url).database != sqlalchemy.make_url(postgres_server_url).database
    assert storage.get_all_studies() == []
    optuna.create_study(study_name=unique_study_name, storage=storage, direction="maximize")

    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, postgres_url, unique_study_name, name])
        for name in ("writer-1", "writer-2")
    ]
    assert [writer.wait(timeout=120) for writer in writers] == [0, 0]

    trials = optuna.load_study(study_name=unique_study_name, storage=optuna.storages.RDBStorage(postgres_url)).trials
    assert sorted(trial.number for trial in trials) == list(range(6))
    assert {trial.state for trial in trials} == {optuna.trial.TrialState.COMPLETE}
    assert all(trial.value == 2 * trial.params["x"] for trial in trials)
    assert Counter(trial.user_attrs["writer"] for trial in trials) == {"writer-1": 3, "writer-2": 3}
