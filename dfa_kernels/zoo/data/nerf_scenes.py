"""NeRF scenes: real textured models rendered offline with pybullet, or NeRF-synthetic files.

``load_pybullet_scene("duck")`` renders a model from ``pybullet_data`` with pybullet's CPU
renderer (``p.connect(p.DIRECT)``, ``ER_TINY_RENDERER``; no display, no GPU), from cameras on
the upper hemisphere around it, on first use, and caches the views as ``.npz`` under
``$DFA_KERNELS_CACHE/nerf`` (default ``~/.cache/dfa_kernels/nerf``). Rendering is deterministic.
The segmentation mask is the alpha channel, so the images composite onto a white (or black)
background exactly like Blender-synthetic's transparent PNGs.

``load_blender(DIR)`` reads the NeRF-synthetic format: ``transforms_{train,val,test}.json``
(``camera_angle_x`` and per frame ``file_path`` + ``transform_matrix``) and RGBA PNG images.

Conventions (both sources): poses are camera-to-world 4x4 matrices of an OpenGL/Blender camera
(it looks down -z, y up, x right), the NeRF ``transforms.json`` convention; image row 0 is the
top. The ray through pixel (row j, column i) has the direction

    [(i + 0.5 - W/2) / f, -(j + 0.5 - H/2) / f, -1] @ c2w[:3, :3].T,   f = 0.5 H / tan(fov_y / 2),

so ``origin + t * direction`` lies at depth t along the camera's -z axis (the depth maps stored
with pybullet scenes are this z-depth). Pybullet scenes are normalised: the model's bounding
sphere is the unit sphere at the origin, and near/far bound it tightly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from . import INSTALL_HINT, DataFormatError, DataNotFoundError

INSTALL = f"{INSTALL_HINT}   (or: pip install pybullet==3.2.7)"
SPLITS = ("train", "val", "test")
CACHE_VERSION = 1
# name -> (file in pybullet_data, base orientation as roll-pitch-yaw): the scene's up is +z.
SCENES = {
    "duck": ("duck_vhacd.urdf", (math.pi / 2, 0.0, 0.0)),  # textured mesh (duckCM.png), y-up file
    "r2d2": ("r2d2.urdf", (0.0, 0.0, 0.0)),  # coloured parts: blue, white, grey
    "lego": ("lego/lego.urdf", (0.0, 0.0, 0.0)),  # one LEGO brick
    "teddy": ("teddy_vhacd.urdf", (math.pi / 2, 0.0, 0.0)),
}


@dataclasses.dataclass
class Views:
    images: torch.Tensor  # [N, H, W, 3] float in [0, 1], composited on the background
    poses: torch.Tensor  # [N, 4, 4] camera-to-world (OpenGL camera)
    alpha: torch.Tensor  # [N, H, W] float in [0, 1] (1 = object)
    depth: torch.Tensor | None = None  # [N, H, W] z-depth (pybullet scenes only; far where empty)


@dataclasses.dataclass
class Scene:
    splits: dict[str, Views]  # "train", "val", "test"
    H: int
    W: int
    focal: float
    near: float
    far: float
    background: float  # 1.0 white, 0.0 black
    info: dict = dataclasses.field(default_factory=dict)


def cache_dir() -> Path:
    root = os.environ.get("DFA_KERNELS_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "dfa_kernels") / "nerf"


# ------------------------------------------------------------------------------------ rays
def get_rays(H: int, W: int, focal: float, c2w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Origins and directions ``[..., H, W, 3]`` of the rays through the pixel centres of cameras
    ``c2w [..., 4, 4]`` (OpenGL: looks down -z, y up; row 0 at the top). Directions are not
    normalised: their camera-space z is -1, so ``o + t d`` is at z-depth t."""
    c2w = torch.as_tensor(c2w, dtype=torch.float32)
    j, i = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    dirs = torch.stack([(i + 0.5 - W / 2) / focal, -(j + 0.5 - H / 2) / focal, -torch.ones_like(i)], -1)
    rays_d = dirs @ c2w[..., None, :3, :3].transpose(-1, -2)  # [..., H, W, 3]
    rays_o = c2w[..., None, None, :3, 3].expand(rays_d.shape)
    return rays_o, rays_d


