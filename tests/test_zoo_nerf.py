"""The NeRF zoo: encoding, rays, renderer, modes, the pybullet scenes, the NeRF-synthetic loader, the task."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math

import pytest
import torch

from dfa_kernels.zoo.data import nerf_scenes as S
from dfa_kernels.zoo.models.nerf import NeRF, positional_encoding, render, sample_pdf
from dfa_kernels.zoo.recipes import nerf as R
from dfa_kernels.zoo.tasks import TrainConfig, get
from dfa_kernels.zoo.training import train

HAS_PYBULLET = importlib.util.find_spec("pybullet") is not None
needs_pybullet = pytest.mark.skipif(not HAS_PYBULLET, reason=f"pybullet scenes need pybullet: {S.INSTALL}")
TINY = dict(depth=3, width=16, skips=(1,), pos_freqs=3, dir_freqs=1, n_coarse=8, n_fine=8)
HEADS = {
    "coarse.sigma.weight",
    "coarse.sigma.bias",
    "coarse.rgb.weight",
    "coarse.rgb.bias",
    "fine.sigma.weight",
    "fine.sigma.bias",
    "fine.rgb.weight",
    "fine.rgb.bias",
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def rays(n=32, seed=0):
    """Rays from cameras at distance 4 looking at the origin, and colours to fit."""
    g = torch.Generator().manual_seed(seed)
    o = torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=-1) * 4
    d = torch.nn.functional.normalize(-o + 0.3 * torch.randn(n, 3, generator=g), dim=-1)
    return o, d, torch.rand(n, 3, generator=g)


def loss_of(model, o, d, target):
    out = model(o, d, 3.0, 5.0, 1.0, perturb=False)
    return (out["rgb"] - target).pow(2).mean() + (out["rgb_coarse"] - target).pow(2).mean(), out


def test_positional_encoding_values():
    x = torch.tensor([[0.5, -1.0, 2.0]])
    got = positional_encoding(x, 2)
    want = torch.cat([x, torch.sin(x), torch.cos(x), torch.sin(2 * x), torch.cos(2 * x)], -1)
    assert got.shape == (1, 15)
    torch.testing.assert_close(got, want)
    assert got[0, 3].item() == pytest.approx(math.sin(0.5)) and got[0, 14].item() == pytest.approx(math.cos(4.0))
    assert positional_encoding(torch.zeros(4, 5, 3), 10).shape == (4, 5, 63)


def test_render_and_sampling():
    z = torch.linspace(3, 5, 8).expand(2, 8)
    d = torch.tensor([[0.0, 0.0, -1.0], [0.0, 0.0, -2.0]])
    empty = torch.zeros(2, 8, 4)
    empty[..., 3] = -1.0  # relu(sigma) = 0: nothing there
    rgb, weights, _, opacity = render(empty, z, d, background=1.0, far=5.0)
    torch.testing.assert_close(rgb, torch.ones(2, 3))
    assert opacity.abs().max() < 1e-6
    wall = torch.zeros(2, 8, 4)
    wall[:, 4:, 3] = 1e4  # opaque from the 5th sample on, colour sigmoid(0)
    rgb, weights, depth, opacity = render(wall, z, d, background=1.0, far=5.0)
    torch.testing.assert_close(rgb, torch.full((2, 3), 0.5))
    torch.testing.assert_close(depth, z[:, 4])
    haze = torch.zeros(2, 8, 4)
    haze[..., 3] = 0.1  # thin medium: transmittance exp(-0.1 * length)
    _, _, _, opacity = render(haze, z, d, background=torch.zeros(2, 3), far=5.0)
    torch.testing.assert_close(opacity, 1 - torch.exp(-0.1 * 2 * d.norm(dim=-1)))
    _, _, _, opacity = render(haze, z, d)  # far=None: the reference code's infinite last interval
    torch.testing.assert_close(opacity, torch.ones(2))
    samples = sample_pdf(torch.linspace(0, 1, 5).expand(3, 5), torch.tensor([[0, 0, 1.0]]).expand(3, 3), 50)
    assert ((samples >= 0.5 - 1e-3) & (samples <= 0.75 + 1e-3)).float().mean() > 0.95


@pytest.mark.parametrize("mode", ["bp", "dfa", "shallow"])
def test_modes_shapes_gradients_and_learning(mode):
    o, d, target = rays()
    torch.manual_seed(0)
    model = NeRF(**TINY, mode=mode)
    loss, out = loss_of(model, o, d, target)
    assert out["rgb"].shape == out["rgb_coarse"].shape == (32, 3) and out["depth"].shape == (32,)
    assert torch.isfinite(loss)
    loss.backward()
    learning = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    names = {n for n, _ in model.named_parameters()}
    assert learning == (HEADS if mode == "shallow" else names), sorted(names ^ learning)
    if mode != "bp":  # one feedback point per ReLU layer + feature layer + direction layer, per network
        assert model.coarse.dfa.spec.widths == (16,) * 3 + (16, 8)
        assert model.coarse.dfa.spec.out_features == 4 and model.fine.dfa.seed != model.coarse.dfa.seed

    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = loss.item()
    for _ in range(15):
        loss, _ = loss_of(model, o, d, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss) and loss.item() < first


def test_heads_learn_exactly_under_dfa():
    """Same weights and samples: the heads' DFA gradients are backprop's (the error comes through
    the renderer); the hidden layers' are not."""
    o, d, target = rays()
    grads = {}
    for mode in ("bp", "dfa"):
        torch.manual_seed(0)
        model = NeRF(**TINY, mode=mode)
        loss_of(model, o, d, target)[0].backward()
        grads[mode] = {n: p.grad for n, p in model.named_parameters()}
    for name in HEADS:
        torch.testing.assert_close(grads["dfa"][name], grads["bp"][name])
    assert not torch.allclose(grads["dfa"]["coarse.trunk.0.weight"], grads["bp"]["coarse.trunk.0.weight"])


