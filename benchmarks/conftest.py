"""pytest-benchmark microbenchmarks of the kernels: ``pytest benchmarks/ --benchmark-only``.

The cases are the projection suite's own (dfa_kernels.bench.projection.cases: every backend,
storage, distribution and dtype on the zoo's shapes), so ``dfa-kernels bench`` and these measure the
same things. Each benchmark records its ratio to the torch baseline (``torch.mm`` on a stored B for
project; project + slicing + activation backward for project_points) in ``extra_info``.
Save and compare runs with pytest-benchmark's own ``--benchmark-autosave`` / ``--benchmark-compare``.

Options: --dfa-device cpu|cuda (default: cuda when present), --dfa-size tiny|cpu|cuda (default: the
device's), --dfa-quick (three shapes, uniform B, no sweeps), --dfa-dtypes float32,bfloat16.
"""

import pytest
import torch

try:
    import pytest_benchmark  # noqa: F401
except ImportError:  # pip install ".[bench]"
    collect_ignore_glob = ["test_*.py"]


def pytest_addoption(parser):
    group = parser.getgroup("dfa_kernels benchmarks")
    group.addoption("--dfa-device", default="cuda" if torch.cuda.is_available() else "cpu")
    group.addoption("--dfa-size", default=None, choices=["tiny", "cpu", "cuda"])
    group.addoption("--dfa-quick", action="store_true")
    group.addoption("--dfa-dtypes", default=None, help="comma-separated, e.g. bfloat16,float32")


def _settings(config):
    from dfa_kernels.bench import projection

    device = torch.device(config.getoption("--dfa-device"))
    dtypes = config.getoption("--dfa-dtypes")
    return {
        "device": device,
        "size": config.getoption("--dfa-size") or device.type,
        "quick": config.getoption("--dfa-quick"),
        "dtypes": dtypes.split(",") if dtypes else list(projection.DEFAULT_DTYPES[device.type]),
    }


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        from dfa_kernels.bench import projection

        s = _settings(metafunc.config)
        found = projection.cases(
            s["size"], projection._compiled_backends(s["device"]), [getattr(torch, d) for d in s["dtypes"]], s["quick"]
        )
        metafunc.parametrize("case", found, ids=[c.id for c in found])


@pytest.fixture(scope="session")
def settings(request):
    return _settings(request.config)
