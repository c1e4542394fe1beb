"""A default DFA training step makes no host-device synchronisation, so a CUDA graph can capture it.

On a GPU a sync is a read of a device value on the host (``.item()``, ``bool(t)``, ``int(t)``:
``aten._local_scalar_dense`` / ``aten.is_nonzero``) or a copy of host data to the device
(``torch.tensor(list, device=cuda)``: ``aten.lift_fresh``, or a CPU-to-device ``_to_copy`` /
``copy_``). On this CPU the same calls are counted by a TorchDispatchMode around a whole step
(forward, backward, optimizer): a CPU run takes the code paths a GPU run takes, so a count of
zero here means none of those calls is made. The GPU tests below check the real thing.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import dfa_kernels as dk

aten = torch.ops.aten
READS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.item.default}
# Output shapes that depend on the values: the host waits for the device to learn them.
DATA_DEPENDENT = {
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_consecutive.default,
}
MASK_INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default}  # with a boolean mask
COPIES = {aten._to_copy.default, aten.copy_.default}
# A mode handles an op with itself switched off; our ops are re-run below the Python key with the
# mode on, so that the calls inside them are seen as well.
BELOW_PYTHON = torch._C._dispatch_keyset_full_after(torch._C.DispatchKey.Python).remove(
    torch._C.DispatchKey.PythonDispatcher
)


class SyncCounter(TorchDispatchMode):
    """Records every op of a step that would synchronise host and device on a GPU."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in READS:
            self.calls.append(f"{func} (a device value read on the host)")
        elif func in DATA_DEPENDENT or (
            func in MASK_INDEXING
            and any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1])
        ):
            self.calls.append(f"{func} (an output shape that depends on device values)")
        elif func is aten.lift_fresh.default:
            self.calls.append(f"{func} (a tensor built from Python data: a host-to-device copy on a GPU)")
        elif func in COPIES:
            src = args[1] if func is aten.copy_.default else args[0]
            dst_device = args[0].device if func is aten.copy_.default else kwargs.get("device", src.device)
            if isinstance(src, torch.Tensor) and src.device.type == "cpu" and torch.device(dst_device).type != "cpu":
                self.calls.append(f"{func} (a host-to-device copy)")
        if func.namespace == "dfa_kernels":  # our ops: count what their implementations call too
            keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)  # factory ops (no tensor argument)
            for t in pytree.tree_leaves((args, kwargs)):
                if isinstance(t, torch.Tensor):
                    keys = keys | torch._C._dispatch_keys(t)
            with self:
                return func.redispatch(keys & BELOW_PYTHON, *args, **kwargs)
        return func(*args, **kwargs)


class MLP(nn.Module):
    def __init__(self, fused: bool, **dfa_kwargs):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(20, 32), nn.Linear(32, 24)])  # two widths: per-column scales
        self.head = nn.Linear(24, 5)
        self.dfa = dk.DFA(**dfa_kwargs)
        self.fused = fused

    def forward(self, x):
        for layer in self.layers:
            x = self.dfa.linear(x, layer, "relu") if self.fused else self.dfa.point(torch.relu(layer(x)))
        return self.dfa(self.head(x))


# Models and data are the same on every call (seeded), so two copies can be compared.
def _mlp(device, fused=False, **dfa_kwargs):
    torch.manual_seed(0)
    model = MLP(fused, **dfa_kwargs).to(device)
    x, y = torch.randn(16, 20).to(device), torch.randint(0, 5, (16,)).to(device)
    return model, lambda: F.cross_entropy(model(x), y)


def _lm(device, **dfa_kwargs):
    from dfa_kernels.zoo.models.transformer import TransformerLM

    torch.manual_seed(0)
    model = TransformerLM(64, context=16, layers=2, d_model=32, heads=2, error_at="logits", **dfa_kwargs).to(device)
    tokens = torch.randint(0, 64, (2, 17)).to(device)
    return model, lambda: model.loss(tokens[:, :-1], tokens[:, 1:])


def _syncs_of_a_step(model, loss_fn, warmup: int = 1) -> list[str]:
    """The sync-making calls of one SGD step (after `warmup` steps: Triton's autotuner, which
    times its candidates once per shape, and the caches of the first step are not counted)."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()

    for _ in range(warmup):
        step()
    with SyncCounter() as counter:
        step()
    return counter.calls


CASES = {"mlp": lambda d, **k: _mlp(d, **k), "mlp_fused": lambda d, **k: _mlp(d, fused=True, **k), "lm_fused_head": _lm}


@pytest.mark.parametrize("case", list(CASES))
def test_default_step_makes_no_sync(case):
    model, loss_fn = CASES[case]("cpu")
    assert _syncs_of_a_step(model, loss_fn) == []


@pytest.mark.parametrize("case", list(CASES))
def test_first_step_makes_no_sync_either(case):
    """The compiled backend's first step builds its caches (stored B, column scales) on the device too."""
    model, loss_fn = CASES[case]("cpu")
    assert _syncs_of_a_step(model, loss_fn, warmup=0) == []


@pytest.mark.parametrize("case", list(CASES))
def test_triton_step_makes_no_sync(case):
    """The Triton backend (interpreted here) builds its per-point tables without host copies."""
    if "triton" not in dk.available_backends("cpu"):
        pytest.skip("Triton is not available")
    model, loss_fn = CASES[case]("cpu", backend="triton", storage="virtual")
    assert _syncs_of_a_step(model, loss_fn) == []


def test_the_counter_sees_syncs():
    """The counter itself: each kind of sync is caught, inside our ops too."""
    x = torch.randn(4)
    with SyncCounter() as counter:
        bool(torch.isfinite(x).all())
        int(x.argmax())
        torch.tensor([1, 2, 3])
        x[x > 0]
    assert len(counter.calls) == 4, counter.calls
    lib = torch.library.Library("dfa_kernels", "FRAGMENT")
    lib.define("sync_probe(Tensor x) -> Tensor")
    lib.impl("sync_probe", lambda x: x + float(x.sum()), "CompositeExplicitAutograd")
    with SyncCounter() as counter:
        torch.ops.dfa_kernels.sync_probe(x)
    assert len(counter.calls) == 1, counter.calls


# ---------------------------------------------------------------- on a GPU
cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (the CPU tests above count the same calls)"
)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", ["auto", "cuda", "triton"])
def test_gpu_step_under_sync_debug_mode_error(case, backend):
    if backend not in dk.available_backends("cuda") and backend != "auto":
        pytest.skip(f"backend {backend} not available")
    model, loss_fn = CASES[case]("cuda", backend=backend)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()

    step()  # warmup: autotuning and caches
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("case", list(CASES))
def test_gpu_step_captured_in_a_cuda_graph(case):
    """One DFA step (forward, backward, SGD) captured in a CUDA graph and replayed: the parameters
    move as they do in eager steps of an identical copy."""
    model, loss_fn = CASES[case]("cuda")
    eager, eager_loss = CASES[case]("cuda")
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    opt_eager = torch.optim.SGD(eager.parameters(), lr=1e-2)

    def step(o, fn):
        o.zero_grad(set_to_none=False)
        fn().backward()
        o.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warmup on a side stream (autotuning, caches), as torch.cuda.graphs asks
            step(opt, loss_fn)
    torch.cuda.current_stream().wait_stream(side)
    for _ in range(2):
        step(opt_eager, eager_loss)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(opt, loss_fn)
    for _ in range(2):
        graph.replay()
        step(opt_eager, eager_loss)
    torch.cuda.synchronize()
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=1e-3, msg=name)
