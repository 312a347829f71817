"""Where sweep cells and shards run: in this process one after another (default), or on Ray.

Both executors expose the same two calls, so the sweep driver and sharded sweeps never branch on them:
`run_cells(cells, on_done)` (each finished cell is handed to `on_done` at once, so an interruption loses no
finished cell) and `map(fn, items, resources)` (plain function calls, e.g. the shards of one patching sweep).
Ray is optional (`pip install circuitlab[ray]`); `RayExecutor()` starts a small local Ray, and
`RayExecutor(address=...)` (or the `RAY_ADDRESS` variable) joins a running cluster.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar, Union

T = TypeVar("T")
R = TypeVar("R")

from circuitlab.reports.cell_kinds import run_cell
from circuitlab.reports.cells import Cell, CellOutcome
from circuitlab.reports.config import ConfigError

OnDone = Callable[[int, CellOutcome], None]


class SequentialExecutor:
    """Runs everything in this process, in order. No extra dependency."""

    name = "sequential"

    def __enter__(self) -> SequentialExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def run_cells(self, cells: Sequence[Cell], on_done: OnDone) -> None:
        for index, cell in enumerate(cells):
            on_done(index, run_cell(cell, self.name))

    def map(self, fn: Callable[[T], R], items: Sequence[T], resources: dict[str, float] | None = None) -> list[R]:
        return [fn(item) for item in items]


def _ray_options(resources: dict[str, Any] | None, retries: int) -> dict[str, Any]:
    resources = resources or {}
    options: dict[str, Any] = {"num_cpus": float(resources.get("num_cpus", 1) or 1),
                               "num_gpus": float(resources.get("num_gpus", 0) or 0), "max_retries": retries}
    if resources.get("memory_mb"):
        options["memory"] = int(float(resources["memory_mb"]) * 2**20)
    return options


HOLD_ENV = "CIRCUITLAB_TEST_HOLD_DIR"  # test-only seam, see `_hold_for_node_kill`


def _hold_for_node_kill() -> None:
    """Test-only seam for the two-node cluster test (`tests/test_ray_cluster.py`), inert unless `HOLD_ENV` is set.

    On a Ray node started with `HOLD_ENV=DIR` in its environment, the node's n-th cell (n = 0, 1, ...) writes
    `DIR/started-<n>-<pid>` and waits until `DIR/release-<n>` or `DIR/release-all` exists (at most 10 minutes).
    The test thereby decides which node runs which cell and kills a node while a cell runs on it, without a
    timing race.
    """
    folder = os.environ.get(HOLD_ENV)
    if not folder:
        return
    marks = Path(folder)
    n = len(list(marks.glob("started-*")))
    (marks / f"started-{n}-{os.getpid()}").touch()
    deadline = time.monotonic() + 600
    while not ((marks / f"release-{n}").exists() or (marks / "release-all").exists()) and time.monotonic() < deadline:
        time.sleep(0.1)


def _ray_cell(cell: Cell) -> CellOutcome:
    import ray  # optional dependency: this runs only inside a Ray worker

    _hold_for_node_kill()
    outcome = run_cell(cell, "ray")
    outcome.backend["node"] = ray.get_runtime_context().get_node_id()  # which node of the cluster ran it
    return outcome


class RayExecutor:
    """Runs cells as Ray tasks (each with its cell's CPUs/GPUs/memory); a task whose worker dies is retried
    once (`max_retries`), then its cell is recorded as failed with Ray's error.

    Without an address (argument or `RAY_ADDRESS`) it starts a local Ray sized for a shared machine
    (`num_cpus` CPUs, no dashboard, a small object store) and shuts it down on exit; with one it connects
    to that cluster and leaves it running. A Ray already initialised in this process is used as it is.
    """

    name = "ray"
    cell_function: Callable[[Cell], CellOutcome] = staticmethod(_ray_cell)

    def __init__(self, address: str | None = None, *, num_cpus: int | None = None, object_store_mb: int = 200,
                 max_retries: int = 1) -> None:
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self.num_cpus = num_cpus
        self.object_store_mb = object_store_mb
        self.max_retries = max_retries
        self._owned = False
        self._depth = 0  # nested `with` blocks (a sweep inside a caller's block) share one Ray

    def __enter__(self) -> RayExecutor:
        self._depth += 1
        try:
            import ray  # optional dependency: circuitlab[ray]
        except ImportError:
            raise ConfigError("--executor ray needs Ray: pip install 'circuitlab[ray]' (or pip install ray)") from None
        if not ray.is_initialized():
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            if self.address:
                ray.init(address=self.address, configure_logging=False, log_to_driver=False)
            else:
                # Ray nices its workers (15) by default; a local sweep should get the priority an in-process one gets.
                os.environ.setdefault("RAY_worker_niceness", "0")
                ray.init(num_cpus=self.num_cpus or os.cpu_count() or 1, include_dashboard=False,
                         object_store_memory=self.object_store_mb * 2**20, configure_logging=False,
                         log_to_driver=False)
            self._owned = True
        return self

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._owned and self._depth == 0:
            import ray  # optional dependency: circuitlab[ray]

            ray.shutdown()
            self._owned = False

    def run_cells(self, cells: Sequence[Cell], on_done: OnDone) -> None:
        import ray  # optional dependency: circuitlab[ray]
        from ray.exceptions import RayError  # optional dependency: circuitlab[ray]

        remote = ray.remote(type(self).cell_function)
        pending = {remote.options(**_ray_options(cell.resources, self.max_retries)).remote(cell): i
                   for i, cell in enumerate(cells)}
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    index = pending.pop(ref)
                    try:
                        outcome = ray.get(ref)
                    except RayError as exc:  # the worker died on every attempt (or the task was lost)
                        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                        outcome = CellOutcome(status="failed", error=f"{type(exc).__name__} after "
                                              f"{self.max_retries + 1} attempts: {first}",
                                              backend={"executor": self.name})
                    on_done(index, outcome)
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)

    def map(self, fn: Callable[[T], R], items: Sequence[T], resources: dict[str, float] | None = None) -> list[R]:
        import ray  # optional dependency: circuitlab[ray]

        remote = ray.remote(fn).options(**_ray_options(resources, self.max_retries))
        return ray.get([remote.remote(item) for item in items])


EXECUTORS = ("sequential", "ray")
Executor = Union[SequentialExecutor, RayExecutor]  # what runs a sweep's cells: `map(fn, items)` in order


def make_executor(name: str = "sequential", *, address: str | None = None, num_cpus: int | None = None) -> Executor:
    """An executor by name (`sequential` or `ray`); an address implies Ray."""
    if address or name == "ray":
        return RayExecutor(address, num_cpus=num_cpus)
    if name == "sequential":
        return SequentialExecutor()
    raise ConfigError(f"unknown executor {name!r}: use sequential or ray")
