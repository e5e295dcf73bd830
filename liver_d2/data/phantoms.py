"""Synthetic abdominal CT phantoms: the project's built-in, license-free default data.

Each phantom is an int16 HU volume plus a 0/1/2 label (background / liver / tumor) in
LPS index order, written in the MSD Task03 layout so the real-data pipeline reads it
unchanged. The anatomy is crude but the *statistics that make tumor detection hard* follow
real portal-venous and unenhanced CT: liver 50-70 / 100-130 HU, tumor-to-liver contrast
10-60 HU, diameters 3-80 mm with at least a third under 10 mm, 10-20 HU texture and noise,
partial-volume blur, tumors touching each other and the liver edge, and look-alikes
(vessels, gallbladder, spleen, kidneys, bowel, bone) around the liver.

The phantoms are a fixed yardstick: never tune these numbers to make a training target
easier to reach. Everything is deterministic under the seed (one PCG64 stream, drawn in a
fixed order), so the same seed gives byte-identical arrays and files.

Internal coordinates are millimetres centred on the volume: x toward patient Left, y toward
Posterior, z toward Superior, matching the LPS index order of the arrays.
"""
from __future__ import annotations

import csv
import glob
import gzip
import json
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
from scipy import ndimage

DEFAULT_SHAPE = (256, 256, 64)
HU_MIN, HU_MAX = -1024, 3071
AIR_HU = -1000.0

FOV_MM = (330.0, 390.0)  # in-plane field of view; spacing = FOV / size (~1.3-1.5 mm at 256)
SLICE_MM = (2.0, 3.0)
PORTAL_SHARE = 0.75  # most LiTS scans are portal-venous

MAX_TUMORS = 8
TUMOR_COUNT_P = (0.15, 0.22, 0.17, 0.13, 0.11, 0.08, 0.06, 0.05, 0.03)  # P(0 .. 8 tumors)
DIAMETER_MM = (3.0, 80.0)
SMALL_MM = 10.0
SMALL_SHARE = 0.40  # share drawn log-uniform in [3, 10) mm; the rest log-uniform in [10, 80]
CONTRAST_HU = (10.0, 60.0)
KINDS = ("hypodense", "hyperdense", "rim")
KIND_P = (0.70, 0.15, 0.15)

NOISE_SD_HU = (10.0, 18.0)
LIVER_TEXTURE_SD_HU = (3.0, 6.0)
BLUR_XY_VOX = (0.5, 0.9)  # partial-volume / PSF blur, in voxels
BLUR_Z_VOX = (0.4, 0.8)
FREE_END_SLICES = 2  # liver-free slices guaranteed at the top and bottom
MIN_SIZE, MIN_SLICES = 32, 12  # below this there is no room for a liver between free end slices


# --------------------------------------------------------------------------------------
# Public data types
# --------------------------------------------------------------------------------------


@dataclass
class Phantom:
    """One synthetic CT volume with its ground truth.

    ``hu`` and ``label`` are indexed (x, y, z) in LPS order, so ``hu[:, :, k].T`` is the
    axial image as a radiologist sees it. ``affine`` is the NIfTI (RAS world) affine.
    Each tumor dict holds: center_mm (RAS world, via ``affine``), center_voxel, diameter_mm,
    kind, contrast_hu (signed nominal contrast of the lesion body to the liver; for "rim"
    the dark core), rim_hu (rim contrast, 0 unless "rim"), mean_contrast_hu (measured mean
    over its voxels before blur and noise), placement (deep / edge / adjacent), n_voxels.
    """

    hu: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    tumors: list[dict]
    phase: str
    seed: int
    liver_hu: float  # nominal parenchyma HU (before texture, vessels and noise)
    noise_sd: float
    blur_sigma_vox: tuple[float, float, float]

    def meta(self) -> dict:
        """JSON-friendly description (everything but the arrays)."""
        liver = self.label == 1
        return {
            "seed": self.seed,
            "shape": list(self.hu.shape),
            "spacing": list(self.spacing),
            "phase": self.phase,
            "liver_hu": self.liver_hu,
            "liver_mean_hu": float(self.hu[liver].mean()) if liver.any() else None,
            "noise_sd": self.noise_sd,
            "blur_sigma_vox": list(self.blur_sigma_vox),
            "tumors": self.tumors,
        }


@dataclass(frozen=True)
class _Grid:
    """Voxel-centre coordinates (mm) of a volume and cheap sub-box lookups."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    axes: tuple[np.ndarray, np.ndarray, np.ndarray]

    def box(self, center: Sequence[float], half: Sequence[float]) -> tuple[tuple[slice, ...], list[np.ndarray]]:
        """Index box covering center +/- half (mm), with broadcastable coordinates inside it."""
        slices, coords = [], []
        for d in range(3):
            a = self.axes[d]
            lo = int(np.searchsorted(a, center[d] - half[d], "left"))
            hi = int(np.searchsorted(a, center[d] + half[d], "right"))
            hi = max(lo, hi)
            slices.append(slice(lo, hi))
            shape = [1, 1, 1]
            shape[d] = hi - lo
            coords.append(a[lo:hi].reshape(shape))
        return tuple(slices), coords


@dataclass
class _Body:
    """What later organs need to know about the trunk they sit in."""

    cy: float  # body centre, y (mm)
    a_c: float  # abdominal cavity semi-axes (mm)
    b_c: float
    y_vert: float  # vertebral body centre, y (mm)
    vert_ry: float  # vertebral body AP semi-axis
    cavity: np.ndarray  # 3D bool: inside the muscle wall, not spine/back muscles


@dataclass
class _Liver:
    center: np.ndarray  # right-lobe centre (mm)
    semi: np.ndarray  # right-lobe semi-axes (mm)
    box: tuple[slice, ...]
    mask: np.ndarray  # bool inside box


# --------------------------------------------------------------------------------------
# Sampling helpers (exposed so the tumor statistics can be tested without volumes)
# --------------------------------------------------------------------------------------


def make_rng(seed: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(seed))


def sample_tumor_count(rng: np.random.Generator, max_tumors: int = MAX_TUMORS) -> int:
    """0..max_tumors, most volumes with 1-6: some tumor-free volumes keep false positives honest."""
    p = np.asarray(TUMOR_COUNT_P[: max_tumors + 1], float)
    return int(rng.choice(len(p), p=p / p.sum()))


def sample_tumor_diameters(rng: np.random.Generator, n: int) -> np.ndarray:
    """Diameters (mm): a log-uniform mix that puts >= 1/3 under 10 mm, as in LiTS."""
    small = rng.random(n) < SMALL_SHARE
    lo = np.where(small, DIAMETER_MM[0], SMALL_MM)
    hi = np.where(small, SMALL_MM, DIAMETER_MM[1])
    return np.exp(rng.uniform(np.log(lo), np.log(hi)))


def sample_tumor_specs(rng: np.random.Generator, n: int) -> list[dict]:
    """Kind, diameter and signed contrast of n tumors (placement comes later)."""
    diameters = sample_tumor_diameters(rng, n)
    kinds = rng.choice(len(KINDS), size=n, p=KIND_P)
    magnitude = rng.uniform(*CONTRAST_HU, size=n)
    rim_factor = rng.uniform(0.6, 1.2, size=n)
    specs = []
    for d, k, c, rf in zip(diameters, kinds, magnitude, rim_factor):
        kind = KINDS[k]
        contrast = c if kind == "hyperdense" else -c
        rim = float(np.clip(rf * c, *CONTRAST_HU)) if kind == "rim" else 0.0
        specs.append({"diameter_mm": float(d), "kind": kind, "contrast_hu": float(contrast), "rim_hu": rim})
    return specs


def _smooth_field(rng: np.random.Generator, coords: Sequence[np.ndarray], corr_mm: float) -> np.ndarray:
    """Unit-variance Gaussian random field with correlation length ``corr_mm`` on a box.

    Why separable: a sum of Gaussian bumps on a coarse lattice is three small matrix
    products, far cheaper than filtering a full-size volume, and exact at any resolution.
    Contracted in float64 so thread-dependent BLAS rounding cannot flip float32 results.
    """
    mats = []
    step = corr_mm / 2.0
    for c in coords:
        c = np.ravel(c).astype(np.float64)
        lo = (c.min() if c.size else 0.0) - 2.5 * corr_mm
        hi = (c.max() if c.size else 0.0) + 2.5 * corr_mm
        nodes = np.arange(lo, hi + step, step)
        w = np.exp(-0.5 * ((c[:, None] - nodes[None, :]) / corr_mm) ** 2)
        w /= np.sqrt((w ** 2).sum(axis=1, keepdims=True))
        mats.append(w)
    f = rng.standard_normal(tuple(m.shape[1] for m in mats))
    f = np.tensordot(mats[0], f, axes=(1, 0))  # (x, Y, Z)
    f = np.tensordot(f, mats[1], axes=(1, 1))  # (x, Z, y)
    f = np.tensordot(f, mats[2], axes=(1, 1))  # (x, y, z)
    return f.astype(np.float32)


def _fine_texture(rng: np.random.Generator, shape: tuple[int, ...], sigma_vox: Sequence[float]) -> np.ndarray:
    """Unit-std mottled texture at the scale of a few voxels (filtered white noise)."""
    t = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma_vox, mode="reflect")
    sd = float(t.std())
    return t / sd if sd > 0 else t


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


# --------------------------------------------------------------------------------------
# Geometry and tissue values
# --------------------------------------------------------------------------------------


def check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    """The shape as ints, or ValueError: below the minimum there is no room for a liver."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape[:2]) < MIN_SIZE or shape[2] < MIN_SLICES:
        raise ValueError(f"phantom shape must be (x >= {MIN_SIZE}, y >= {MIN_SIZE}, z >= {MIN_SLICES}), got {shape}")
    return shape


