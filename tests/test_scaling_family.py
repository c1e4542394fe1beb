"""The scaling harness with the family's methods (`dfa-kernels scaling --methods`, issue 22)."""

import pytest

from dfa_kernels import cli
from dfa_kernels.studies import scaling

FAMILY = (
    "sdfa-macro",
    "ternary-micro",
    "dkp-macro",
    "dkp-linear",
    "fdfa-macro",
    "fdfa-micro",
    "fdfa-linear",
    "fa",
    "usf",
    "brsf",
    "frsf",
)


def test_analytic_flops_match_the_counter_for_family_methods():
    check = scaling.flop_check((2, 16, 2), 256, 16, ("bp", "dfa-macro", *FAMILY))
    for method, row in check["methods"].items():
        assert abs(row["relative_difference"]) < 1e-9, (method, row)
    rows = check["methods"]
    assert rows["fa"]["analytic"] == rows["bp"]["analytic"]  # B in place of W: the same GEMMs
    assert rows["dkp-macro"]["analytic"] > rows["dfa-macro"]["analytic"]  # plus B's own gradient


def test_methods_option_plans_every_method_on_the_same_grids():
    preset = scaling.with_methods(scaling.PRESETS["tiny"], ["sdfa-macro", "fa"])
    assert preset.methods == ("bp", "sdfa-macro", "fa")
    grids = {m: scaling.tuning_grids(preset, m) for m in preset.methods}
    assert len({repr(g) for g in grids.values()}) == 1
    per_method = {}
    for job in scaling.jobs(preset):
        per_method.setdefault(job.method, []).append((job.size, job.steps, job.stage, job.lr, job.seed))
    assert set(per_method) == {"bp", "sdfa-macro", "fa"}
    assert per_method["fa"] == per_method["bp"] == per_method["sdfa-macro"]
    assert scaling.with_methods(scaling.PRESETS["tiny"], None).methods == tuple(scaling.METHODS)


def test_family_models_train_a_step():
    import torch

    from dfa_kernels.layerwise import FeedbackLinear

    for method in ("sdfa-micro", "dkp-macro", "fdfa-micro", "usf"):
        model = scaling.build_model((1, 16, 2), method, 64, 8)
        tokens = torch.randint(0, 64, (2, 9))
        model.loss(tokens[:, :-1], tokens[:, 1:]).backward()
        first = model.blocks[0].qkv
        if method.startswith("fdfa"):  # B starts at zero (the reference's): step 1 trains B, not the points
            assert model.dfa.feedback.grad.abs().sum() > 0 and first.weight.grad.abs().sum() == 0
        else:
            assert first.weight.grad is not None and first.weight.grad.abs().sum() > 0
        assert isinstance(first, FeedbackLinear) == (method == "usf")
        assert isinstance(model.head, FeedbackLinear) == (method == "usf")


def test_bad_methods_are_refused():
    with pytest.raises(ValueError, match="drtp.*no target"):
        scaling.method_spec("drtp-macro")
    with pytest.raises(ValueError, match="unknown method 'dfa-sideways'"):
        scaling.method_spec("dfa-sideways")
    with pytest.raises(SystemExit) as exit:
        cli.main(["scaling", "--plan", "--methods", "drtp-macro"])
    assert exit.value.code == 2


def test_every_method_has_a_plot_colour():
    assert scaling.color("bp") == scaling.COLORS["bp"]
    assert scaling.color("dkp-macro") in scaling.FAMILY_COLORS
    assert scaling.color("dkp-macro") == scaling.color("dkp-macro")