def test_ray_convention():
    c2w = torch.eye(4)
    c2w[:3, 3] = torch.tensor([1.0, 2.0, 3.0])
    o, d = S.get_rays(4, 6, 5.0, c2w)
    assert o.shape == d.shape == (4, 6, 3)
    assert d[0, 0, 0] < 0 and d[0, 0, 1] > 0 and (d[..., 2] == -1).all()  # row 0 is the top, looks down -z
    torch.testing.assert_close(d[0, 0], torch.tensor([-0.5, 0.3, -1.0]))  # (0.5 - W/2)/f, -(0.5 - H/2)/f
    torch.testing.assert_close(d.mean((0, 1)), torch.tensor([0.0, 0.0, -1.0]))  # the image centre is on -z
    j, i, z = S.project(o + 2.5 * d, 4, 6, 5.0, c2w)
    grid_j, grid_i = torch.meshgrid(torch.arange(4.0), torch.arange(6.0), indexing="ij")
    torch.testing.assert_close(j, grid_j)
    torch.testing.assert_close(i, grid_i)
    torch.testing.assert_close(z, torch.full((4, 6), 2.5))


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    if not HAS_PYBULLET:
        pytest.skip(f"pybullet scenes need pybullet: {S.INSTALL}")
    return S.load_pybullet_scene("duck", size=64, views=(12, 2, 2), cache=tmp_path_factory.mktemp("cache"))


