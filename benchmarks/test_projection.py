"""The projection microbenchmarks under pytest-benchmark (see conftest.py): one per case of the
projection suite, with the ratio to its torch baseline in extra_info."""

from dfa_kernels.bench import common, projection


def test_projection(benchmark, case, settings):
    device = settings["device"]
    inputs = projection.Inputs(case, device)
    fn = inputs.fn()

    def run():  # a GPU call is timed to its end
        fn()
        common.sync(device)

    benchmark.group = f"{case.op} {case.shape} N={case.N} {case.dtype}"
    benchmark.extra_info.update(
        {
            "op": case.op,
            "shape": case.shape,
            "N": case.N,
            "out_features": case.out_features,
            "widths": list(case.widths),
            "dtype": case.dtype,
            "backend": case.backend,
            "storage": case.storage,
            "distribution": case.distribution,
            "device": str(device),
        }
    )
    benchmark(run)
    if benchmark.stats is None:  # --benchmark-disable: ran once, nothing timed
        return
    ms = benchmark.stats.stats.median * 1e3
    baseline_ms = common.time_ms(inputs.baseline(), device, **projection.TIMING[settings["size"]])
    tflops, gbps = inputs.rates(ms)
    benchmark.extra_info.update(
        {
            "baseline": "torch.mm(e, B) on a stored B"
            if case.op == "project"
            else "project + slices + activation backward",
            "baseline_ms": baseline_ms,
            "ratio_vs_baseline": baseline_ms / ms,
            "tflops": tflops,
            "gbps": gbps,
        }
    )
    peak = common.device_peak(device)
    if peak:
        bound = "gbps" if case.out_features <= 16 else "tflops"
        top = peak["gbps"] if bound == "gbps" else peak["tflops"][common.DTYPE_KEYS[case.dtype]]
        benchmark.extra_info["pct_peak"] = 100 * (gbps if bound == "gbps" else tflops) / top