def _make_grid(rng: np.random.Generator, shape: Sequence[int], spacing: Optional[Sequence[float]]) -> _Grid:
    """Spacing from a ~350 mm field of view and 2-3 mm slices unless given explicitly."""
    shape = check_shape(shape)
    if spacing is None:
        pixel = rng.uniform(*FOV_MM) / max(shape[0], shape[1])
        spacing = (pixel, pixel, rng.uniform(*SLICE_MM))
    # Round through float32 so the header zooms read back exactly as recorded.
    spacing = tuple(float(np.float32(round(float(s), 4))) for s in spacing)
    axes = tuple(((np.arange(n) - (n - 1) / 2.0) * s).astype(np.float32) for n, s in zip(shape, spacing))
    return _Grid(shape, spacing, axes)


def nifti_affine(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """RAS affine of an LPS-ordered array, with the world origin at the volume centre."""
    sx, sy, sz = spacing
    affine = np.diag([-sx, -sy, sz, 1.0])
    affine[:3, 3] = [sx * (shape[0] - 1) / 2.0, sy * (shape[1] - 1) / 2.0, -sz * (shape[2] - 1) / 2.0]
    return affine


def _sample_hu(rng: np.random.Generator, phase: str) -> dict[str, float]:
    """Tissue HU for one scan; enhancing tissues depend on the contrast phase."""
    u = rng.uniform
    t = {
        "skin": u(10, 30), "fat": u(-110, -90), "visceral_fat": u(-100, -80), "gas": AIR_HU,
        "lung": u(-870, -820), "cortical": u(500, 900), "cancellous": u(150, 250), "disc": u(70, 100),
        "csf": u(5, 20), "gallbladder": u(0, 20), "bowel_fluid": u(5, 20), "rib": u(300, 600),
    }
    if phase == "portal":
        liver = u(102, 128)
        t.update({
            "liver": liver, "muscle": u(50, 60), "aorta": u(150, 190), "ivc": u(110, 140),
            "portal_vein": liver + u(40, 70), "hepatic_vein": liver + u(25, 50), "spleen": liver + u(-5, 10),
            "kidney_cortex": u(150, 200), "kidney_medulla": u(100, 140), "bowel": u(50, 80),
            "heart": u(140, 180), "stomach_wall": u(70, 100),
        })
    else:
        liver = u(52, 68)
        blood = u(35, 45)
        t.update({
            "liver": liver, "muscle": u(40, 50), "aorta": blood, "ivc": blood, "portal_vein": blood,
            "hepatic_vein": blood, "spleen": liver - u(5, 12), "kidney_cortex": u(28, 36),
            "kidney_medulla": u(25, 33), "bowel": u(20, 35), "heart": blood, "stomach_wall": u(35, 45),
        })
    return t


def _ellipse_rho(x: np.ndarray, y: np.ndarray, a: float, b: float, p_post: float = 2.0) -> np.ndarray:
    """Homogeneous (degree-1) superellipse norm: <= 1 inside; posterior half flatter."""
    p = np.where(y > 0, p_post, 2.0)
    return (np.abs(x / a) ** p + np.abs(y / b) ** p) ** (1.0 / p)


def _angular_wobble(rng: np.random.Generator, theta: np.ndarray, amplitude: float) -> np.ndarray:
    """Low-order Fourier wobble of an outline, so no two bodies are perfect ellipses."""
    w = np.ones_like(theta)
    for m in range(2, 6):
        w += rng.uniform(0, amplitude) / m * np.cos(m * theta + rng.uniform(0, 2 * np.pi))
    return w


# --------------------------------------------------------------------------------------
# Trunk: skin, fat, muscle wall, ribs, spine, big vessels, cavity contents
# --------------------------------------------------------------------------------------


def _render_body(rng: np.random.Generator, grid: _Grid, img: np.ndarray, hu: dict) -> _Body:
    """Body outline with skin, fat and muscle layers; returns the abdominal cavity."""
    half_fov = min(grid.axes[0][-1], grid.axes[1][-1])
    # Fit the body into the field of view, but never shrink it below a small adult: an
    # explicitly tiny field of view then crops the body, as a real scan would.
    a = min(rng.uniform(140, 168), max(0.93 * half_fov, 125.0))
    b = min(rng.uniform(95, 125), max(0.8 * half_fov, 90.0))
    cy = -rng.uniform(0, 0.1) * half_fov  # patients usually lie a little anterior of the centre
    fat_lat, fat_ant, fat_post = rng.uniform(10, 35), rng.uniform(12, 40), rng.uniform(8, 20)
    muscle = rng.uniform(8, 14)
    x = grid.axes[0][:, None]
    y = grid.axes[1][None, :] - cy
    theta = np.arctan2(y, x)
    rho_body = _ellipse_rho(x, y, a, b, 2.6) / _angular_wobble(rng, theta, 0.08)
    fy = y - (fat_ant - fat_post) / 2.0
    af, bf = a - fat_lat, b - (fat_ant + fat_post) / 2.0
    rho_fat = _ellipse_rho(x, fy, af, bf, 2.4) / _angular_wobble(rng, theta, 0.06)
    rho_cav = _ellipse_rho(x, fy, af - muscle, bf - muscle, 2.2)
    z = grid.axes[2]
    scale = 1.0 + 0.04 * np.sin(2 * np.pi * z / rng.uniform(250, 400) + rng.uniform(0, 2 * np.pi))
    scale = scale[None, None, :].astype(np.float32)
    r_body, r_fat, r_cav = (r.astype(np.float32)[:, :, None] for r in (rho_body, rho_fat, rho_cav))
    skin_frac = 1.0 - 2.0 / b
    np.copyto(img, hu["skin"], where=r_body <= scale)
    np.copyto(img, hu["fat"], where=r_body <= scale * skin_frac)
    wall = r_fat <= scale
    np.copyto(img, hu["muscle"], where=wall)
    cavity = r_cav <= scale
    rib_band = wall & (r_fat > scale * (1.0 - rng.uniform(7, 10) / min(af, bf))) & ~cavity
    _render_ribs(rng, grid, img, hu, rib_band, cy)
    y_vert = cy + bf + (fat_ant - fat_post) / 2.0 - rng.uniform(40, 50)
    body = _Body(cy=cy, a_c=af - muscle, b_c=bf - muscle, y_vert=y_vert, vert_ry=rng.uniform(14, 18), cavity=cavity)
    retro = _render_spine(rng, grid, img, hu, body)
    body.cavity = cavity & ~retro[:, :, None]
    return body


def _render_ribs(rng: np.random.Generator, grid: _Grid, img: np.ndarray, hu: dict, band: np.ndarray, cy: float) -> None:
    """Oblique rib cross-sections in the muscle wall: bright bone right next to the liver edge."""
    period, width, slope = rng.uniform(28, 36), rng.uniform(0.3, 0.4), rng.uniform(0.4, 0.6)
    z_low = grid.axes[2][0] + rng.uniform(0.2, 0.45) * (grid.axes[2][-1] - grid.axes[2][0])
    x = grid.axes[0][:, None, None]
    y = grid.axes[1][None, :, None] - cy
    z = grid.axes[2][None, None, :]
    alpha = np.abs(np.arctan2(x, y))  # 0 at the back, pi at the front
    arc = alpha * 120.0
    phase = ((z + slope * arc) / period) % 1.0
    ribs = band & (phase < width) & (alpha < 0.8 * np.pi) & (z > z_low - slope * arc)
    np.copyto(img, hu["rib"], where=ribs)


def _render_spine(rng: np.random.Generator, grid: _Grid, img: np.ndarray, hu: dict, body: _Body) -> np.ndarray:
    """Vertebrae with discs, canal and back muscles; returns the 2D region organs must avoid."""
    x = grid.axes[0][:, None]
    y = grid.axes[1][None, :]
    z = grid.axes[2]
    rx, ry, yv = rng.uniform(18, 23), body.vert_ry, body.y_vert
    vert = ((x / rx) ** 2 + ((y - yv) / ry) ** 2) <= 1.0
    core = ((x / (rx - 2.5)) ** 2 + ((y - yv) / (ry - 2.5)) ** 2) <= 1.0
    yc = yv + ry + 9.0
    canal = (x ** 2 + (y - yc) ** 2) <= 7.5 ** 2
    arch = ((x ** 2 + (y - yc) ** 2) <= 12.0 ** 2) & ~canal
    spinous = (np.abs(x) <= 4.0) & (y > yc) & (y < yc + rng.uniform(30, 40))
    back = ((((np.abs(x) - 28.0) / 22.0) ** 2 + ((y - yc - 15.0) / 20.0) ** 2) <= 1.0)
    disc_z = ((z - rng.uniform(0, 40)) % rng.uniform(30, 36)) < rng.uniform(6, 9)
    for mask2d, value in ((back, hu["muscle"]), (arch | spinous, hu["cortical"] * 0.8), (canal, hu["csf"])):
        np.copyto(img, value, where=mask2d[:, :, None])
    vert3 = np.broadcast_to(vert[:, :, None], img.shape)
    core3 = core[:, :, None] & ~disc_z[None, None, :]
    np.copyto(img, hu["cortical"], where=vert3)
    np.copyto(img, hu["cancellous"], where=core3)
    np.copyto(img, hu["disc"], where=vert[:, :, None] & disc_z[None, None, :])
    crura = ((x / (rx + 22.0)) ** 2 + ((y - yv - 8.0) / (ry + 14.0)) ** 2) <= 1.0
    np.copyto(img, hu["muscle"], where=(crura & ~vert)[:, :, None])
    return vert | arch | spinous | back | canal | crura


def _fill_cavity(rng: np.random.Generator, grid: _Grid, img: np.ndarray, hu: dict, body: _Body) -> None:
    """Visceral fat, bowel loops, fluid and gas pockets: the clutter around the liver."""
    idx = np.nonzero(body.cavity.any(axis=2))
    if idx[0].size == 0:
        return
    box = (slice(idx[0].min(), idx[0].max() + 1), slice(idx[1].min(), idx[1].max() + 1), slice(None))
    coords = [grid.axes[0][box[0]], grid.axes[1][box[1]], grid.axes[2]]
    loops = _smooth_field(rng, coords, rng.uniform(9, 14))
    gas = _smooth_field(rng, coords, rng.uniform(5, 8))
    cav = body.cavity[box]
    sub = img[box]
    np.copyto(sub, hu["visceral_fat"], where=cav)
    bowel = cav & (loops > -0.1)
    np.copyto(sub, hu["bowel"], where=bowel)
    np.copyto(sub, hu["bowel_fluid"], where=bowel & (loops > 0.9))
    np.copyto(sub, hu["gas"], where=bowel & (gas > 1.9))


def _render_vessels_big(rng: np.random.Generator, grid: _Grid, img: np.ndarray, hu: dict, body: _Body,
                        occupied: np.ndarray) -> tuple[float, float]:
    """Aorta and inferior vena cava (the IVC sits in a groove of the liver); returns IVC centre."""
    x = grid.axes[0][:, None]
    y = grid.axes[1][None, :]
    front = body.y_vert - body.vert_ry
    ax, ay, ar = rng.uniform(12, 20), front - rng.uniform(11, 15), rng.uniform(9, 12)
    ix, iy = -rng.uniform(22, 30), front - rng.uniform(14, 20)
    aorta = (x - ax) ** 2 + (y - ay) ** 2 <= ar ** 2
    ivc = ((x - ix) / rng.uniform(11, 15)) ** 2 + ((y - iy) / rng.uniform(8, 11)) ** 2 <= 1.0
    for mask2d, value in ((aorta, hu["aorta"]), (ivc, hu["ivc"])):
        m = mask2d[:, :, None] & body.cavity
        np.copyto(img, value, where=m)
        occupied |= m
    return float(ix), float(iy)


def _ellipsoid(grid: _Grid, center: Sequence[float], semi: Sequence[float], rng: Optional[np.random.Generator] = None,
               wobble: float = 0.0, corr_mm: float = 30.0) -> tuple[tuple[slice, ...], np.ndarray, np.ndarray]:
    """Box, mask and normalised radius of an ellipsoid, optionally deformed by a smooth field."""
    grow = 1.0 + 3.0 * wobble
    box, (x, y, z) = grid.box(center, [s * grow for s in semi])
    rho = np.sqrt(((x - center[0]) / semi[0]) ** 2 + ((y - center[1]) / semi[1]) ** 2
                  + ((z - center[2]) / semi[2]) ** 2)
    if wobble > 0 and rng is not None:
        rho = rho - wobble * _smooth_field(rng, (x, y, z), corr_mm)
    return box, rho <= 1.0, rho


def _render_organs(rng: np.random.Generator, grid: _Grid, img: np.ndarray, hu: dict, body: _Body,
                   liver_c: np.ndarray, liver_s: np.ndarray, allowed: np.ndarray, occupied: np.ndarray) -> None:
    """Spleen, stomach and kidneys: liver-like or tumor-like tissue that is *not* labelled."""
    a_c, b_c = body.a_c, body.b_c
    zc, sz = liver_c[2], liver_s[2]
    spleen_c = (0.6 * a_c, body.cy + 0.3 * b_c, zc + 0.25 * sz)
    box, m, _ = _ellipsoid(grid, spleen_c, (0.2 * a_c, 0.38 * b_c, 0.55 * sz), rng, 0.08)
    np.copyto(img[box], hu["spleen"], where=m & allowed[box])
    stom_c = (0.3 * a_c, body.cy - 0.3 * b_c, zc + 0.3 * sz)
    stom_s = (0.22 * a_c, 0.3 * b_c, 0.45 * sz)
    box, m, rho = _ellipsoid(grid, stom_c, stom_s, rng, 0.06)
    m &= allowed[box]
    sub = img[box]
    np.copyto(sub, hu["stomach_wall"], where=m)
    y = grid.axes[1][box[1]][None, :, None]
    inner = m & (rho < 0.85)
    np.copyto(sub, hu["bowel_fluid"], where=inner)
    np.copyto(sub, hu["gas"], where=inner & (y < stom_c[1] - rng.uniform(0.0, 0.4) * stom_s[1]))
    z_kid = zc - sz * rng.uniform(0.6, 0.95)
    for side, dz in ((-1, 0.0), (1, rng.uniform(8, 20))):
        c = (side * rng.uniform(55, 70), body.y_vert - rng.uniform(0, 10), z_kid + dz)
        box, m, rho = _ellipsoid(grid, c, (rng.uniform(24, 30), rng.uniform(20, 25), rng.uniform(45, 55)), rng, 0.04)
        m &= body.cavity[box]
        sub = img[box]
        np.copyto(sub, hu["kidney_cortex"], where=m)
        np.copyto(sub, hu["kidney_medulla"], where=m & (rho < 0.7))
        x = grid.axes[0][box[0]][:, None, None]
        np.copyto(sub, -60.0, where=m & (rho < 0.45) & (side * (x - c[0]) < 0))  # renal sinus fat
        occupied[box] |= m


# --------------------------------------------------------------------------------------
# Liver, vessels, gallbladder
# --------------------------------------------------------------------------------------


def _liver_geometry(rng: np.random.Generator, grid: _Grid, body: _Body) -> tuple[np.ndarray, np.ndarray, float]:
    """Right-lobe centre and semi-axes; z chosen so the top and bottom slices stay liver-free."""
    z = grid.axes[2]
    z_lo, z_hi = z[0] + FREE_END_SLICES * grid.spacing[2], z[-1] - FREE_END_SLICES * grid.spacing[2]
    cap = 1.15
    coverage = z[-1] - z[0] + grid.spacing[2]
    sz = min(rng.uniform(0.27, 0.36) * coverage, 0.98 * (z_hi - z_lo) / (2 * cap))
    zc = rng.uniform(z_lo + cap * sz, max(z_lo + cap * sz, z_hi - cap * sz))
    a_c, b_c = body.a_c, body.b_c
    center = np.array([-rng.uniform(0.4, 0.5) * a_c, body.cy - rng.uniform(0.0, 0.12) * b_c, zc])
    semi = np.array([rng.uniform(0.5, 0.62) * a_c, rng.uniform(0.78, 0.95) * b_c, sz])
    return center, semi, cap


def _render_liver(rng: np.random.Generator, grid: _Grid, body: _Body, geometry: tuple[np.ndarray, np.ndarray, float],
                  dome: np.ndarray, blocked: np.ndarray) -> _Liver:
    """Irregular liver: right + left lobe ellipsoids, soft-unioned and deformed by smooth noise."""
    center, semi, cap = geometry
    a_c, b_c = body.a_c, body.b_c
    left_c = np.array([rng.uniform(0.05, 0.25) * a_c, body.cy - rng.uniform(0.45, 0.6) * b_c,
                       center[2] + rng.uniform(0.1, 0.35) * semi[2]])
    left_s = np.array([rng.uniform(0.35, 0.5) * a_c, rng.uniform(0.22, 0.32) * b_c, rng.uniform(0.45, 0.6) * semi[2]])
    lo = np.minimum(center - 1.3 * semi, left_c - 1.3 * left_s)  # room for the deformation
    hi = np.maximum(center + 1.3 * semi, left_c + 1.3 * left_s)
    lo[2], hi[2] = center[2] - cap * semi[2], center[2] + cap * semi[2]
    mid, half = (lo + hi) / 2.0, (hi - lo) / 2.0
    box, (x, y, z) = grid.box(mid, half)
    r_right = np.sqrt(((x - center[0]) / semi[0]) ** 2 + ((y - center[1]) / semi[1]) ** 2 + ((z - center[2]) / semi[2]) ** 2)
    r_left = np.sqrt(((x - left_c[0]) / left_s[0]) ** 2 + ((y - left_c[1]) / left_s[1]) ** 2 + ((z - left_c[2]) / left_s[2]) ** 2)
    k = 0.12
    rho = -k * np.logaddexp(-r_right / k, -r_left / k)
    rho -= rng.uniform(0.06, 0.1) * _smooth_field(rng, (x, y, z), rng.uniform(35, 50))
    rho -= rng.uniform(0.02, 0.035) * _smooth_field(rng, (x, y, z), rng.uniform(12, 18))
    below_dome = z < dome[box[0], box[1], None] - 4.0
    mask = (rho <= 1.0) & body.cavity[box] & below_dome & ~blocked[box]
    return _Liver(center=center, semi=semi, box=box, mask=_largest_component(mask))


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep one connected liver: clipping by organs can leave crumbs the label must not have."""
    lab, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


def _dome(rng: np.random.Generator, grid: _Grid, body: _Body, liver_c: np.ndarray, top: float) -> np.ndarray:
    """Diaphragm height z(x, y): highest over the liver, lower laterally and at the back (lung recesses)."""
    x = (grid.axes[0][:, None] - 0.5 * liver_c[0]) / body.a_c
    y = (grid.axes[1][None, :] - liver_c[1]) / body.b_c
    drop = (rng.uniform(15, 30) * x ** 2 + rng.uniform(10, 20) * y ** 2 + rng.uniform(10, 20) * np.clip(y, 0, None)
            + rng.uniform(5, 15) * np.clip(x, 0, None))  # left hemidiaphragm a little lower
    return (top - drop).astype(np.float32)


def _render_thorax(rng: np.random.Generator, grid: _Grid, img: np.ndarray, hu: dict, body: _Body,
                   dome: np.ndarray) -> np.ndarray:
    """Lung bases with vessels, heart and diaphragm above the dome; returns the region below."""
    z = grid.axes[2][None, None, :]
    above = body.cavity & (z > dome[:, :, None])
    np.copyto(img, hu["muscle"], where=body.cavity & (z > dome[:, :, None] - 4.0))
    np.copyto(img, hu["lung"], where=above)
    idx = np.nonzero(above)
    if idx[0].size:
        box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in idx)
        # Where two random surfaces cross lies a curve: a cheap web of lung vessels.
        sigma = [rng.uniform(3, 5) / s for s in grid.spacing]
        tube_a, tube_b = (_fine_texture(rng, above[box].shape, sigma) for _ in range(2))
        np.copyto(img[box], hu["muscle"], where=above[box] & (np.abs(tube_a) < 0.15) & (np.abs(tube_b) < 0.15))
    x = grid.axes[0][:, None]
    y = grid.axes[1][None, :] - body.cy
    heart = (((x - 0.15 * body.a_c) / (0.42 * body.a_c)) ** 2 + ((y + 0.25 * body.b_c) / (0.5 * body.b_c)) ** 2) <= 1.0
    np.copyto(img, hu["heart"], where=above & heart[:, :, None])
    return body.cavity & (z < dome[:, :, None] - 4.0)


def _vessel_tree(rng: np.random.Generator, root: np.ndarray, direction: np.ndarray, radius: float,
                 inside: Callable[[np.ndarray], bool], targets: np.ndarray,
                 max_depth: int) -> list[tuple[np.ndarray, np.ndarray, float, float]]:
    """Binary branching tubes (p, q, r0, r1), thick at the root and thinning to sub-voxel.

    Each branch bends toward a random point of the liver, so the tree fills the organ the
    way real portal and hepatic veins do instead of leaving it after a few branchings.
    """
    segments = []
    stack = [(root, direction / np.linalg.norm(direction), radius, 0)]
    while stack:
        p, d, r, depth = stack.pop()
        length = float(np.clip(r * rng.uniform(5, 9) + 4.0, 8, 45))
        q = p + d * length
        r1 = r * rng.uniform(0.88, 0.96)
        segments.append((p, q, r, r1))
        if depth >= max_depth or r1 < 0.7 or not inside(q):
            continue
        axis = np.cross(d, rng.standard_normal(3))
        axis /= np.linalg.norm(axis) + 1e-9
        for sign in (1, -1):
            angle = sign * np.radians(rng.uniform(20, 45))
            nd = d * np.cos(angle) + np.cross(axis, d) * np.sin(angle)
            to_target = targets[int(rng.integers(len(targets)))] - q
            nd = nd + 0.8 * to_target / (np.linalg.norm(to_target) + 1e-6)
            stack.append((q, nd / np.linalg.norm(nd), r1 * rng.uniform(0.76, 0.88), depth + 1))
    return segments


def _rasterize_segments(grid: _Grid, segments: list, box: tuple[slice, ...], out: np.ndarray) -> None:
    """OR tapered capsules into ``out`` (a bool array over ``box``), each in its own small box."""
    offset = [s.start for s in box]
    for p, q, r0, r1 in segments:
        lo, hi = np.minimum(p, q) - r0 - 1.0, np.maximum(p, q) + r0 + 1.0
        sub, (x, y, z) = grid.box((lo + hi) / 2, (hi - lo) / 2)
        sub = tuple(slice(max(s.start, b.start), min(s.stop, b.stop)) for s, b in zip(sub, box))
        if any(s.stop <= s.start for s in sub):
            continue
        x, y, z = (grid.axes[d][sub[d]].reshape([-1 if i == d else 1 for i in range(3)]) for d in range(3))
        u = q - p
        dx, dy, dz = x - p[0], y - p[1], z - p[2]
        t = np.clip((dx * u[0] + dy * u[1] + dz * u[2]) / float(u @ u), 0.0, 1.0)
        d2 = (dx - t * u[0]) ** 2 + (dy - t * u[1]) ** 2 + (dz - t * u[2]) ** 2
        local = tuple(slice(s.start - o, s.stop - o) for s, o in zip(sub, offset))
        out[local] |= d2 <= (r0 + (r1 - r0) * t) ** 2


def _liver_vessels(rng: np.random.Generator, grid: _Grid, liver: _Liver, ivc_xy: tuple[float, float],
                   top: float) -> tuple[np.ndarray, np.ndarray]:
    """Portal tree from the hilum and three hepatic veins toward the IVC, clipped to the liver."""
    axes = [grid.axes[d][liver.box[d]] for d in range(3)]

    def inside(point: np.ndarray) -> bool:
        i = [int(np.searchsorted(axes[d], point[d])) for d in range(3)]
        return all(0 <= i[d] < liver.mask.shape[d] for d in range(3)) and bool(liver.mask[tuple(i)])

    flat = np.flatnonzero(liver.mask)
    pick = np.unravel_index(flat[rng.integers(flat.size, size=256)], liver.mask.shape)
    targets = np.stack([axes[d][pick[d]] for d in range(3)], axis=1).astype(np.float64)
    c, s = liver.center, liver.semi
    hilum = c + np.array([0.55 * s[0], -0.05 * s[1], -0.2 * s[2]])
    portal = _vessel_tree(rng, hilum, np.array([-1.0, rng.uniform(-0.3, 0.3), rng.uniform(0.0, 0.4)]),
                          rng.uniform(6, 8), inside, targets, 7)
    confluence = np.array([ivc_xy[0], ivc_xy[1], top - rng.uniform(10, 20)])
    hepatic = []
    for dx in (-1.0, 0.0, 1.0):
        direction = np.array([dx, -rng.uniform(0.6, 1.0), -rng.uniform(0.3, 0.7)])
        hepatic += _vessel_tree(rng, confluence, direction, rng.uniform(4.5, 6), inside, targets, 6)
    portal_mask = np.zeros(liver.mask.shape, bool)
    hepatic_mask = np.zeros(liver.mask.shape, bool)
    _rasterize_segments(grid, portal, liver.box, portal_mask)
    _rasterize_segments(grid, hepatic, liver.box, hepatic_mask)
    return portal_mask & liver.mask, hepatic_mask & liver.mask & ~portal_mask


def _gallbladder(rng: np.random.Generator, grid: _Grid, liver_c: np.ndarray, liver_s: np.ndarray,
                 img: np.ndarray, hu: dict, allowed: np.ndarray, occupied: np.ndarray) -> None:
    """Fluid-dense pear under the liver: the classic hypodense look-alike (absent in ~20%)."""
    if rng.random() < 0.2:
        return
    c = liver_c + np.array([0.55 * liver_s[0], -0.55 * liver_s[1], -0.55 * liver_s[2]])
    semi = (rng.uniform(12, 17), rng.uniform(12, 17), rng.uniform(25, 40))
    box, m, _ = _ellipsoid(grid, c, semi, rng, 0.05)
    m &= allowed[box]
    np.copyto(img[box], hu["gallbladder"], where=m)
    occupied[box] |= m


# --------------------------------------------------------------------------------------
# Tumors
# --------------------------------------------------------------------------------------


def _tumor_shape(rng: np.random.Generator, radius: float) -> dict:
    """Random irregularity of one tumor: rotation, mild anisotropy and a few lobulations."""
    aniso = np.exp(rng.uniform(-0.15, 0.15, 3))
    aniso /= np.prod(aniso) ** (1 / 3)
    lobes = rng.standard_normal((3, 3))
    lobes /= np.linalg.norm(lobes, axis=1, keepdims=True)
    scale = 0.05 if radius < 3 else 0.1
    return {"rot": _random_rotation(rng), "aniso": aniso, "lobes": lobes,
            "amp": rng.uniform(0, scale, 3), "freq": rng.uniform(1, 3, 3), "phase": rng.uniform(0, 2 * np.pi, 3)}


def _tumor_rho(shape: dict, radius: float, dx: np.ndarray, dy: np.ndarray, dz: np.ndarray) -> np.ndarray:
    """Normalised radius (<= 1 inside) of an irregular tumor at offsets from its centre (mm)."""
    rot, an = shape["rot"], shape["aniso"]
    u = [(rot[i, 0] * dx + rot[i, 1] * dy + rot[i, 2] * dz) / an[i] for i in range(3)]
    q = np.sqrt(u[0] ** 2 + u[1] ** 2 + u[2] ** 2)
    dist = np.sqrt(dx * dx + dy * dy + dz * dz) + 1e-6
    deform = np.ones_like(q)
    for v, amp, fr, ph in zip(shape["lobes"], shape["amp"], shape["freq"], shape["phase"]):
        deform += amp * np.cos(fr * np.pi * (dx * v[0] + dy * v[1] + dz * v[2]) / dist + ph)
    return q / (radius * deform)


def _depth_map(mask: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Distance (mm) from each liver voxel to the outside: places tumors deep or at the edge."""
    padded = np.pad(mask, 1)
    return ndimage.distance_transform_edt(padded, sampling=spacing)[1:-1, 1:-1, 1:-1].astype(np.float32)


def _choose_center(rng: np.random.Generator, mode: str, radius: float, depth: np.ndarray, flat_idx: np.ndarray,
                   placed: list[tuple[np.ndarray, float]], spacing: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Voxel index (in the liver box) of a new tumor centre, for one placement mode."""
    if mode == "adjacent" and placed:
        for _ in range(30):
            c0, r0 = placed[int(rng.integers(len(placed)))]
            v = rng.standard_normal(3)
            target = c0 + v / np.linalg.norm(v) * (r0 + radius) * rng.uniform(0.85, 1.0) / spacing
            idx = np.rint(target).astype(int)
            if np.all(idx >= 0) and np.all(idx < shape) and depth[tuple(idx)] > 0:
                return idx
        mode = "deep"
    d = depth.ravel()[flat_idx]
    if mode == "edge":
        pick = flat_idx[(d >= 0.3 * radius) & (d <= 0.95 * radius)]
        if pick.size == 0:
            pick = flat_idx[d <= d.min() + 1e-3]
    else:
        pick = flat_idx[d >= radius]
        if pick.size == 0:
            pick = flat_idx[d >= 0.8 * d.max()]
    return _apart(rng, pick, radius, placed, spacing, shape)


def _apart(rng: np.random.Generator, pick: np.ndarray, radius: float, placed: list[tuple[np.ndarray, float]],
           spacing: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A candidate that does not overlap earlier tumors (only "adjacent" ones may touch)."""
    idx = np.zeros(3, int)
    for _ in range(40):
        idx = np.array(np.unravel_index(int(pick[rng.integers(pick.size)]), shape))
        if all(np.linalg.norm((idx - c) * spacing) >= 1.1 * (r + radius) for c, r in placed):
            break
    return idx


def _place_tumors(rng: np.random.Generator, grid: _Grid, liver: _Liver, specs: list[dict]) -> list[dict]:
    """Centres for the tumors: ~40% deep, ~30% touching the liver edge, ~30% touching another."""
    if not specs:
        return []
    depth = _depth_map(liver.mask, grid.spacing)
    flat_idx = np.flatnonzero(liver.mask)
    spacing = np.asarray(grid.spacing)
    placed: list[tuple[np.ndarray, float]] = []
    out = []
    for i, spec in enumerate(specs):
        u = rng.random()
        mode = ("deep" if u < 0.65 else "edge") if i == 0 else ("deep" if u < 0.4 else "edge" if u < 0.7 else "adjacent")
        radius = spec["diameter_mm"] / 2.0
        idx = _choose_center(rng, mode, radius, depth, flat_idx, placed, spacing, liver.mask.shape)
        placed.append((idx.astype(float), radius))
        out.append({**spec, "placement": mode, "box_index": idx})
    return out


def _render_tumor(rng: np.random.Generator, grid: _Grid, liver: _Liver, img_box: np.ndarray,
                  tumor_label: np.ndarray, spec: dict, liver_hu: float) -> tuple[tuple[slice, ...], np.ndarray]:
    """Paint one tumor into the liver box: label at voxel centres, supersampled partial volume
    for small ones, soft or sharp margin, internal texture; clipped to the liver."""
    radius = spec["diameter_mm"] / 2.0
    shape = _tumor_shape(rng, radius)
    idx = spec["box_index"]
    axes = [grid.axes[d][liver.box[d]] for d in range(3)]
    center = np.array([axes[d][idx[d]] for d in range(3)], dtype=np.float64)
    half = radius * 1.45 + np.asarray(grid.spacing)
    lo = [int(np.searchsorted(axes[d], center[d] - half[d])) for d in range(3)]
    hi = [int(np.searchsorted(axes[d], center[d] + half[d], "right")) for d in range(3)]
    box = tuple(slice(lo[d], hi[d]) for d in range(3))
    dx, dy, dz = (axes[d][box[d]].reshape([-1 if i == d else 1 for i in range(3)]) - center[d] for d in range(3))
    rho = _tumor_rho(shape, radius, dx, dy, dz)
    liver_sub = liver.mask[box]
    inside = (rho <= 1.0) & liver_sub
    occ = _occupancy(shape, radius, dx, dy, dz, grid.spacing) if radius < 7.5 else (rho <= 1.0).astype(np.float32)
    occ = occ * liver_sub
    value = liver_hu + _tumor_profile(rng, spec, rho) + _tumor_texture(rng, spec, rho.shape, grid.spacing)
    sub = img_box[box]
    sub += occ * (value - sub)
    tumor_label[box] |= inside
    return box, inside


def _occupancy(shape: dict, radius: float, dx, dy, dz, spacing: Sequence[float]) -> np.ndarray:
    """Fraction of each voxel inside the tumor (3x3x3 samples): true partial volume for small ones."""
    occ = np.zeros(np.broadcast_shapes(dx.shape, dy.shape, dz.shape), np.float32)
    offs = (-1 / 3, 0.0, 1 / 3)
    for ox in offs:
        for oy in offs:
            for oz in offs:
                occ += _tumor_rho(shape, radius, dx + ox * spacing[0], dy + oy * spacing[1], dz + oz * spacing[2]) <= 1.0
    return occ / 27.0


def _tumor_profile(rng: np.random.Generator, spec: dict, rho: np.ndarray) -> np.ndarray:
    """Contrast to liver by normalised radius: uniform body with soft or sharp margin, or rim."""
    c = spec["contrast_hu"]
    if spec["kind"] == "rim":
        rim_width = rng.uniform(0.2, 0.35)
        return np.where(rho >= 1.0 - rim_width, spec["rim_hu"], c).astype(np.float32)
    margin = rng.uniform(0.02, 0.25)
    return (c * np.clip((1.0 - rho) / margin, 0.0, 1.0)).astype(np.float32)


def _tumor_texture(rng: np.random.Generator, spec: dict, shape: tuple[int, ...], spacing: Sequence[float]) -> np.ndarray:
    """Heterogeneous interior, proportional to the contrast (necrosis, mottling)."""
    sd = rng.uniform(0.1, 0.25) * abs(spec["contrast_hu"])
    return sd * _fine_texture(rng, shape, [2.0 / s for s in spacing])


# --------------------------------------------------------------------------------------
# The phantom
# --------------------------------------------------------------------------------------


def make_phantom(seed: int, shape: Sequence[int] = DEFAULT_SHAPE, spacing: Optional[Sequence[float]] = None,
                 max_tumors: int = MAX_TUMORS) -> Phantom:
    """One synthetic abdominal CT volume and its 0/1/2 label, fully determined by ``seed``."""
    rng = make_rng(seed)
    grid = _make_grid(rng, shape, spacing)
    phase = "portal" if rng.random() < PORTAL_SHARE else "unenhanced"
    hu = _sample_hu(rng, phase)
    img = np.full(grid.shape, AIR_HU, np.float32)
    body = _render_body(rng, grid, img, hu)
    _fill_cavity(rng, grid, img, hu, body)
    geometry = _liver_geometry(rng, grid, body)
    center, semi, _ = geometry
    dome = _dome(rng, grid, body, center, center[2] + semi[2] * rng.uniform(0.95, 1.1))
    allowed = _render_thorax(rng, grid, img, hu, body, dome)
    occupied = np.zeros(grid.shape, bool)
    ivc_xy = _render_vessels_big(rng, grid, img, hu, body, occupied)
    _render_organs(rng, grid, img, hu, body, center, semi, allowed, occupied)
    _gallbladder(rng, grid, center, semi, img, hu, allowed, occupied)
    liver = _render_liver(rng, grid, body, geometry, dome, occupied | ~allowed)

    label = np.zeros(grid.shape, np.uint8)
    tumors = _paint_liver(rng, grid, liver, img, label, hu, ivc_xy, max_tumors)
    blur = (rng.uniform(*BLUR_XY_VOX),) * 2 + (rng.uniform(*BLUR_Z_VOX),)
    noise_sd = rng.uniform(*NOISE_SD_HU)
    out = _acquire(rng, img, blur, noise_sd)
    affine = nifti_affine(grid.shape, grid.spacing)
    _finish_tumor_records(tumors, affine)
    return Phantom(hu=out, label=label, spacing=grid.spacing, affine=affine, tumors=tumors, phase=phase,
                   seed=int(seed), liver_hu=float(hu["liver"]), noise_sd=float(noise_sd),
                   blur_sigma_vox=tuple(float(b) for b in blur))


def _paint_liver(rng: np.random.Generator, grid: _Grid, liver: _Liver, img: np.ndarray, label: np.ndarray,
                 hu: dict, ivc_xy: tuple[float, float], max_tumors: int) -> list[dict]:
    """Parenchyma with texture, vessels, then tumors; fills the label (tumor 2 wins over liver 1)."""
    box, mask = liver.box, liver.mask
    top = float(grid.axes[2][box[2]][np.nonzero(mask.any(axis=(0, 1)))[0].max()]) if mask.any() else 0.0
    tex_sd = rng.uniform(*LIVER_TEXTURE_SD_HU)
    texture = tex_sd * _fine_texture(rng, mask.shape, [rng.uniform(1.5, 3.0) / s for s in grid.spacing])
    sub = img[box]
    np.copyto(sub, hu["liver"] + texture, where=mask)
    if not mask.any():  # degenerate geometry (tiny volumes): a scan without liver
        return []
    portal, hepatic = _liver_vessels(rng, grid, liver, ivc_xy, top)
    np.copyto(sub, hu["portal_vein"], where=portal)
    np.copyto(sub, hu["hepatic_vein"], where=hepatic)

    specs = sample_tumor_specs(rng, sample_tumor_count(rng, max_tumors))
    placed = _place_tumors(rng, grid, liver, specs)
    tumor = np.zeros(mask.shape, bool)
    regions = [_render_tumor(rng, grid, liver, sub, tumor, spec, hu["liver"]) for spec in placed]
    label_box = label[box]
    label_box[mask] = 1
    label_box[tumor & mask] = 2
    for spec, (tb, inside) in zip(placed, regions):
        idx = spec.pop("box_index")
        spec["center_voxel"] = [int(idx[d] + box[d].start) for d in range(3)]
        spec["n_voxels"] = int(inside.sum())
        spec["mean_contrast_hu"] = float(sub[tb][inside].mean() - hu["liver"]) if inside.any() else 0.0
    return placed


def _acquire(rng: np.random.Generator, img: np.ndarray, blur: Sequence[float], noise_sd: float) -> np.ndarray:
    """Scanner model: partial-volume blur, then slightly correlated noise, then int16 HU."""
    out = ndimage.gaussian_filter(img, blur, mode="nearest", truncate=3.0)
    noise = ndimage.gaussian_filter(rng.standard_normal(img.shape, dtype=np.float32), (0.6, 0.6, 0.0), truncate=3.0)
    noise *= noise_sd / float(noise.std())
    out += noise
    np.rint(out, out=out)
    np.clip(out, HU_MIN, HU_MAX, out=out)
    return out.astype(np.int16)


def _finish_tumor_records(tumors: list[dict], affine: np.ndarray) -> None:
    """World (RAS) centres and rounded numbers, for CSV and JSON."""
    for t in tumors:
        world = affine @ np.array([*t["center_voxel"], 1.0])
        t["center_mm"] = [round(float(v), 2) for v in world[:3]]
        for key in ("diameter_mm", "contrast_hu", "rim_hu", "mean_contrast_hu"):
            t[key] = round(float(t[key]), 2)


# --------------------------------------------------------------------------------------
# Writing an MSD-style dataset
# --------------------------------------------------------------------------------------

VOLUME_SEED_STRIDE = 100003  # volume i of a set seeded s uses s * stride + i: independent of --num
META_DIR = "meta"
CSV_NAME = "phantoms.csv"
CSV_FIELDS = ("volume", "index", "kind", "diameter_mm", "contrast_hu", "rim_hu", "mean_contrast_hu", "placement",
              "n_voxels", "center_x_mm", "center_y_mm", "center_z_mm", "center_i", "center_j", "center_k", "phase")


def volume_seed(seed: int, index: int) -> int:
    return int(seed) * VOLUME_SEED_STRIDE + int(index)


def _case_paths(out_dir: str, index: int) -> dict[str, str]:
    name = f"liver_{index}"
    return {
        "name": name,
        "image": os.path.join(out_dir, "imagesTr", f"{name}.nii.gz"),
        "label": os.path.join(out_dir, "labelsTr", f"{name}.nii.gz"),
        "meta": os.path.join(out_dir, META_DIR, f"{name}.json"),
    }


def _atomic_write(path: str, data: bytes) -> None:
    """Write to a temporary name in the same folder, then rename: a killed run never leaves a
    half-written file under the final name (and ``*.part`` never matches ``*.nii.gz``)."""
    tmp = f"{path}.{os.getpid()}.part"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _nifti_bytes(data: np.ndarray, affine: np.ndarray, spacing: Sequence[float]) -> bytes:
    """Gzipped NIfTI-1 with the spacing in the header; mtime=0 keeps files byte-identical per seed."""
    import nibabel as nib  # local: keeps `import liver_d2.data.phantoms` light for workers

    img = nib.Nifti1Image(data, affine)
    img.header.set_data_dtype(data.dtype)
    img.header.set_zooms(tuple(float(s) for s in spacing))
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)


def _write_case(out_dir: str, index: int, seed: int, shape: tuple[int, int, int]) -> dict:
    """Generate and write one volume (image, label, meta); returns its meta."""
    paths = _case_paths(out_dir, index)
    for key in ("image", "label", "meta"):  # leftovers of a killed run
        for stale in glob.glob(glob.escape(paths[key]) + ".*.part"):
            os.remove(stale)
    phantom = make_phantom(volume_seed(seed, index), shape)
    _atomic_write(paths["image"], _nifti_bytes(phantom.hu, phantom.affine, phantom.spacing))
    _atomic_write(paths["label"], _nifti_bytes(phantom.label, phantom.affine, phantom.spacing))
    meta = {"volume": paths["name"], **phantom.meta()}
    _atomic_write(paths["meta"], json.dumps(meta, indent=1).encode())  # last: marks the case complete
    return meta


def _case_done(out_dir: str, index: int) -> bool:
    return all(os.path.exists(p) for k, p in _case_paths(out_dir, index).items() if k != "name")


def write_phantom_dataset(out_dir: str, num: int, seed: int = 0, workers: int = 2,
                          shape: Sequence[int] = DEFAULT_SHAPE, verbose: bool = True) -> list[str]:
    """Write ``num`` phantoms in the MSD Task03 layout; returns the image paths.

    Layout: imagesTr/liver_{i}.nii.gz (int16 HU), labelsTr/liver_{i}.nii.gz (uint8 0/1/2),
    dataset.json, phantoms.csv (one row per tumor) and meta/liver_{i}.json. Resumable:
    finished volumes are skipped, so an interrupted run just continues.
    """
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    shape = check_shape(shape)
    for sub in ("imagesTr", "labelsTr", META_DIR):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    todo = [i for i in range(num) if not _case_done(out_dir, i)]
    _run_cases(out_dir, todo, seed, shape, workers, verbose)
    metas = [_read_meta(out_dir, i) for i in range(num)]
    _write_dataset_json(out_dir, num)
    _write_csv(out_dir, metas)
    if verbose:
        print(format_summary(summarize(metas), skipped=num - len(todo)))
    return [_case_paths(out_dir, i)["image"] for i in range(num)]


def _run_cases(out_dir: str, todo: list[int], seed: int, shape: tuple[int, int, int], workers: int,
               verbose: bool) -> None:
    """Generate the missing volumes, in parallel over volumes when ``workers`` > 1."""
    if not todo:
        return
    from tqdm import tqdm

    bar = tqdm(total=len(todo), desc="phantoms", unit="vol", disable=not verbose)
    if workers <= 1 or len(todo) == 1:
        for i in todo:
            _write_case(out_dir, i, seed, shape)
            bar.update()
    else:
        with ProcessPoolExecutor(max_workers=min(workers, len(todo))) as pool:
            futures = [pool.submit(_write_case, out_dir, i, seed, shape) for i in todo]
            for future in as_completed(futures):
                future.result()
                bar.update()
    bar.close()


def _read_meta(out_dir: str, index: int) -> dict:
    with open(_case_paths(out_dir, index)["meta"]) as f:
        return json.load(f)


def _write_dataset_json(out_dir: str, num: int) -> None:
    names = [f"liver_{i}" for i in range(num)]
    dataset = {
        "name": "LiverPhantoms",
        "description": "Synthetic abdominal CT phantoms (liver_d2.data.phantoms), MSD Task03 layout",
        "reference": "liver_d2",
        "licence": "CC0",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "liver", "2": "cancer"},
        "numTraining": num,
        "numTest": 0,
        "training": [{"image": f"./imagesTr/{n}.nii.gz", "label": f"./labelsTr/{n}.nii.gz"} for n in names],
        "test": [],
    }
    _atomic_write(os.path.join(out_dir, "dataset.json"), json.dumps(dataset, indent=2).encode())