@needs_pybullet
def test_pybullet_scene_and_depth_backprojection(scene, monkeypatch):
    v = scene.splits["train"]
    assert v.images.shape == (12, 64, 64, 3) and v.poses.shape == (12, 4, 4) and v.depth.shape == (12, 64, 64)
    assert 0.05 < v.alpha.mean() < 0.6 and v.images.min() >= 0 and v.images.max() <= 1
    torch.testing.assert_close(v.images[v.alpha == 0], torch.ones_like(v.images[v.alpha == 0]))  # white
    assert scene.near == 3.0 and scene.far == 5.0
    assert v.depth[v.alpha > 0].min() > scene.near and v.depth[v.alpha > 0].max() < scene.far
    centres = v.poses[:, :3, 3]
    assert torch.allclose(centres.norm(dim=-1), torch.full((12,), 4.0), atol=1e-4)
    dist = torch.cdist(centres, centres).fill_diagonal_(math.inf)
    a = int(dist.min(1).values.argmin())
    b = int(dist[a].argmin())

    def agreement():  # both ways between the two closest cameras
        return sum(S.reprojection_agreement(v, x, y, scene.H, scene.W, scene.focal) for x, y in ((a, b), (b, a))) / 2

    right = agreement()
    assert right >= 0.9, right

    def flipped(H, W, focal, c2w):  # the classic mistake: image y not flipped
        o, d = get_rays(H, W, focal, c2w)
        return o, d @ torch.as_tensor(c2w)[:3, :3] @ torch.diag(torch.tensor([1.0, -1.0, 1.0])) @ torch.as_tensor(c2w)[
            :3, :3
        ].T

    get_rays = S.get_rays
    monkeypatch.setattr(S, "get_rays", flipped)
    wrong = agreement()
    assert wrong < right - 0.2, (right, wrong)


@needs_pybullet
def test_pybullet_cache_is_deterministic(scene, tmp_path):
    again = S.load_pybullet_scene("duck", size=64, views=(12, 2, 2), cache=tmp_path)
    assert torch.equal(again.splits["test"].images, scene.splits["test"].images)
    assert len(list(tmp_path.glob("*.npz"))) == 1
    cached = S.load_pybullet_scene("duck", size=64, views=(12, 2, 2), cache=tmp_path)
    assert torch.equal(cached.splits["train"].poses, scene.splits["train"].poses)


def synthetic_scene(n=(3, 1, 2), size=8, seed=0) -> S.Scene:
    g = torch.Generator().manual_seed(seed)
    splits = {}
    for k, split in zip(n, S.SPLITS):
        alpha = (torch.rand(k, size, size, generator=g) > 0.5).float()
        images = torch.rand(k, size, size, 3, generator=g) * alpha[..., None] + (1 - alpha[..., None])
        poses = torch.eye(4).repeat(k, 1, 1)
        poses[:, :3, 3] = torch.randn(k, 3, generator=g)
        splits[split] = S.Views(images, poses, alpha)
    return S.Scene(splits, size, size, focal=10.0, near=2.0, far=6.0, background=1.0)


def test_blender_loader_roundtrip(tmp_path):
    scene = synthetic_scene()
    splits = scene.splits
    S.write_blender(scene, tmp_path)
    meta = json.loads((tmp_path / "transforms_train.json").read_text())
    assert meta["frames"][0]["file_path"] == "./train/r_0" and (tmp_path / "train" / "r_0.png").is_file()
    back = S.load_blender(tmp_path)
    assert back.H == back.W == 8 and back.focal == pytest.approx(10.0) and (back.near, back.far) == (2.0, 6.0)
    for split in S.SPLITS:
        torch.testing.assert_close(back.splits[split].images, splits[split].images, atol=1 / 255, rtol=0)
        torch.testing.assert_close(back.splits[split].poses, splits[split].poses)
    black = S.load_blender(tmp_path, white_background=False)
    assert black.splits["train"].images[splits["train"].alpha == 0].max() == 0
    half = S.load_blender(tmp_path, size=4, max_views=(2, 1, 1))
    assert [len(v.images) for v in half.splits.values()] == [2, 1, 1]
    assert half.H == 4 and half.focal == pytest.approx(5.0)
    torch.testing.assert_close(half.splits["val"].alpha, splits["val"].alpha.reshape(1, 4, 2, 4, 2).mean((2, 4)))


def test_task_registered():
    task = get("nerf")
    assert task.metric == "test_psnr" and task.higher_is_better and task.paper == {"bp": 31.01, "dfa": 25.41}
    assert R.PRESETS["full"]["depth"] == 8 and R.PRESETS["full"]["width"] == 256
    assert (R.PRESETS["full"]["n_coarse"], R.PRESETS["full"]["n_fine"]) == (64, 128)
    assert R.LR["full"]["bp"] == 5e-4 and R.LR["full"]["dfa"] == 1e-4
    full = NeRF(**{k: R.PRESETS["full"][k] for k in R.MODEL_KEYS})
    assert [layer.in_features for layer in full.coarse.trunk] == [63] + [256] * 4 + [256 + 63] + [256] * 2
    assert full.coarse.direction.in_features == 256 + 27 and full.coarse.rgb.in_features == 128
    with pytest.raises(ValueError, match="skips"):
        NeRF(depth=3, skips=(2,))


