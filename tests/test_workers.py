"""Independent jobs in worker processes give what one process gives: experts trained two ensembles at a
time in two single-threaded processes are the same files, byte for byte, as in this process."""

import pytest

from mctlib.config import ExpertConfig
from mctlib.experts import make_experts
from mctlib.workers import parallel_jobs

pytestmark = pytest.mark.usefixtures("one_thread")


def _square(x):
    return x * x


def test_parallel_jobs_keep_the_order_of_the_jobs():
    assert parallel_jobs(_square, [(3,), (1,), (2,)], workers=2) == [9, 1, 4]
    assert parallel_jobs(_square, [], workers=2) == []


@pytest.mark.parametrize("record", ["full", "convex"])
def test_experts_in_two_processes_equal_one_process_byte_for_byte(digits8, tiny_net, tmp_path, record):
    cfg = ExpertConfig(num_experts=3, epochs=3, lr=0.05, batch_size=64, dsa=True, record=record, num_waypoints=2,
                       seed=4)
    one = make_experts(digits8, tiny_net, cfg, tmp_path / "one", ensemble_size=2)
    two = make_experts(digits8, tiny_net, cfg, tmp_path / "two", ensemble_size=2, workers=2)
    assert [e["init_seed"] for e in one.manifest["experts"]] == [e["init_seed"] for e in two.manifest["experts"]]
    for expert in one.manifest["experts"]:
        assert (one.path / expert["file"]).read_bytes() == (two.path / expert["file"]).read_bytes()
    assert one.manifest["stats"]["test_accuracy"] == two.manifest["stats"]["test_accuracy"]