def _write_csv(out_dir: str, metas: list[dict]) -> None:
    """One row per tumor: the ground truth in a form a spreadsheet or pandas reads directly."""
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for meta in metas:
        for k, t in enumerate(meta["tumors"]):
            writer.writerow({
                "volume": meta["volume"], "index": k, "kind": t["kind"], "diameter_mm": t["diameter_mm"],
                "contrast_hu": t["contrast_hu"], "rim_hu": t["rim_hu"], "mean_contrast_hu": t["mean_contrast_hu"],
                "placement": t["placement"], "n_voxels": t["n_voxels"],
                "center_x_mm": t["center_mm"][0], "center_y_mm": t["center_mm"][1], "center_z_mm": t["center_mm"][2],
                "center_i": t["center_voxel"][0], "center_j": t["center_voxel"][1], "center_k": t["center_voxel"][2],
                "phase": meta["phase"],
            })
    _atomic_write(os.path.join(out_dir, CSV_NAME), buf.getvalue().encode())


@dataclass
class PhantomSummary:
    volumes: int
    tumors: int
    volumes_without_tumor: int
    small_share: float  # share of tumors under 10 mm
    diameter_range: tuple[float, float]
    contrast_range: tuple[float, float]  # signed nominal contrast, HU
    kinds: dict[str, int]
    phases: dict[str, int]
    liver_mean_hu: dict[str, tuple[float, float]] = field(default_factory=dict)  # phase -> (min, max)
    noise_sd_range: tuple[float, float] = (0.0, 0.0)


