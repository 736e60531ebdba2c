"""Randomised abdominal anatomy on a voxel grid, and lesion geometry inside the liver.

The body is drawn in normalised coordinates u in [-1, 1] per axis (x towards the patient's
left, y posterior, z superior: DICOM LPS with an identity direction), so it fills the field of
view whatever the grid size or spacing; the anatomy is therefore scaled to the field of view.
Lesions and vessel calibres are in physical mm (clamped to what the liver can hold).
All arrays are (z, y, x). Everything is vectorised; no loop runs over voxels.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from nnunet_liver_ext.phantom.case import TISSUES

T = TISSUES


def smooth_field(rng: np.random.Generator, shape: tuple, n_ctrl: tuple = (5, 6, 6),
                 width: float = 1.0) -> np.ndarray:
    """Smooth random field of unit (approximate) standard deviation, float32 (z, y, x).

    Gaussian radial-basis interpolation of a coarse white-noise grid, done as three small
    separable matrix products, so the cost is a single pass over the output.
    """
    coarse = rng.standard_normal(n_ctrl).astype(np.float32)
    weights = []
    for n_out, n_c in zip(shape, n_ctrl):
        u = np.linspace(-1.0, 1.0, n_out, dtype=np.float32)
        c = np.linspace(-1.2, 1.2, n_c, dtype=np.float32)
        step = 2.4 / max(n_c - 1, 1)
        w = np.exp(-0.5 * ((u[:, None] - c[None, :]) / (width * step)) ** 2)
        weights.append((w / w.sum(1, keepdims=True)).astype(np.float32))
    wz, wy, wx = weights
    field = np.einsum("za,abc->zbc", wz, coarse)
    field = np.einsum("yb,zbc->zyc", wy, field)
    field = field @ wx.T
    std = float(field[::2, ::4, ::4].std())
    return (field / max(std, 1e-6)).astype(np.float32)


@dataclass
class Grid:
    """Normalised coordinates (1D, broadcastable) and the physical scale of one case."""

    shape: tuple
    spacing: tuple  # (z, y, x) mm

    def __post_init__(self):
        nz, ny, nx = self.shape
        self.uz = np.linspace(-1, 1, nz, dtype=np.float32)[:, None, None]
        self.uy = np.linspace(-1, 1, ny, dtype=np.float32)[None, :, None]
        self.ux = np.linspace(-1, 1, nx, dtype=np.float32)[None, None, :]
        # mm per normalised unit along each axis
        self.half_mm = np.array([(n - 1) / 2 * s for n, s in zip(self.shape, self.spacing)])

    def to_vox(self, u_xyz) -> np.ndarray:
        """Normalised (x, y, z) point(s) -> fractional voxel index (z, y, x)."""
        u = np.atleast_2d(np.asarray(u_xyz, dtype=np.float64))
        zyx = u[:, ::-1]
        return (zyx + 1.0) / 2.0 * (np.array(self.shape) - 1)

    def box(self, center_xyz, semi_xyz, margin: float = 1.15):
        """Index slices (z, y, x) covering an ellipsoid, clipped to the grid (None if outside)."""
        lo = self.to_vox(np.asarray(center_xyz) - margin * np.asarray(semi_xyz))[0]
        hi = self.to_vox(np.asarray(center_xyz) + margin * np.asarray(semi_xyz))[0]
        slices = []
        for a, b, n in zip(lo, hi, self.shape):
            a, b = int(max(np.floor(a), 0)), int(min(np.ceil(b) + 1, n))
            if a >= b:
                return None
            slices.append(slice(a, b))
        return tuple(slices)

    def coords(self, box):
        return self.uz[box[0]], self.uy[:, box[1]], self.ux[:, :, box[2]]


def _ellipsoid_q(grid: Grid, box, center, semi) -> np.ndarray:
    """Normalised squared radius of an axis-aligned ellipsoid on `box` (< 1 inside)."""
    uz, uy, ux = grid.coords(box)
    return (((ux - center[0]) / semi[0]) ** 2 + ((uy - center[1]) / semi[1]) ** 2
            + ((uz - center[2]) / semi[2]) ** 2)


def _disc2d(grid: Grid, center_xy, semi_xy) -> np.ndarray:
    """(y, x) boolean ellipse; broadcast along z it is a tube through the whole volume."""
    q = ((grid.ux[0] - center_xy[0]) / semi_xy[0]) ** 2 + ((grid.uy[0] - center_xy[1]) / semi_xy[1]) ** 2
    return q <= 1.0


@dataclass
class Anatomy:
    tissue_map: np.ndarray  # uint8 (z, y, x), codes of TISSUES
    liver_mask: np.ndarray  # bool (z, y, x): liver parenchyma incl. intrahepatic vessels
    texture: np.ndarray  # float32 (z, y, x), smooth, unit std
    bias: np.ndarray  # float32 (z, y, x), smooth, unit std (MRI coil sensitivity)


def build_anatomy(rng: np.random.Generator, grid: Grid) -> Anatomy:
    """Draw one randomised abdomen on `grid`."""
    shape = grid.shape
    u = rng.uniform
    tissue = np.zeros(shape, dtype=np.uint8)

    # Body outline: elliptic cylinder, slightly wider caudally, fat then a muscle wall.
    ax, ay, by = u(0.86, 0.95), u(0.62, 0.74), u(-0.04, 0.04)
    taper = (1.0 - u(0.0, 0.06) * grid.uz) ** 2
    t_fat, t_muscle = u(0.04, 0.11), u(0.025, 0.045)

    def wall(shrink):
        q = (grid.ux[0] / (ax - shrink)) ** 2 + ((grid.uy[0] - by) / (ay - shrink)) ** 2
        return q[None] <= taper

    body, inner_wall, cavity = wall(0.0), wall(t_fat), wall(t_fat + t_muscle)
    tissue[body] = T["subcutaneous_fat"]
    tissue[inner_wall] = T["muscle"]
    tissue[cavity] = T["visceral_fat"]
    bowel_field = smooth_field(rng, shape, (6, 9, 9), width=0.8)
    tissue[cavity & (bowel_field > u(-0.3, 0.3))] = T["bowel"]

    # Spine and paraspinal muscles, constant along z.
    sy = by + ay - t_fat - t_muscle - u(0.22, 0.27)
    r_body = u(0.095, 0.12)
    for side in (-1, 1):
        para = _disc2d(grid, (side * 0.13, sy + 0.2), (0.1, 0.085))
        tissue[:, para & inner_wall[0]] = T["muscle"]

    # Liver: smooth union of a right lobe and a left lobe, radially perturbed by a smooth field.
    c_right = (u(-0.4, -0.28), by + u(-0.08, 0.02), u(0.1, 0.3))
    s_right = (u(0.40, 0.48), u(0.40, 0.48), u(0.55, 0.7))
    c_left = (c_right[0] + u(0.38, 0.5), by + u(-0.34, -0.24), c_right[2] + u(0.05, 0.15))
    s_left = (u(0.22, 0.3), u(0.13, 0.18), u(0.22, 0.32))
    lo = np.minimum(np.subtract(c_right, s_right), np.subtract(c_left, s_left)) * 1.0
    hi = np.maximum(np.add(c_right, s_right), np.add(c_left, s_left))
    liver_box = grid.box((lo + hi) / 2, (hi - lo) / 2 * 1.2, margin=1.0)
    q1 = np.sqrt(_ellipsoid_q(grid, liver_box, c_right, s_right))
    q2 = np.sqrt(_ellipsoid_q(grid, liver_box, c_left, s_left))
    k = 8.0
    f = -np.log(np.exp(-k * q1) + np.exp(-k * q2)) / k
    perturb = smooth_field(rng, shape, (5, 6, 6), width=0.9)[liver_box]
    liver_shape = np.zeros(shape, dtype=bool)
    liver_shape[liver_box] = f < 1.0 + 0.12 * perturb
    liver_shape &= cavity
    tissue[liver_shape] = T["liver"]

    # Spleen and kidneys override the liver where they touch it.
    c_spleen = (u(0.5, 0.6), sy - u(0.12, 0.2), c_right[2] + u(0.0, 0.15))
    s_spleen = (u(0.1, 0.15), u(0.18, 0.25), u(0.25, 0.35))
    box = grid.box(c_spleen, s_spleen)
    if box is not None:
        spleen = _ellipsoid_q(grid, box, c_spleen, s_spleen) <= 1.0
        spleen &= cavity[box]
        tissue[box][spleen] = T["spleen"]
    for side in (-1, 1):
        c_kid = (side * u(0.36, 0.44), sy - u(0.0, 0.05), u(-0.45, -0.25) - (0.08 if side < 0 else 0.0))
        s_kid = (u(0.09, 0.12), u(0.11, 0.14), u(0.26, 0.34))
        box = grid.box(c_kid, s_kid)
        if box is None:
            continue
        q = _ellipsoid_q(grid, box, c_kid, s_kid)
        sub = tissue[box]
        inside = (q <= 1.0) & cavity[box]
        sub[inside] = T["kidney_cortex"]
        sub[inside & (q <= 0.45)] = T["kidney_medulla"]

    # Portal venous tree and hepatic veins, rasterised centrelines + one distance transform.
    c_ivc = (u(-0.14, -0.08), sy - u(0.2, 0.24))
    _draw_vessel_trees(rng, grid, tissue, liver_shape, c_right, s_right, c_left, c_ivc)

    # Great vessels and spine last: nothing overrides them.
    aorta = _disc2d(grid, (u(0.03, 0.08), sy - r_body - u(0.06, 0.09)), (0.055, 0.055))
    tissue[:, aorta] = T["aorta"]
    ivc = _disc2d(grid, c_ivc, (u(0.05, 0.065), u(0.04, 0.05)))
    tissue[:, ivc] = T["ivc"]
    vert = _disc2d(grid, (0.0, sy), (r_body, r_body * 0.9))
    tissue[:, vert] = T["cortical_bone"]
    tissue[:, _disc2d(grid, (0.0, sy), (r_body - 0.018, r_body * 0.9 - 0.018))] = T["cancellous_bone"]
    arch = _disc2d(grid, (0.0, sy + r_body + 0.05), (0.075, 0.065))
    spinous = _disc2d(grid, (0.0, sy + r_body + 0.14), (0.025, 0.08)) & inner_wall[0]
    tissue[:, arch | spinous] = T["cortical_bone"]
    tissue[:, _disc2d(grid, (0.0, sy + r_body + 0.05), (0.045, 0.04))] = T["spinal_canal"]

    hepatic = np.isin(tissue, (T["liver"], T["portal_vein"], T["hepatic_vein"]))
    liver_mask = liver_shape & hepatic
    # Keep the largest connected piece: the smooth field can pinch off tiny islands.
    lab, n = ndimage.label(liver_mask)
    if n > 1:
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        liver_mask = lab == int(sizes.argmax())
        tissue[(lab > 0) & ~liver_mask & (tissue == T["liver"])] = T["visceral_fat"]

    texture = smooth_field(rng, shape, (9, 14, 14), width=0.7)
    bias = smooth_field(rng, shape, (3, 3, 3), width=1.2)
    return Anatomy(tissue, liver_mask, texture, bias)


def _segment_points(a, b, step: float):
    n = max(int(np.ceil(np.linalg.norm(b - a) / step)), 1) + 1
    t = np.linspace(0.0, 1.0, n)[:, None]
    return a[None] * (1 - t) + b[None] * t


def _draw_vessel_trees(rng, grid: Grid, tissue, liver_shape, c_right, s_right, c_left, c_ivc):
    """Portal vein (trunk, three lobar branches, two sub-branches each) and three hepatic veins.

    Calibres are fractions of the half field of view (the anatomy's scale), floored at 0.6
    voxel so vessels stay visible on coarse grids.
    """
    jit = lambda p, s=0.04: np.asarray(p, dtype=np.float64) + rng.normal(0.0, s, 3)
    cr = np.asarray(c_right)
    hilum = jit(cr + [0.2, 0.08, -0.2])
    trunk_start = jit([c_ivc[0] + 0.12, c_ivc[1] - 0.1, -0.75])
    segments = [(trunk_start, hilum, 0.045, T["portal_vein"])]
    lobar_targets = [cr + [-0.22, 0.18, -0.05], cr + [-0.18, -0.22, 0.1], np.asarray(c_left) + [0.05, 0.0, 0.0]]
    for target in lobar_targets:
        end = jit(target)
        segments.append((hilum, end, 0.028, T["portal_vein"]))
        direction = (end - hilum) / max(np.linalg.norm(end - hilum), 1e-6)
        for _ in range(2):
            sub_dir = direction + rng.normal(0.0, 0.6, 3)
            sub_dir /= max(np.linalg.norm(sub_dir), 1e-6)
            segments.append((end, end + sub_dir * rng.uniform(0.12, 0.22), 0.017, T["portal_vein"]))
    confluence = jit([c_ivc[0], c_ivc[1] - 0.04, cr[2] + 0.5], 0.02)
    for target in (cr + [-0.3, 0.0, -0.05], cr + [0.05, -0.3, -0.1], np.asarray(c_left) + [0.1, 0.02, -0.05]):
        segments.append((confluence, jit(target), 0.026, T["hepatic_vein"]))

    half_x = grid.half_mm[2]
    min_r = 0.6 * min(grid.spacing[1:])
    pts, radii, kinds = [], [], []
    for a, b, r_norm, kind in segments:
        p = grid.to_vox(_segment_points(a, b, step=0.5 * 2.0 / max(grid.shape)))
        pts.append(p)
        radii.append(np.full(len(p), max(r_norm * half_x, min_r)))
        kinds.append(np.full(len(p), kind))
    pts = np.rint(np.concatenate(pts)).astype(int)
    radii, kinds = np.concatenate(radii), np.concatenate(kinds)
    keep = np.all((pts >= 0) & (pts < np.array(grid.shape)), axis=1)
    pts, radii, kinds = pts[keep], radii[keep], kinds[keep]
    if len(pts) == 0:
        return
    r_vox = int(np.ceil(radii.max() / min(grid.spacing))) + 1
    lo = np.maximum(pts.min(0) - r_vox, 0)
    hi = np.minimum(pts.max(0) + r_vox + 1, grid.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    local = pts - lo
    centre = np.ones(tuple(hi - lo), dtype=bool)
    centre[tuple(local.T)] = False
    radius_grid = np.zeros(centre.shape, dtype=np.float32)
    kind_grid = np.zeros(centre.shape, dtype=np.uint8)
    # Larger calibres written last win where centrelines share a voxel.
    order = np.argsort(radii)
    radius_grid[tuple(local[order].T)] = radii[order]
    kind_grid[tuple(local[order].T)] = kinds[order]
    dist, idx = ndimage.distance_transform_edt(centre, sampling=grid.spacing, return_indices=True)
    nearest = tuple(idx)
    vessel = dist <= radius_grid[nearest]
    kind = kind_grid[nearest]
    # Portal trunk runs outside the liver up to the hilum; intrahepatic branches stay inside it.
    sub_tissue = tissue[box]
    inside_liver = liver_shape[box]
    trunk_ok = (kind == T["portal_vein"]) & np.isin(sub_tissue, (T["visceral_fat"], T["bowel"]))
    paint = vessel & (inside_liver | trunk_ok)
    sub_tissue[paint] = kind[paint]


# ----------------------------------------------------------------------------------------------
# Lesions


@dataclass
class LesionGeometry:
    """One lesion on its bounding box `box` (z, y, x slices) of the reference grid.

    depth: 0 at the lesion surface, 1 at its centre (NaN-free; < 0 outside).
    direction: (3, bz, by, bx) unit vectors from the centre (for angular patterns).
    """

    center_vox: np.ndarray
    radius_mm: float
    box: tuple
    mask: np.ndarray
    depth: np.ndarray
    direction: np.ndarray


def inscribed_distance(liver_mask: np.ndarray, spacing) -> tuple[np.ndarray, tuple]:
    """Distance (mm) to the liver surface on the liver's bounding box, and that box."""
    zz, yy, xx = (np.flatnonzero(liver_mask.any(axis=a)) for a in ((1, 2), (0, 2), (0, 1)))
    box = (slice(zz[0], zz[-1] + 1), slice(yy[0], yy[-1] + 1), slice(xx[0], xx[-1] + 1))
    padded = np.pad(liver_mask[box], 1)
    dist = ndimage.distance_transform_edt(padded, sampling=spacing)[1:-1, 1:-1, 1:-1]
    return dist.astype(np.float32), box


def place_lesion(rng: np.random.Generator, liver_dist: np.ndarray, liver_box: tuple, shape: tuple,
                 spacing, radius_mm: float, taken: list, lobulation: float):
    """Pick a centre whose distance to the liver surface is >= 0.85 r and that does not
    overlap earlier lesions, then rasterise a randomly rotated, lobulated ellipsoid.

    Returns None when no position fits even after shrinking the lesion twice.
    """
    spacing = np.asarray(spacing, dtype=np.float64)
    for attempt in range(3):
        candidates = np.argwhere(liver_dist >= 0.85 * radius_mm)
        if len(candidates):
            picks = candidates[rng.choice(len(candidates), size=min(24, len(candidates)), replace=False)]
            for local in picks:
                centre = local + np.array([s.start for s in liver_box])
                if all(np.linalg.norm((centre - c) * spacing) >= 1.05 * (radius_mm + r) for c, r in taken):
                    return _rasterise(rng, centre, radius_mm, shape, spacing, lobulation)
        radius_mm *= 0.75
    return None


def _rasterise(rng, centre, radius_mm, shape, spacing, lobulation) -> LesionGeometry:
    axes = radius_mm * rng.uniform(0.85, 1.15, 3)
    q, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    reach = np.ceil(axes.max() * (1.0 + lobulation) * 1.1 / spacing).astype(int) + 1
    lo = np.maximum(centre - reach, 0)
    hi = np.minimum(centre + reach + 1, shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    offsets = [((np.arange(a, b) - c) * s).astype(np.float32) for a, b, c, s in zip(lo, hi, centre, spacing)]
    dz, dy, dx = np.meshgrid(*offsets, indexing="ij")
    vec = np.stack([dz, dy, dx])  # (3, bz, by, bx) mm
    rot = np.einsum("ij,j...->i...", q.T.astype(np.float32), vec)
    r_norm = np.sqrt(((rot / axes[:, None, None, None].astype(np.float32)) ** 2).sum(0))
    norm = np.maximum(np.sqrt((vec ** 2).sum(0)), 1e-6)
    direction = vec / norm
    if lobulation > 0:
        # Low-order bumps: a few random directions raise the surface where they point.
        lobes = rng.standard_normal((5, 3))
        lobes /= np.linalg.norm(lobes, axis=1, keepdims=True)
        cos = np.einsum("kc,c...->k...", lobes.astype(np.float32), direction)
        r_norm = r_norm / (1.0 + lobulation * np.maximum(cos, 0.0).max(0) ** 3)
    mask = r_norm <= 1.0
    if not mask.any():
        # Tiny lesion between voxel centres: keep at least its centre voxel.
        mask[tuple(np.asarray(centre) - lo)] = True
    depth = (1.0 - r_norm).astype(np.float32)
    return LesionGeometry(np.asarray(centre), float(radius_mm), box, mask, depth, direction.astype(np.float32))