@pytest.fixture
def tiny_preset(monkeypatch):
    monkeypatch.setitem(
        R.PRESETS, "tiny", dict(scene="duck", size=12, views=(6, 1, 2), batch_rays=64, blocks=2, block_iters=3, **TINY)
    )
    monkeypatch.setitem(R.LR, "tiny", {"bp": 5e-3, "dfa": 5e-3, "shallow": 5e-3})


def test_run_on_a_nerf_synthetic_folder(tmp_path, tiny_preset):
    S.write_blender(synthetic_scene(n=(4, 3, 3), size=12), tmp_path / "scene")
    res = train(
        get("nerf"),
        TrainConfig(
            task="nerf", mode="dfa", preset="tiny", data=str(tmp_path / "scene"), out=tmp_path / "out", progress=False
        ),
    )
    assert math.isfinite(res.final["test_psnr"]) and res.config["views"] == {"train": 4, "val": 1, "test": 2}
    assert res.config["near"] == 2.0 and len(res.artefacts) == 4


@needs_pybullet
def test_run_end_to_end(tmp_path, monkeypatch, tiny_preset):
    monkeypatch.setenv("DFA_KERNELS_CACHE", str(tmp_path / "cache"))
    results = {}
    for mode in ("bp", "dfa", "shallow"):
        res = train(
            get("nerf"), TrainConfig(task="nerf", mode=mode, preset="tiny", out=tmp_path / mode, progress=False)
        )
        assert [h["epoch"] for h in res.history] == [1, 2]
        assert all(math.isfinite(h["train_loss"]) and math.isfinite(h["val_psnr"]) for h in res.history)
        assert math.isfinite(res.final["test_psnr"]) and res.config["lr"] == 5e-3
        assert res.backend == ("-" if mode == "bp" else res.backend) and res.backend
        assert len(res.artefacts) == 4 and all((tmp_path / mode / n).is_file() for n in ("test_001.png", "gt_001.png"))
        results[mode] = {"final": res.final, "artefacts": res.artefacts}
    assert (tmp_path / "cache" / "nerf").is_dir()
    path = R.render_comparison(results, tmp_path / "compare.png")
    assert path.is_file() and path.stat().st_size > 1000


@pytest.mark.parametrize("mode", ["fa", "brsf", "sdfa", "dkp"])
def test_nerf_trains_the_family(tmp_path, tiny_preset, mode):
    """Layer-wise modes convert both networks' linears, each reading its own network's DFA module
    (own seeds); dkp's two learned matrices join the optimizer and follow its exponential decay."""
    from dfa_kernels.layerwise import FeedbackLinear

    S.write_blender(synthetic_scene(n=(4, 1, 1), size=12), tmp_path / "scene")
    config = TrainConfig(task="nerf", mode=mode, preset="tiny", data=str(tmp_path / "scene"), progress=False)
    run = get("nerf").build(config)
    layers = {
        net: [m for m in getattr(run.model, net).modules() if isinstance(m, FeedbackLinear)]
        for net in ("coarse", "fine")
    }
    if mode in ("fa", "brsf"):
        assert all(len(v) == 7 for v in layers.values())  # trunk 3, feature, direction, sigma, rgb
        assert all(m.source is getattr(run.model, net).dfa for net, v in layers.items() for m in v)
        assert {m.seed for m in layers["coarse"]}.isdisjoint(m.seed for m in layers["fine"])
    else:
        assert not any(layers.values())
    if mode == "dkp":
        learned = run.optimizer.param_groups[-1]
        assert learned["params"] == [run.model.coarse.dfa.feedback, run.model.fine.dfa.feedback]
    res = train(get("nerf"), dataclasses.replace(config, out=tmp_path / "out"))
    assert math.isfinite(res.final["test_psnr"]) and res.config.get("layers_converted") == (
        14 if mode in ("fa", "brsf") else None
    )
