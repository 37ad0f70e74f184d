"""Running a sweep in isolation from the developer's environment, or on a local cluster that loses a node
(shared by the sweep tests)."""

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest


def run_isolated_sweep(work: Path, *args, **kwargs):
    """`run_sweep(*args, **kwargs)` with `work` as working directory (so mlflow/ and runs/ land there),
    no MLFLOW_TRACKING_URI / RAY_ADDRESS from the environment, and a fresh 2-CPU local Ray."""
    import ray

    from affseg.sweep.tuner import run_sweep

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.delenv("RAY_ADDRESS", raising=False)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            return run_sweep(*args, **kwargs)
        finally:
            ray.shutdown()


def read_events(path: Path) -> list[dict]:
    """The JSON lines the synthetic trainers append (`EVENTS_ENV` in test_pruning.py); [] before the first."""
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def sweep_losing_a_node(run: Callable[[], object], events: Path, victim: Callable[[list[dict], dict], dict | None],
                        timeout_s: float) -> tuple[object, dict]:
    """`run()` (a `run_sweep` call) on a local Ray cluster: a 1-CPU head without GPUs and two 1-CPU worker nodes
    declaring one GPU each. Once `victim(events, worker_nodes)` names an event, its node is killed without grace
    and a fresh GPU node is added. Returns `run()`'s result and that event ({} when none was named in time)."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    workers = {node.node_id: node for node in (cluster.add_node(num_cpus=1, num_gpus=1) for _ in range(2))}
    cluster.wait_for_nodes()
    lost: dict = {}
    outcome: dict = {}

    def lose_a_node() -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            event = victim(read_events(events), workers)
            if event is not None:
                lost.update(event)
                cluster.remove_node(workers[event["node"]], allow_graceful=False)
                cluster.add_node(num_cpus=1, num_gpus=1)
                return
            time.sleep(0.2)

    def sweep() -> None:  # in a thread: Ray's node start/stop needs the main thread
        try:
            outcome["result"] = run()
        except BaseException as err:  # noqa: BLE001 - re-raised in the main thread below
            outcome["error"] = err

    try:
        ray.init(address=cluster.address, log_to_driver=False)
        assert ray.cluster_resources()["GPU"] == 2
        runner = threading.Thread(target=sweep)
        runner.start()
        lose_a_node()
        runner.join(timeout=timeout_s)
    finally:
        ray.shutdown()
        cluster.shutdown()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"], lost