def project(points: torch.Tensor, H: int, W: int, focal: float, c2w: torch.Tensor):
    """Inverse of :func:`get_rays`: world points ``[..., 3]`` -> (row j, column i, z-depth) in a camera."""
    w2c = torch.linalg.inv(torch.as_tensor(c2w, dtype=torch.float32))
    p = points @ w2c[:3, :3].T + w2c[:3, 3]
    depth = -p[..., 2]
    i = p[..., 0] / depth * focal + W / 2 - 0.5
    j = -p[..., 1] / depth * focal + H / 2 - 0.5
    return j, i, depth


def reprojection_agreement(
    scene_views: Views, a: int, b: int, H: int, W: int, focal: float, tol: float = 0.05
) -> float:
    """Back-project view a's depth to 3-D and look at it from view b: the fraction of a's object
    pixels that land inside b on an object pixel at the same depth (within ``tol``). The test of
    the ray convention: ~0.96 for the right one, ~0.5 with a wrong y flip."""
    o, d = get_rays(H, W, focal, scene_views.poses[a])
    fg = scene_views.alpha[a] > 0.5
    pts = (o + d * scene_views.depth[a][..., None])[fg]
    j, i, z = project(pts, H, W, focal, scene_views.poses[b])
    jr, ir = j.round().long(), i.round().long()
    inside = (jr >= 0) & (jr < H) & (ir >= 0) & (ir < W) & (z > 0)
    jr, ir, z = jr[inside], ir[inside], z[inside]
    ok = (scene_views.alpha[b][jr, ir] > 0.5) & ((scene_views.depth[b][jr, ir] - z).abs() < tol)
    return float(ok.float().mean()) if len(z) else 0.0


# ------------------------------------------------------------------------------- pybullet
def _pybullet():
    """Import pybullet with its build-time banner (printed by C code) silenced."""
    import importlib.util
    import sys

    if "pybullet" in sys.modules:
        return sys.modules["pybullet"]
    if importlib.util.find_spec("pybullet") is None:
        raise ImportError(f"pybullet scenes need pybullet (CPU renderer, real textured models): {INSTALL}")
    import ctypes

    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
            import pybullet

            ctypes.CDLL(None).fflush(None)  # C stdio may buffer the banner: flush it into /dev/null
    finally:
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)
    return pybullet


def camera_positions(n: int, seed: int = 0, min_elevation: float = 10.0, max_elevation: float = 70.0):
    """``n`` unit vectors on the upper hemisphere band [min, max] elevation (degrees), uniform in
    area, from a fixed seed."""
    rng = np.random.default_rng(seed)
    z = rng.uniform(math.sin(math.radians(min_elevation)), math.sin(math.radians(max_elevation)), n)
    phi = rng.uniform(0, 2 * math.pi, n)
    r = np.sqrt(1 - z**2)
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], 1)


def render_pybullet(
    scene: str, size: int, n_views: int, fov: float = 30.0, radius: float = 4.0, seed: int = 0, light=(1.0, -0.5, 2.0)
) -> dict[str, np.ndarray]:
    """Render ``n_views`` square views of a pybullet_data model; returns numpy arrays
    ``rgba`` [N, H, W, 4] uint8, ``depth`` [N, H, W] float32, ``poses`` [N, 4, 4], ``focal``,
    ``near``, ``far`` (normalised units: the model's bounding sphere is the unit sphere)."""
    p = _pybullet()
    import pybullet_data

    path, rpy = SCENES[scene] if scene in SCENES else (scene, (0.0, 0.0, 0.0))
    client = p.connect(p.DIRECT)
    try:
        p.setAdditionalSearchPath(pybullet_data.getDataPath(), physicsClientId=client)
        body = (
            p.loadURDF(path, baseOrientation=p.getQuaternionFromEuler(rpy), physicsClientId=client)
            if path.endswith(".urdf")
            else p.createMultiBody(
                baseVisualShapeIndex=p.createVisualShape(p.GEOM_MESH, fileName=path, physicsClientId=client),
                physicsClientId=client,
            )
        )
        boxes = [
            p.getAABB(body, link, physicsClientId=client)
            for link in range(-1, p.getNumJoints(body, physicsClientId=client))
        ]
        lo, hi = np.min([b[0] for b in boxes], 0), np.max([b[1] for b in boxes], 0)
        center, scale = (lo + hi) / 2, float(np.linalg.norm(hi - lo) / 2)  # bounding sphere
        near, far = radius - 1.0, radius + 1.0  # bound the unit sphere
        zn, zf = (near - 0.5) * scale, (far + 0.5) * scale  # the renderer's clip planes
        proj = p.computeProjectionMatrixFOV(fov, 1.0, zn, zf)
        rgba, depth, poses = [], [], []
        for eye in camera_positions(n_views, seed):
            view = p.computeViewMatrix((center + radius * scale * eye).tolist(), center.tolist(), [0, 0, 1])
            _, _, img, zbuf, seg = p.getCameraImage(
                size,
                size,
                view,
                proj,
                renderer=p.ER_TINY_RENDERER,
                lightDirection=list(light),
                shadow=0,
                physicsClientId=client,
            )
            img = np.asarray(img, np.uint8).reshape(size, size, 4).copy()
            mask = np.asarray(seg).reshape(size, size) >= 0
            img[..., 3] = np.where(mask, 255, 0)
            zbuf = np.asarray(zbuf, np.float64).reshape(size, size)
            z = zf * zn / (zf - (zf - zn) * zbuf) / scale  # linear z-depth
            c2w = np.linalg.inv(np.asarray(view, np.float64).reshape(4, 4).T)  # OpenGL camera-to-world
            c2w[:3, 3] = (c2w[:3, 3] - center) / scale
            rgba.append(img)
            depth.append(np.where(mask, z, far).astype(np.float32))
            poses.append(c2w.astype(np.float32))
    finally:
        p.disconnect(physicsClientId=client)
    focal = 0.5 * size / math.tan(math.radians(fov) / 2)
    return {
        "rgba": np.stack(rgba),
        "depth": np.stack(depth),
        "poses": np.stack(poses),
        "focal": np.float32(focal),
        "near": np.float32(near),
        "far": np.float32(far),
    }


