"""NeRF (Mildenhall et al. 2020) trained with Direct Feedback Alignment.

A NeRF MLP maps a 3-D point ``x`` and a view direction ``d`` to ``(rgb, sigma)``:

    gamma(x) -> input layer -> trunk (ReLU layers; gamma(x) is concatenated again to the output
             of the layers in ``skips``: layer 4 of 0..7 in the paper)
             -> sigma head (density: depends on x only)
             -> feature layer -> [feature, gamma(d)] -> direction layer -> rgb head

Feedback points: after the ReLU of the input layer and of every trunk layer, after the feature
layer and after the (ReLU of the) direction layer. The DFA output wraps the raw 4-d
``(rgb, sigma)`` of every sample, ``[rays, samples, 4]``: the error ``dL/draw`` comes through the
volume renderer, one row per sample, and the two heads (the layers after the last points) learn
exactly. In ``mode="shallow"`` only the heads learn; ``mode="bp"`` is ordinary backprop.

:class:`NeRF` holds a coarse and a fine MLP, each with its own :class:`dfa_kernels.DFA`, and
renders rays with stratified samples (coarse) plus importance samples (fine), as the paper does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import dfa_kernels as dk


def positional_encoding(x: torch.Tensor, n_freqs: int) -> torch.Tensor:
    """gamma(x) = [x, sin(x), cos(x), sin(2x), cos(2x), ..., sin(2^(L-1) x), cos(2^(L-1) x)]
    per coordinate group, ``[..., c] -> [..., c (1 + 2L)]`` (the reference code's form: frequencies
    2^k, no factor pi; scenes live in a few units around the origin)."""
    out = [x]
    for k in range(n_freqs):
        out += [torch.sin(x * 2.0**k), torch.cos(x * 2.0**k)]
    return torch.cat(out, -1)


class NeRFMLP(nn.Module):
    """(points [..., 3], view directions [..., 3]) -> raw (rgb, sigma) [..., 4], before activations."""

    def __init__(
        self,
        depth: int = 8,
        width: int = 256,
        skips=(4,),
        pos_freqs: int = 10,
        dir_freqs: int = 4,
        mode: str = "dfa",
        seed: int = 0,
    ):
        super().__init__()
        self.pos_freqs, self.dir_freqs, self.skips = pos_freqs, dir_freqs, set(skips)
        if not all(0 <= k < depth - 1 for k in self.skips):
            raise ValueError(f"skips must name trunk layers 0..{depth - 2} (their output gets gamma(x)); got {skips}")
        d_pos, d_dir = 3 * (1 + 2 * pos_freqs), 3 * (1 + 2 * dir_freqs)
        self.trunk = nn.ModuleList(
            [nn.Linear(d_pos, width)]
            + [nn.Linear(width + (d_pos if k - 1 in self.skips else 0), width) for k in range(1, depth)]
        )
        self.sigma = nn.Linear(width, 1)  # density head
        self.feature = nn.Linear(width, width)
        self.direction = nn.Linear(width + d_dir, width // 2)
        self.rgb = nn.Linear(width // 2, 3)  # colour head
        self.dfa = dk.DFA(mode=mode, seed=seed)

    def forward(self, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        x, d = positional_encoding(x, self.pos_freqs), positional_encoding(d, self.dir_freqs)
        h = x
        for k, layer in enumerate(self.trunk):  # layer 0 is the input layer
            h = self.dfa.point(F.relu(layer(h)))
            if k in self.skips:
                h = torch.cat([x, h], -1)
        sigma = self.sigma(h)
        feature = self.dfa.point(self.feature(h))
        h = self.dfa.point(F.relu(self.direction(torch.cat([feature, d], -1))))
        return self.dfa(torch.cat([self.rgb(h), sigma], -1))


def render(raw: torch.Tensor, z: torch.Tensor, rays_d: torch.Tensor, background=1.0, far: float | None = None):
    """Volume rendering of raw ``[R, S, 4]`` at depths ``z [R, S]``: (rgb [R, 3], weights [R, S],
    depth [R], opacity [R]). ``z`` is measured along ``rays_d`` (not normalised): distances are
    scaled by its length. ``background``: a number or per-ray colours ``[R, 3]``.

    The last sample's interval runs to ``far``, where the ray leaves the scene and meets the
    background. (The reference code makes it infinite, 1e10, when ``far`` is None: an opaque wall
    at the far bound wherever the last sample has any density. With a known background behind the
    scene, that wall must first be learned away; BP manages, DFA does not: every view collapses to
    the background colour, 11.7 dB on the duck's views, against 21 dB with the interval ending at far.)"""
    rgb, sigma = torch.sigmoid(raw[..., :3]), F.relu(raw[..., 3])
    last = torch.full_like(z[:, :1], 1e10) if far is None else (far - z[:, -1:]).clamp(min=0)
    delta = torch.cat([z[:, 1:] - z[:, :-1], last], -1) * rays_d.norm(dim=-1, keepdim=True)
    alpha = 1 - torch.exp(-sigma * delta)
    transmittance = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1 - alpha + 1e-10], -1), -1)[:, :-1]
    weights = alpha * transmittance
    opacity = weights.sum(-1)
    color = (weights[..., None] * rgb).sum(-2) + background * (1 - opacity[..., None])
    return color, weights, (weights * z).sum(-1), opacity


