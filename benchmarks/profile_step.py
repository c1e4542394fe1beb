"""Profile one training step of a bench_step workload with torch.profiler (the slowest case first).

    python benchmarks/profile_step.py --workload lm_micro --variant dfa --out benchmarks/results/profile
writes a kernel table (self time, sorted) and a Chrome trace.
"""

import argparse
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from dfa_kernels.bench import step

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="lm_micro", choices=list(step.WORKLOADS))
    p.add_argument("--variant", default="dfa", choices=list(step.VARIANTS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", default=None, choices=["cpu", "gpu", "tiny"])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/profile"))
    a = p.parse_args()
    device = torch.device(a.device)
    build, loss_fn, config = step.WORKLOADS[a.workload](
        device, torch.float32, a.size or ("gpu" if device.type == "cuda" else "cpu")
    )
    torch.manual_seed(0)
    model = build(a.variant).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)

    def one_step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model).backward()
        if a.variant == "tinydfa_style":
            model.dfa.finish()
        opt.step()

    for _ in range(3):
        one_step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, profile_memory=True) as prof:
        for _ in range(3):
            one_step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    a.out.mkdir(parents=True, exist_ok=True)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=40)
    name = f"{a.workload}_{a.variant}_{device.type}"
    (a.out / f"{name}.txt").write_text(f"{config}\n{table}\n")
    prof.export_chrome_trace(str(a.out / f"{name}.trace.json"))
    print(table)
