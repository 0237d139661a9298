"""Shared small fixtures for the engine tests: a tiny ConvNet on 8x8 digits and its experts, in memory
(expert_run) and as stores on disk (tiny_stores); and the --executed-chapters option of test_chapters.

Everything is session-scoped and sized for a 2-core CPU: the experts train in about a second, once.
"""

import contextlib
import dataclasses
from pathlib import Path

import pytest
import torch

from mctlib.config import ExpertConfig
from mctlib.data import load_dataset
from mctlib.experts import make_experts, train_experts
from mctlib.networks import FlatModel, NetConfig, build_network
from mctlib.storage import load_store, save_convexified

# The whole suite runs on one intra-op thread: its tensors are tiny, results do not depend on the
# thread count, and on a loaded 2-core machine torch's thread pool costs far more than it gives.
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]


def pytest_addoption(parser):
    parser.addoption("--executed-chapters", metavar="DIR", default=None,
                     help="the chapters as the book build executed them (_build/jupyter_execute/notebooks): every "
                          "chapter must be there, fresh; without it they are checked only where a build left them")


@pytest.fixture(scope="session")
def executed_chapters(request) -> tuple[Path, bool]:
    """(folder of the book build's executed chapters, whether each chapter must be there)."""
    given = request.config.getoption("--executed-chapters")
    return (Path(given).resolve() if given else ROOT / "_build" / "jupyter_execute" / "notebooks"), given is not None


@contextlib.contextmanager
def single_thread():
    """Run torch on one thread: these tensors are tiny, and on a shared 2-core machine the
    intra-op thread pool costs far more than it gives (GroupNorm backward: 0.8 s vs 1 ms)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_thread():
    """Module-scoped `single_thread` (use with pytestmark = pytest.mark.usefixtures("one_thread"))."""
    with single_thread():
        yield


EXPERT_EPOCHS = 12  # E of the fixture experts: K = 4 gives w = (0, 4, 8, 12); K = 6 gives (0, 2, 4, 6, 8, 12)


@pytest.fixture(scope="session")
def digits8():
    """scikit-learn digits at their native 8x8, cut to 400 training and 200 test images."""
    ds = load_dataset("digits", image_size=8)
    return dataclasses.replace(ds, train_images=ds.train_images[:400], train_labels=ds.train_labels[:400],
                               test_images=ds.test_images[:200], test_labels=ds.test_labels[:200])


@pytest.fixture(scope="session")
def tiny_net():
    """ConvNet, depth 2, width 8, on 1x8x8 images (about a thousand parameters)."""
    return NetConfig(arch="convnet", channels=1, num_classes=10, image_size=8, width=8, depth=2)


@pytest.fixture(scope="session")
def flat_model(tiny_net):
    return FlatModel(build_network(tiny_net, seed=0))


@pytest.fixture(scope="session")
def expert_cfg():
    return ExpertConfig(num_experts=2, epochs=EXPERT_EPOCHS, lr=0.05, batch_size=64, dsa=False, record="full",
                        seed=3)


@pytest.fixture(scope="session")
def expert_run(digits8, tiny_net, expert_cfg):
    """(full buffers, init seeds, stats) of two real experts trained with mctlib.experts.train_experts."""
    with single_thread():
        return train_experts(digits8, tiny_net, expert_cfg, device="cpu", ensemble_size=2)


@pytest.fixture(scope="session")
def full_buffer(expert_run):
    """A real full buffer theta_0..theta_E (E = 12) of the tiny ConvNet."""
    return expert_run[0][0]


@pytest.fixture(scope="session")
def full_buffers(expert_run):
    return expert_run[0]


@pytest.fixture(scope="session")
def init_seeds(expert_run):
    return expert_run[1]


# The tiny experts of the tests that need them as files (distillation, several processes, the CLI, faults): in
# the CLI's words `--dataset digits --data-image-size 8 --net-image-size 8 --net-width 16 --net-depth 2`.
TINY_NET = NetConfig(channels=1, num_classes=10, image_size=8, width=16, depth=2)
TINY_EXPERTS = ExpertConfig(num_experts=2, epochs=6, record="full", batch_size=128)


@pytest.fixture(scope="session")
def digits8_all():
    """scikit-learn digits at their native 8x8, every image (the CLI's --dataset digits --data-image-size 8)."""
    return load_dataset("digits", image_size=8)


@pytest.fixture(scope="session")
def tiny_stores(digits8_all, tmp_path_factory) -> dict:
    """{"mtt": the full buffers of two 6-epoch experts of TINY_NET, "mct": their K = 3 convexified records
    (waypoint_epochs [0, 3, 6])}, trained once per session. Every test shares them: read them, and copy
    them to a test's own folder to change them."""
    root = tmp_path_factory.mktemp("tiny_stores")
    with single_thread():
        full = make_experts(digits8_all, TINY_NET, TINY_EXPERTS, root / "full")
    save_convexified(full, root / "convex", num_waypoints=3)
    return {"mtt": full, "mct": load_store(root / "convex")}


@pytest.fixture(scope="session")
def recorder_probe():
    """Count the flat parameter vectors of length D an object holds (attributes, lists, dicts)."""

    def count(obj, numel):
        seen, total = set(), 0

        def walk(x):
            nonlocal total
            if id(x) in seen:
                return
            seen.add(id(x))
            if isinstance(x, torch.Tensor):
                total += x.numel() // numel if x.shape[-1:] == (numel,) else 0
            elif isinstance(x, dict):
                for v in x.values():
                    walk(v)
            elif isinstance(x, (list, tuple)):
                for v in x:
                    walk(v)

        walk(vars(obj))
        return total

    return count