def sample_pdf(bins: torch.Tensor, weights: torch.Tensor, n: int, deterministic: bool = False) -> torch.Tensor:
    """``n`` depths per ray drawn from the piecewise-constant pdf ``weights [R, B-2]`` over
    ``bins [R, B-1]`` (inverse transform sampling, the paper's hierarchical sampling)."""
    pdf = (weights + 1e-5) / (weights + 1e-5).sum(-1, keepdim=True)
    cdf = torch.cat([torch.zeros_like(pdf[:, :1]), pdf.cumsum(-1)], -1)
    u = (
        torch.linspace(0, 1, n, device=bins.device).expand(len(cdf), n)
        if deterministic
        else torch.rand(len(cdf), n, device=bins.device)
    )
    idx = torch.searchsorted(cdf, u.contiguous(), right=True)
    lo, hi = (idx - 1).clamp(min=0), idx.clamp(max=cdf.shape[-1] - 1)
    cdf_lo, cdf_hi = cdf.gather(-1, lo), cdf.gather(-1, hi)
    bin_lo, bin_hi = bins.gather(-1, lo), bins.gather(-1, hi)
    t = (u - cdf_lo) / torch.where(cdf_hi - cdf_lo < 1e-5, torch.ones_like(u), cdf_hi - cdf_lo)
    return bin_lo + t * (bin_hi - bin_lo)


class NeRF(nn.Module):
    """Coarse + fine NeRF MLPs (each with its own DFA) and the renderer."""

    def __init__(
        self,
        depth: int = 8,
        width: int = 256,
        skips=(4,),
        pos_freqs: int = 10,
        dir_freqs: int = 4,
        n_coarse: int = 64,
        n_fine: int = 128,
        mode: str = "dfa",
        seed: int = 0,
    ):
        super().__init__()
        kw = dict(depth=depth, width=width, skips=skips, pos_freqs=pos_freqs, dir_freqs=dir_freqs, mode=mode)
        self.coarse, self.fine = NeRFMLP(seed=seed, **kw), NeRFMLP(seed=seed + 1, **kw)
        self.n_coarse, self.n_fine = n_coarse, n_fine

    @property
    def mode(self) -> str:
        return self.coarse.dfa.mode

    @mode.setter
    def mode(self, value: str) -> None:
        self.coarse.dfa.mode = self.fine.dfa.mode = value

    def _query(self, mlp, rays_o, rays_d, z, background, far):
        pts = rays_o[:, None] + rays_d[:, None] * z[..., None]  # [R, S, 3]
        dirs = F.normalize(rays_d, dim=-1)[:, None].expand_as(pts)
        return render(mlp(pts, dirs), z, rays_d, background, far)

    def forward(
        self,
        rays_o: torch.Tensor,
        rays_d: torch.Tensor,
        near: float,
        far: float,
        background: float = 1.0,
        perturb: bool | None = None,
    ) -> dict[str, torch.Tensor]:
        """Render rays ``[R, 3]``: {"rgb", "rgb_coarse" [R, 3], "depth" [R], "opacity" [R]} ("rgb" is
        the fine network's, or the coarse one's when n_fine = 0).
        perturb (default: in training mode) jitters the coarse samples within their strata."""
        perturb = self.training if perturb is None else perturb
        t = torch.linspace(0, 1, self.n_coarse, device=rays_o.device)
        z = (near + (far - near) * t).expand(len(rays_o), self.n_coarse)
        if perturb:
            mid = 0.5 * (z[:, 1:] + z[:, :-1])
            lo, hi = torch.cat([z[:, :1], mid], -1), torch.cat([mid, z[:, -1:]], -1)
            z = lo + (hi - lo) * torch.rand_like(z)
        rgb, weights, depth, opacity = self._query(self.coarse, rays_o, rays_d, z, background, far)
        out = {"rgb_coarse": rgb}
        if self.n_fine:
            z_fine = sample_pdf(
                0.5 * (z[:, 1:] + z[:, :-1]), weights[:, 1:-1].detach(), self.n_fine, deterministic=not perturb
            )
            z = torch.sort(torch.cat([z, z_fine], -1), -1).values
            rgb, _, depth, opacity = self._query(self.fine, rays_o, rays_d, z, background, far)
        out.update(rgb=rgb, depth=depth, opacity=opacity)
        return out
