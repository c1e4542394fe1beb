import os
import sys

import torch

# Without a GPU, Triton kernels run on CPU tensors under Triton's interpreter. The variable is
# read when triton is imported, so it is set here, before any test imports dfa_kernels.triton.
if not torch.cuda.is_available():
    assert "triton" not in sys.modules, "triton was imported before conftest could enable its interpreter"
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import dfa_kernels as dk  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backend_device_pairs():
    """Every (backend, device) that runs here; CUDA ones appear only with a GPU (see test_gpu_visible)."""
    return [(b, d) for d in DEVICES for b in dk.available_backends(d)]


@pytest.fixture(scope="module")
def one_thread():
    """One CPU thread for a module of tiny models: on a busy 2-core machine the thread pool's
    barriers made them up to 10x slower; the setting is restored for the other test files."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------- the curated GPU subset
# `pytest --gpu-subset=tests/gpu_subset.txt` (scripts/gpu_check.sh) keeps the tests that a rule of
# that file selects, in the order of their first matching rule (so the first rules run first, with
# pytest-xdist too: its workers take tests in this order). The file's header says the syntax.
def pytest_addoption(parser):
    parser.addoption(
        "--gpu-subset",
        default=None,
        metavar="FILE",
        help="run only the tests that FILE's rules select, in the rules' order (tests/gpu_subset.txt)",
    )


def read_gpu_subset(path) -> list[tuple[str, dict[str, list[str]]]]:
    """[(test glob, {parameter: [value globs]})] from a subset file, one rule a line."""
    import pathlib

    rules = []
    for n, line in enumerate(pathlib.Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        test, *filters = line.split()
        if "::" not in test:
            raise pytest.UsageError(f"{path}:{n}: {test!r} is not path::test")
        params = {}
        for f in filters:
            name, sep, values = f.partition("=")
            if not (sep and name and values):
                raise pytest.UsageError(f"{path}:{n}: filter {f!r} is not name=glob[|glob...]")
            params[name] = values.split("|")
        rules.append((test, params))
    return rules


def _param_text(value) -> str:
    """A parameter value as a filter sees it: str() without spaces ("(7,3,128)", "torch.float16")."""
    return str(value).replace(" ", "")


def rule_matches(rule, nodeid: str, params: dict) -> bool:
    import fnmatch

    test, filters = rule
    if not fnmatch.fnmatchcase(nodeid.split("[", 1)[0], test):
        return False
    return all(
        name in params and any(fnmatch.fnmatchcase(_param_text(params[name]), v) for v in values)
        for name, values in filters.items()
    )


def select_gpu_subset(rules, items):
    """(selected in rule order, deselected, matches per rule, problems). A problem is a rule whose
    test glob matches no collected test, or a filter naming a parameter none of its tests has: a
    renamed test or a typo, which would select nothing silently. They are reported, not raised,
    so that one stale rule does not cost a GPU run its tests (the dry run's test fails on them)."""
    import fnmatch

    params = [getattr(item, "callspec", None) for item in items]
    params = [{} if c is None else c.params for c in params]
    problems = []
    for test, filters in rules:
        of_rule = [p for item, p in zip(items, params) if fnmatch.fnmatchcase(item.nodeid.split("[", 1)[0], test)]
        if not of_rule:
            problems.append(f"{test}: matches no collected test")
        for name in filters:
            if of_rule and not any(name in p for p in of_rule):
                problems.append(f"{test}: no such parameter {name!r}")
    order, counts = [], [0] * len(rules)
    for i, (item, p) in enumerate(zip(items, params)):
        first = next((r for r, rule in enumerate(rules) if rule_matches(rule, item.nodeid, p)), None)
        if first is not None:
            counts[first] += 1
            order.append((first, i))
    chosen = {i for _, i in order}
    return [items[i] for _, i in sorted(order)], [it for i, it in enumerate(items) if i not in chosen], counts, problems


def pytest_collection_modifyitems(config, items):
    path = config.getoption("--gpu-subset")
    if not path:
        return
    rules = read_gpu_subset(path)
    selected, deselected, counts, problems = select_gpu_subset(rules, items)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
    items[:] = selected
    config._gpu_subset_report = (list(zip((r[0] for r in rules), counts)), problems)


def pytest_report_collectionfinish(config, items):
    report = getattr(config, "_gpu_subset_report", None)
    if report is None:
        return None
    counts, problems = report
    return (
        [f"gpu subset: {len(items)} tests from {len(counts)} rules (tests per rule, first match)"]
        + [f"  {n:5d}  {test}" for test, n in counts]
        + [f"gpu subset PROBLEM: {p}" for p in problems]
    )
