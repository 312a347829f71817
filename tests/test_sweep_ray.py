"""Sweeps on a local Ray (two workers): the same numbers as in-process, and a dying worker retried once."""

import os
import sys

import pytest

ray = pytest.importorskip("ray")

from circuitlab.reports.cells import Cell, CellOutcome  # noqa: E402
from circuitlab.reports.executors import RayExecutor, SequentialExecutor  # noqa: E402
from circuitlab.reports.grid import SweepSpec, run_sweep  # noqa: E402

GRID = {"kind": "bench", "grid": {"model": ["induction_handwired", "planted_marker", "tracr_reverse"],
                                  "method": ["activation", "eap", "eap-ig"]},
        "options": {"n": 8, "n_boot": 50}, "resources": {"num_cpus": 1}}
NUMBERS = ["edge_auroc", "edge_auroc_visible", "node_auroc", "cpr", "cpr_low", "cpr_high", "cmd", "cmd_low",
           "cmd_high", "n_edges", "n_true_edges", "n_visible_true_edges"]


def _die_once(marker: str) -> int:
    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)  # the worker process dies; Ray retries the task once
    return os.getpid()


def _always_die(cell: Cell) -> CellOutcome:
    os._exit(1)


class _DyingRay(RayExecutor):
    cell_function = staticmethod(_always_die)


@pytest.fixture(scope="module")
def local_ray():
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    executor = RayExecutor(num_cpus=2, object_store_mb=200)
    with executor:
        yield executor
    assert not ray.is_initialized()


@pytest.mark.slow
def test_ray_sweep_equals_sequential_and_retries_dying_workers(local_ray, tmp_path):
    spec = SweepSpec.from_dict(GRID)
    ray_result = run_sweep(spec, tmp_path / "ray", executor=local_ray)
    assert ray.is_initialized()  # the sweep used the fixture's Ray and left it running
    seq_result = run_sweep(spec, tmp_path / "seq", executor=SequentialExecutor())
    a, b = ray_result.table, seq_result.table
    assert list(a["cell"]) == list(b["cell"]) and set(a["status"]) == {"done"} and len(a) == 9
    assert set(a["executor"]) == {"ray"} and set(b["executor"]) == {"sequential"}
    assert len(set(a["host"].astype(str) + a["cell"])) == 9
    for col in NUMBERS:
        assert a[col].tolist() == b[col].tolist(), col  # identical, not merely close
    # a worker that dies is retried once ...
    marker = tmp_path / "died-once"
    assert local_ray.map(_die_once, [str(marker)])[0] > 0 and marker.exists()  # without a retry: WorkerCrashedError
    # ... and a cell whose worker dies every time is recorded as failed with Ray's error
    dying = _DyingRay(num_cpus=2)
    outcomes = {}
    dying.run_cells([Cell("bench", {"model": "induction_handwired", "method": "eap"})],
                    lambda i, outcome: outcomes.setdefault(i, outcome))
    assert outcomes[0].status == "failed" and "2 attempts" in outcomes[0].error