def summarize(metas: list[dict]) -> PhantomSummary:
    tumors = [t for m in metas for t in m["tumors"]]
    d = np.array([t["diameter_mm"] for t in tumors]) if tumors else np.zeros(0)
    c = np.array([t["contrast_hu"] for t in tumors]) if tumors else np.zeros(0)
    liver: dict[str, list[float]] = {}
    for m in metas:
        if m.get("liver_mean_hu") is not None:
            liver.setdefault(m["phase"], []).append(m["liver_mean_hu"])
    noise = [m["noise_sd"] for m in metas]
    return PhantomSummary(
        volumes=len(metas), tumors=len(tumors), volumes_without_tumor=sum(not m["tumors"] for m in metas),
        small_share=float((d < SMALL_MM).mean()) if d.size else 0.0,
        diameter_range=(float(d.min()), float(d.max())) if d.size else (0.0, 0.0),
        contrast_range=(float(c.min()), float(c.max())) if c.size else (0.0, 0.0),
        kinds={k: sum(t["kind"] == k for t in tumors) for k in KINDS},
        phases={p: sum(m["phase"] == p for m in metas) for p in ("portal", "unenhanced")},
        liver_mean_hu={p: (float(min(v)), float(max(v))) for p, v in liver.items()},
        noise_sd_range=(float(min(noise)), float(max(noise))) if noise else (0.0, 0.0),
    )


def format_summary(s: PhantomSummary, skipped: int = 0) -> str:
    liver = ", ".join(f"{p} {lo:.0f}-{hi:.0f}" for p, (lo, hi) in sorted(s.liver_mean_hu.items()))
    kinds = ", ".join(f"{k} {n}" for k, n in s.kinds.items())
    lines = [
        f"volumes: {s.volumes} ({skipped} already there; {s.phases.get('portal', 0)} portal, "
        f"{s.phases.get('unenhanced', 0)} unenhanced; {s.volumes_without_tumor} without tumor)",
        f"tumors: {s.tumors} ({kinds}); under 10 mm: {100 * s.small_share:.0f}%; "
        f"diameter {s.diameter_range[0]:.1f}-{s.diameter_range[1]:.1f} mm",
        f"contrast to liver: {s.contrast_range[0]:+.0f} to {s.contrast_range[1]:+.0f} HU",
        f"liver mean HU: {liver or 'n/a'}; noise sd {s.noise_sd_range[0]:.1f}-{s.noise_sd_range[1]:.1f} HU",
    ]
    return "\n".join(lines)
