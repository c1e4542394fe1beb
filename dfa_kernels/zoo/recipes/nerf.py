"""NeRF task: novel-view synthesis of a real textured model, trained with BP, DFA or shallow.

``dfa-kernels train nerf --mode dfa`` renders the ``duck`` of ``pybullet_data`` (textured mesh)
with pybullet's CPU renderer on first use (cached under ``$DFA_KERNELS_CACHE/nerf``), trains a
coarse + fine NeRF on random batches of rays of the training views, and reports the PSNR of the
held-out test views; the rendered test views are saved as PNG under the run folder.
``--data`` picks another scene: a pybullet scene name (``duck``, ``r2d2``, ``lego``, ``teddy``) or a
NeRF-synthetic folder (``transforms_{train,val,test}.json`` + PNGs, downscaled to the preset's size).

Presets: "cpu" (32 px images, 30/2/8 train/val/test views, a 4x128 trunk with a skip, 16 + 16
samples per ray, 256 rays x 600 steps: about 3 minutes per mode on a busy 2-core CPU) and "full"
(the paper's NeRF: 8x256 with a skip after layer 4, 64 + 128 samples, 100 views at 200 px; for a
GPU). Adam with each mode's own learning rate, decayed exponentially to a tenth over the run (the
same fixed budget for every mode: the schedule sets the run's length); an "epoch" is a block of
iterations, after which the validation PSNR is measured; the test PSNR is that of the block with
the best validation PSNR. Rays end at the far bound, where the background
shows (see :func:`dfa_kernels.models.nerf.render`: with the reference code's infinite last
interval, DFA collapses: every view renders as the bare background).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...figures import save_figure
from ..models.nerf import NeRF
from ..tasks import Task, TrainConfig, register, set_feedback, tuned_as
from ..trainer import Run, Sampled, shard_rows

PRESETS = {
    "cpu": dict(
        scene="duck",
        size=32,
        views=(30, 2, 8),
        depth=4,
        width=128,
        skips=(1,),
        pos_freqs=6,
        dir_freqs=2,
        n_coarse=16,
        n_fine=16,
        batch_rays=256,
        blocks=6,
        block_iters=100,
    ),
    "full": dict(
        scene="duck",
        size=200,
        views=(100, 10, 25),
        depth=8,
        width=256,
        skips=(4,),
        pos_freqs=10,
        dir_freqs=4,
        n_coarse=64,
        n_fine=128,
        batch_rays=1024,
        blocks=50,
        block_iters=1000,
    ),
}
# Adam learning rates. full: the paper's (BP 5e-4, DFA 1e-4). cpu: the winners of the tuning grid
# below on the duck's validation PSNR (benchmarks/results/zoo/tuning/nerf.json).
# The family's cpu rates: the same grid as dfa's (benchmarks/results/zoo/family/nerf.MODE.tuning.json).
LR = {
    "cpu": {
        "bp": 3e-3,
        "dfa": 3e-3,
        "shallow": 3e-2,
        **{"sdfa": 1e-3, "ternary": 1e-3, "dkp": 3e-3, "fdfa": 3e-3},
        **{"fa": 3e-3, "usf": 3e-3, "brsf": 3e-3, "frsf": 3e-3},
    },
    "full": {"bp": 5e-4, "dfa": 1e-4, "shallow": 5e-4},
}
# The tuning grid of the cpu preset's learning rate, three candidates for every mode (`dfa-kernels
# tune nerf`: validation PSNR, seed 0); shallow's (only the heads learn) one step higher. A first grid
# one step lower (3e-4..3e-3; shallow 1e-3..1e-2) had every winner at its top edge.
LR_GRID = {"bp": (1e-3, 3e-3, 1e-2), "dfa": (1e-3, 3e-3, 1e-2), "shallow": (3e-3, 1e-2, 3e-2)}
# Where the grids above differ between modes, and why (tests/test_fairness.py; the README lists them).
TUNING_DEPARTURES = {
    "lr": "shallow (only the heads learn) one step higher: its winner sat at the top edge of the grid it "
    "shared with bp and dfa (3e-4..3e-3 and then 1e-3..1e-2); at 1e-1 it diverged",
}
# Launay et al. 2020, "Direct Feedback Alignment Scales to Modern Deep Learning Tasks and
# Architectures": mean test PSNR over the NeRF-synthetic scenes.
PAPER = {"bp": 31.01, "dfa": 25.41}
PAPER_SETTING = "NeRF-synthetic scenes at 800 px (mean test PSNR over the scenes)"
PROBE_RAYS = 512  # the alignment measurement's batch
MODEL_KEYS = ("depth", "width", "skips", "pos_freqs", "dir_freqs", "n_coarse", "n_fine")


def load_scene(data: str | None, preset: dict, seed: int = 0):
    from ..data import nerf_scenes as S

    if data and Path(data).expanduser().is_dir():
        return S.load_blender(Path(data).expanduser(), size=preset["size"], max_views=preset["views"])
    return S.load_pybullet_scene(data or preset["scene"], size=preset["size"], views=preset["views"], seed=seed)


def scene_rays(scene, split: str):
    """(origins, directions, colours), each [views * H * W, 3], of one split."""
    from ..data.nerf_scenes import get_rays

    v = scene.splits[split]
    o, d = get_rays(scene.H, scene.W, scene.focal, v.poses)
    return o.reshape(-1, 3), d.reshape(-1, 3), v.images.reshape(-1, 3)


def psnr(mse: torch.Tensor) -> torch.Tensor:
    return -10 * torch.log10(mse)


@torch.no_grad()
def render_views(model: NeRF, scene, split: str, chunk: int = 2048, device="cpu") -> torch.Tensor:
    """Render every view of a split with the fine network: [N, H, W, 3]."""
    model.eval()
    o, d, _ = scene_rays(scene, split)
    rgb = torch.cat(
        [
            model(oc.to(device), dc.to(device), scene.near, scene.far, scene.background)["rgb"].cpu()
            for oc, dc in zip(o.split(chunk), d.split(chunk))
        ]
    )
    model.train()
    return rgb.reshape(len(scene.splits[split].images), scene.H, scene.W, 3)


def view_psnr(model: NeRF, scene, split: str, device="cpu") -> tuple[float, torch.Tensor]:
    """Mean over views of each view's PSNR (the NeRF papers' figure), and the rendered views."""
    images = render_views(model, scene, split, device=device)
    mse = (images.clamp(0, 1) - scene.splits[split].images).pow(2).mean((1, 2, 3))
    return float(psnr(mse).mean()), images


def save_png(image: torch.Tensor, path: Path) -> str:
    import matplotlib.image

    matplotlib.image.imsave(path, image.clamp(0, 1).numpy())
    return str(path)


def build(config: TrainConfig) -> Run:
    preset = PRESETS[config.preset]
    device = torch.device(config.device)
    scene = load_scene(config.data, preset, seed=0)
    torch.manual_seed(config.seed)
    model = NeRF(**{k: preset[k] for k in MODEL_KEYS}, mode=config.mode, seed=config.seed).to(device)
    set_feedback(model, config.feedback)
    lr = config.lr or (config.hp or {}).get("lr", tuned(config)["lr"])
    blocks = config.epochs or preset["blocks"]
    o, d, target = scene_rays(scene, "train")

    def draw(generator, rays=preset["batch_rays"]):
        return torch.randint(0, len(o), (rays,), generator=generator)

    def loss(model, idx):
        out = model(o[idx].to(device), d[idx].to(device), scene.near, scene.far, scene.background)
        t = target[idx].to(device)
        return (out["rgb"] - t).pow(2).mean() + (out["rgb_coarse"] - t).pow(2).mean()

    def finish(model, out: Path) -> list[str]:
        """The held-out test views rendered by the selected model, beside the ground truth."""
        out.mkdir(parents=True, exist_ok=True)
        _, images = view_psnr(model, scene, "test", device)
        saved = []
        for k, (pred, gt) in enumerate(zip(images, scene.splits["test"].images)):
            saved += [save_png(pred, out / f"test_{k:03d}.png"), save_png(gt, out / f"gt_{k:03d}.png")]
        return saved

    opt = torch.optim.Adam(model.parameters(), lr=lr)
    total = blocks * preset["block_iters"]
    hp = {
        "mode": config.mode,
        "preset": config.preset,
        "optimizer": "Adam",
        "lr": lr,
        "lr_schedule": "exponential decay to 0.1x",
        "blocks": blocks,
        "seed": config.seed,
        **{k: v for k, v in preset.items() if k not in ("blocks", "scene")},
        "data": scene.info.get("source"),
        "scene": scene.info.get("scene"),
        "H": scene.H,
        "W": scene.W,
        "views": scene.info.get("views"),
        "near": scene.near,
        "far": scene.far,
        "background": "white" if scene.background else "black",
        "feedback": config.feedback,
        "selection": "best block on validation PSNR",
        "stopping": "fixed budget (the lr schedule's length)",
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    if config.preset == "cpu":
        hp["preset_note"] = "cpu preset: 32 px, 4x128 trunk, 16+16 samples, 600 steps (see 'full' for the paper's NeRF)"
    return Run(
        model=model,
        optimizer=opt,
        batches=Sampled(draw, config.seed),
        loss=loss,
        evaluate=lambda model, split: {"psnr": view_psnr(model, scene, split, device)[0]},
        select="psnr",
        higher_is_better=True,
        epochs=blocks,
        steps_per_epoch=preset["block_iters"],
        scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.1 ** (step / total)),
        probe=draw(torch.Generator().manual_seed(config.seed + 1), PROBE_RAYS),
        hyper_parameters=hp,
        finish=finish,
        shard=shard_rows,
    )


def render_comparison(results: dict, path, view: int = 0) -> Path:
    """One test view side by side: ground truth, then each run's rendering (``results``: label ->
    a run's {"final", "artefacts"} — a compare report's runs — of runs that saved their images)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image
    import matplotlib.pyplot as plt

    def find(result, prefix):
        name = f"{prefix}_{view:03d}.png"
        hits = [a for a in result["artefacts"] if Path(a).name == name]
        if not hits:
            raise FileNotFoundError(f"no {name} among the run's artefacts: run the task with config.out set")
        return matplotlib.image.imread(hits[0])

    panels = [("ground truth", find(next(iter(results.values())), "gt"))]
    panels += [(f"{label}: {r['final']['test_psnr']:.2f} dB", find(r, "test")) for label, r in results.items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.9))
    for ax, (title, image) in zip(axes, panels):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    fig.suptitle(f"NeRF, held-out test view {view} (PSNR: mean over the test views)", fontsize=10)
    return save_figure(fig, path, dpi=120)


def grid(config: TrainConfig) -> list[dict]:
    return [dict(lr=lr) for lr in LR_GRID[tuned_as(config.mode)]]


def tuned(config: TrainConfig) -> dict:
    rates = LR[config.preset]
    return dict(lr=rates.get(config.mode, rates[tuned_as(config.mode)]))


register(
    Task(
        name="nerf",
        family="nerf",
        description="NeRF (coarse + fine, DFA per network) on the pybullet duck rendered offline; "
        "--data SCENE|DIR: another pybullet scene or a NeRF-synthetic folder",
        metric="test_psnr",
        higher_is_better=True,
        build=build,
        paper=PAPER,
        paper_setting=PAPER_SETTING,
        grid=grid,
        tuned=tuned,
        figure=render_comparison,
        unsupported={"drtp": "NeRF regresses colour and density: no class targets to project"},
        presets=PRESETS,
    )
)
