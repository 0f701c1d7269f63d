"""Real infrastructure for distributed tests: a two-node Ray cluster on 127.0.0.1 and a PostgreSQL server.

- ``ray_cluster`` (module scope): the address of a running cluster of two Ray nodes, a head and a worker node, one
  CPU and about 150 MB of object store each, for ``ray.init(address=ray_cluster)`` in the test or in a process it
  starts. Teardown disconnects this process's driver, stops exactly the processes this fixture started and
  removes its temporary folder.
- ``postgres_server_url`` (session scope): ``AUTOPEFT_TEST_POSTGRES_URL`` when set (``.ci/run`` sets it), else a
  private server started with ``scripts/postgres.sh`` for the session. Never skipped: no server is an error.
- ``postgres_url``: a new, empty database on that server for one test, dropped after it.
- ``unique_study_name``: a study name no other test uses, for tests that share a database.

Start-up times and the cluster's memory are printed at the end of the run.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

POSTGRES_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "postgres.sh"
POSTGRES_URL_VARIABLE = "AUTOPEFT_TEST_POSTGRES_URL"
RAY_NODE = {"node_ip_address": "127.0.0.1", "num_cpus": 1, "object_store_memory": 150 * 1024 * 1024}

# Ray reads these when it is imported or when each of its processes starts, so they are set as soon as this folder
# is collected, before a test module here imports ray; the processes a test starts (a CLI driver) inherit them.
os.environ.update(
    {
        "RAY_USAGE_STATS_ENABLED": "0",
        # Ray rewrites a loopback address given to ray.init() into this machine's outward IP, where a cluster on
        # 127.0.0.1 does not listen, and the driver then retries forever. This switch makes Ray resolve loopback
        # to 127.0.0.1 instead; a cluster started in-process, as here, is otherwise unaffected by it.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        # Token authentication, Ray's secure setting: both nodes and every driver present this session's token.
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
    }
)

_measurements: list[str] = []


def pytest_terminal_summary(terminalreporter) -> None:
    """Print how long the infrastructure took to start and what the cluster held in memory."""
    if _measurements:
        terminalreporter.write_sep("-", "distributed test infrastructure")
        for line in _measurements:
            terminalreporter.write_line(line)


def _process_tree_pss_mb(roots: list[int]) -> float:
    """Proportional set size of ``roots`` and all their descendants, in MB (shared pages counted once)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    seen: set[int] = set()
    todo = list(roots)
    kilobytes = 0
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        todo.extend(children.get(pid, []))
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        kilobytes += sum(int(line.split()[1]) for line in rollup.splitlines() if line.startswith("Pss:"))
    return kilobytes / 1024


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[str]:
    """Start a head and a worker Ray node on 127.0.0.1 and yield the address to pass to ``ray.init``."""
    import ray
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    if ray_constants.ENABLE_RAY_CLUSTER:
        pytest.fail(
            "ray was imported before tests/distributed/conftest.py set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, so a "
            "driver would look for the cluster on this machine's outward IP instead of 127.0.0.1; import ray inside "
            "test functions",
            pytrace=False,
        )
    # A short folder: Ray's unix socket paths inside it must stay under 107 characters.
    folder = tempfile.mkdtemp(prefix="rayt-", dir="/tmp")
    ray_temp = os.path.join(folder, "ray")
    os.mkdir(ray_temp)
    cluster = None
    with pytest.MonkeyPatch.context() as env:
        # Ray records its "current cluster" under RAY_TMPDIR; inside our folder it leaves any other cluster's alone.
        env.setenv("RAY_TMPDIR", folder)
        try:
            started = time.monotonic()
            cluster = Cluster(
                initialize_head=True,
                head_node_args={**RAY_NODE, "include_dashboard": False, "temp_dir": ray_temp},
            )
            cluster.add_node(**RAY_NODE)
            cluster.wait_for_nodes()
            _measurements.append(f"ray cluster: head + worker node up in {time.monotonic() - started:.1f} s")
            yield cluster.address
        finally:
            if cluster is not None:
                roots = [p.process.pid for node in cluster.list_all_nodes() for infos in node.all_processes.values() for p in infos]
                _measurements.append(f"ray cluster: its processes held {_process_tree_pss_mb(roots):.0f} MB (PSS) at teardown")
                # A driver still connected to a cluster that goes away would hang; this one is ours to disconnect.
                if ray.is_initialized():
                    ray.shutdown()
                cluster.shutdown()
            shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    """A PostgreSQL server URL whose user may create databases: the CI's, or a private one for this session."""
    url = os.environ.get(POSTGRES_URL_VARIABLE)
    if url:
        yield url
        return
    folder = tempfile.mkdtemp(prefix="pgt-", dir="/tmp")
    try:
        started = time.monotonic()
        result = subprocess.run(
            ["bash", str(POSTGRES_SCRIPT), "start", folder], capture_output=True, text=True, timeout=900
        )
        if result.returncode != 0:
            pytest.fail(
                f"{POSTGRES_URL_VARIABLE} is not set and `bash {POSTGRES_SCRIPT} start {folder}` could not start a "
                f"PostgreSQL server (exit {result.returncode}):\n{result.stderr.strip()[-2000:]}",
                pytrace=False,
            )
        _measurements.append(f"postgresql: private server up in {time.monotonic() - started:.1f} s")
        yield result.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run(["bash", str(POSTGRES_SCRIPT), "stop", folder], capture_output=True, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server_url: str) -> Iterator[str]:
    """The URL of a new, empty database on the test server; dropped, with its open connections, after the test."""
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    server = sqlalchemy.make_url(postgres_server_url)
    name = f"autopeft_{uuid.uuid4().hex[:16]}"
    admin = sqlalchemy.create_engine(server, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as connection:
        connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def unique_study_name(request: pytest.FixtureRequest) -> str:
    """A study name that no other test, and no earlier run against the same server, uses."""
    return f"{request.node.name[:60]}-{uuid.uuid4().hex[:8]}"