def _views(rgba, poses, depth, background: float) -> Views:
    rgba = torch.as_tensor(np.asarray(rgba, np.float32) / (255.0 if rgba.dtype == np.uint8 else 1.0))
    alpha = rgba[..., 3]
    images = rgba[..., :3] * alpha[..., None] + background * (1 - alpha[..., None])
    return Views(
        images.contiguous(),
        torch.as_tensor(np.asarray(poses, np.float32)),
        alpha.contiguous(),
        None if depth is None else torch.as_tensor(depth),
    )


def load_pybullet_scene(
    scene: str = "duck",
    size: int = 40,
    views: tuple[int, int, int] = (30, 4, 8),
    white_background: bool = True,
    seed: int = 0,
    fov: float = 30.0,
    radius: float = 4.0,
    cache: str | Path | None = None,
) -> Scene:
    """A pybullet_data model rendered at ``size``x``size`` from ``sum(views)`` cameras on the upper
    hemisphere, split (train, val, test); rendered once, then read from the ``.npz`` cache."""
    root = Path(cache) if cache is not None else cache_dir()
    name = f"{scene}_{size}px_{'-'.join(map(str, views))}_fov{fov:g}_r{radius:g}_s{seed}_v{CACHE_VERSION}.npz"
    path = root / name
    if path.is_file():
        data = dict(np.load(path))
    else:
        if scene not in SCENES and not Path(scene).suffix:
            raise ValueError(
                f"unknown pybullet scene {scene!r}; known: {', '.join(SCENES)} (or a .urdf/.obj file of pybullet_data)"
            )
        data = render_pybullet(scene, size, sum(views), fov, radius, seed)
        root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez_compressed(tmp, **data)
        os.replace(tmp, path)
    background = 1.0 if white_background else 0.0
    bounds = np.cumsum([0, *views])
    splits = {
        s: _views(data["rgba"][a:b], data["poses"][a:b], data["depth"][a:b], background)
        for s, a, b in zip(SPLITS, bounds[:-1], bounds[1:])
    }
    return Scene(
        splits,
        size,
        size,
        float(data["focal"]),
        float(data["near"]),
        float(data["far"]),
        background,
        info={
            "source": f"pybullet_data/{SCENES.get(scene, (scene,))[0]} (ER_TINY_RENDERER)",
            "scene": scene,
            "size": size,
            "views": dict(zip(SPLITS, views)),
            "fov_deg": fov,
            "camera_radius": radius,
            "cache": str(path),
        },
    )


# ------------------------------------------------------------------------- NeRF-synthetic
def _read_png(path: Path) -> np.ndarray:
    import matplotlib.image

    if not Path(path).is_file():
        raise DataNotFoundError(f"image {path} is missing")
    try:
        img = np.asarray(matplotlib.image.imread(path), np.float32)  # PNG -> floats in [0, 1]
    except (OSError, ValueError, SyntaxError) as err:
        raise DataFormatError(f"{path} is not a readable PNG image ({err})") from None
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, -1)
    if img.shape[-1] == 3:
        img = np.concatenate([img, np.ones_like(img[..., :1])], -1)
    return img


def load_blender(
    root: str | Path,
    downscale: int | None = None,
    size: int | None = None,
    white_background: bool = True,
    max_views: int | tuple | None = None,
    near: float = 2.0,
    far: float = 6.0,
) -> Scene:
    """A NeRF-synthetic scene: ``root/transforms_{train,val,test}.json`` + RGBA PNGs. ``downscale``:
    integer factor (area average; 8 turns the 800 px originals into 100 px), or ``size``: the
    factor that brings the width closest to it; ``max_views``: keep the first views of each split
    (one number, or one per split: train, val, test).
    near/far default to Blender-synthetic's 2 and 6."""
    root = Path(root)
    splits, focal, H, W = {}, None, None, None
    limits = max_views if isinstance(max_views, (tuple, list)) else (max_views,) * len(SPLITS)
    for split, limit in zip(SPLITS, limits):
        meta_path = root / f"transforms_{split}.json"
        if not meta_path.is_file():
            raise DataNotFoundError(
                f"{meta_path} is missing: a NeRF-synthetic scene folder holds "
                "transforms_train.json, transforms_val.json and transforms_test.json"
            )
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            raise DataFormatError(f"{meta_path} is not valid JSON ({err})") from None
        if (
            not isinstance(meta, dict)
            or not isinstance(meta.get("frames"), list)
            or not meta["frames"]
            or "camera_angle_x" not in meta
            or not all(isinstance(f, dict) and {"file_path", "transform_matrix"} <= f.keys() for f in meta["frames"])
        ):
            raise DataFormatError(
                f"{meta_path}: expected a JSON object with 'camera_angle_x' and a non-empty "
                "'frames' list of {'file_path', 'transform_matrix'} (the NeRF-synthetic format)"
            )
        frames = meta["frames"][:limit]
        images, poses = [], []
        for frame in frames:
            file = root / frame["file_path"]
            if file.suffix.lower() != ".png":
                file = file.with_name(file.name + ".png")
            img = _read_png(file)
            if downscale is None:
                downscale = max(1, round(img.shape[1] / size)) if size else 1
            if downscale > 1:
                h, w = img.shape[0] // downscale, img.shape[1] // downscale
                img = img[: h * downscale, : w * downscale].reshape(h, downscale, w, downscale, 4).mean((1, 3))
            images.append(img)
            pose = np.asarray(frame["transform_matrix"], np.float32)
            if pose.shape != (4, 4):
                raise DataFormatError(
                    f"{meta_path}: transform_matrix of {frame['file_path']} must be 4x4; got shape {pose.shape}"
                )
            poses.append(pose)
        h, w = images[0].shape[:2]
        f = 0.5 * w / math.tan(0.5 * float(meta["camera_angle_x"]))
        if H is not None and (h, w) != (H, W):
            raise ValueError(f"{split} images are {h}x{w}, other splits {H}x{W}")
        H, W, focal = h, w, f if focal is None else focal
        splits[split] = _views(np.stack(images), np.stack(poses), None, 1.0 if white_background else 0.0)
    return Scene(
        splits,
        H,
        W,
        focal,
        near,
        far,
        1.0 if white_background else 0.0,
        info={
            "source": f"NeRF-synthetic files in {root}",
            "scene": root.name,
            "size": W,
            "downscale": downscale,
            "views": {s: len(v.images) for s, v in splits.items()},
        },
    )


def write_blender(scene: Scene, root: str | Path, camera_angle_x: float | None = None) -> None:
    """Write a scene in the NeRF-synthetic format (RGBA PNGs + transforms_*.json); tests use it."""
    import matplotlib.image

    root = Path(root)
    angle = camera_angle_x if camera_angle_x is not None else 2 * math.atan(0.5 * scene.W / scene.focal)
    for split, v in scene.splits.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        frames = []
        for k in range(len(v.images)):
            rgba = torch.cat([v.images[k], v.alpha[k, ..., None]], -1).clamp(0, 1).numpy()
            matplotlib.image.imsave(root / split / f"r_{k}.png", rgba)
            frames.append({"file_path": f"./{split}/r_{k}", "transform_matrix": v.poses[k].tolist()})
        (root / f"transforms_{split}.json").write_text(json.dumps({"camera_angle_x": angle, "frames": frames}))
