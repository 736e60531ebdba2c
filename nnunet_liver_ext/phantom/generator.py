"""Assemble a phantom case: anatomy, lesions, per-phase intensities, blur, motion and noise."""
from __future__ import annotations


import re
from typing import Iterator

import numpy as np
from scipy import ndimage

from nnunet_liver_ext.phantom.anatomy import Grid, build_anatomy, inscribed_distance, place_lesion
from nnunet_liver_ext.phantom.case import IDENTITY_DIRECTION, TISSUES, Lesion, PhantomCase, euler_transform
from nnunet_liver_ext.phantom.config import MIN_LESION_VOXELS, REFERENCE_PHASE, PhantomConfig, phases_for
from nnunet_liver_ext.phantom.kinetics import fill_depth, lesion_compartments, tissue_table

_LOBULATION = {"HCC": 0.15, "hemangioma": 0.08, "metastasis": 0.2, "cyst": 0.0}
# Seconds after injection per canonical phase: (low, high)
_ACQUISITION_S = {"CT": ((0, 0), (30, 40), (65, 80), (170, 240)),
                  "MRI": ((0, 0), (18, 25), (60, 70), (170, 200))}
_MIN_KEPT_VOXELS = 5
MAX_TUMOR_FRACTION = 0.35


def _draw_lesion_plan(rng: np.random.Generator, config: PhantomConfig) -> list[tuple[str, float, bool]]:
    """(class, diameter_mm, low_contrast) per lesion, largest first."""
    lo, hi = config.n_lesions_range
    if hi == 0:
        n = 0
    elif lo == 0:
        n = 0 if rng.random() < config.p_no_lesion else int(rng.integers(1, hi + 1))
    else:
        n = int(rng.integers(lo, hi + 1))
    d_lo, d_hi = config.lesion_diameter_range_mm
    # Log-uniform: many small lesions, a few large ones, as in clinical series.
    diameters = np.sort(np.exp(rng.uniform(np.log(d_lo), np.log(d_hi), n)))[::-1]
    classes = config.lesion_classes
    primary = classes[int(rng.integers(len(classes)))] if n else None
    plan = []
    for i, d in enumerate(diameters):
        cls = primary
        if i > 0 and rng.random() < config.class_mixing:
            cls = classes[int(rng.integers(len(classes)))]
        plan.append((cls, float(d), bool(rng.random() < config.low_contrast_fraction)))
    return plan


def _lesion_values(cls: str, comps: dict, geom, mask: np.ndarray, canon: list, spacing,
                   rng: np.random.Generator) -> np.ndarray:
    """Intensities before contrast scaling, float32 (n_phases, n_voxels in `mask`)."""
    depth = geom.depth[mask]
    n = depth.size
    out = np.empty((len(canon), n), dtype=np.float32)
    if cls == "HCC":
        capsule = np.zeros(n, dtype=bool)
        if comps["has_capsule"]:
            thickness = max(1.2, 0.8 * min(spacing[1:]))
            capsule = depth < thickness / geom.radius_mm
        mosaic = ndimage.gaussian_filter(rng.standard_normal(mask.shape).astype(np.float32), 1.2)[mask]
        mosaic /= max(float(mosaic.std()), 1e-6)
        for j, ci in enumerate(canon):
            amplitude = comps["mosaic"] * (1.0 if ci == 1 else 0.4)
            out[j] = np.where(capsule, comps["capsule"][ci], comps["core"][ci] + amplitude * mosaic)
    elif cls == "hemangioma":
        # Nodular, centripetal front: it advances further where a random peripheral nodule sits.
        nodule_dirs = rng.standard_normal((6, 3)).astype(np.float32)
        nodule_dirs /= np.linalg.norm(nodule_dirs, axis=1, keepdims=True)
        cos = np.einsum("kc,cn->kn", nodule_dirs, geom.direction[:, mask]).max(0)
        nodular = np.clip((cos - 0.5) / 0.5, 0.0, 1.0)
        fronts = {0: 0.0, 1: None, 2: comps["fill_portal"], 3: comps["fill_delayed"]}
        for j, ci in enumerate(canon):
            if ci == 1:
                filled = (nodular > 0.6) & (depth < 2.2 * fill_depth(comps["fill_arterial"]))
            else:
                front = fill_depth(fronts[ci]) * (0.75 + 0.5 * nodular)
                filled = depth < front if ci else np.zeros(n, dtype=bool)
            out[j] = np.where(filled, comps["filled"][ci], comps["unfilled"][ci])
    elif cls == "metastasis":
        rim = depth < comps["rim_depth"]
        for j, ci in enumerate(canon):
            out[j] = np.where(rim, comps["rim"][ci], comps["centre"][ci])
    else:
        for j, ci in enumerate(canon):
            out[j] = comps["fluid"][ci]
    return out


def generate_case(config: PhantomConfig, seed: int, index: int, case_id: str) -> PhantomCase:
    """One case; its randomness comes only from `np.random.default_rng([seed, index])`."""
    if not isinstance(config, PhantomConfig):
        raise TypeError(f"config must be a PhantomConfig, got {type(config).__name__}")
    rng = np.random.default_rng([int(seed), int(index)])
    modality, phases, shape = config.modality, config.phases, config.shape
    canon = [phases_for(modality).index(p) for p in phases]
    ref = phases.index(REFERENCE_PHASE)

    inplane = rng.uniform(*config.inplane_spacing_range)
    spacing = (float(rng.uniform(*config.slice_spacing_range)), float(inplane), float(inplane))
    grid = Grid(shape, spacing)
    half_xyz = grid.half_mm[::-1]
    origin = (float(-half_xyz[0] + rng.uniform(-15, 15)), float(-half_xyz[1] + rng.uniform(-30, 10)),
              float(rng.uniform(-400, -150)))
    centre_mm = tuple(float(o + h) for o, h in zip(origin, half_xyz))

    anatomy = build_anatomy(rng, grid)
    tissue_map, liver_mask = anatomy.tissue_map, anatomy.liver_mask
    table = tissue_table(modality, rng)
    liver_values = table[TISSUES["liver"]].astype(np.float64)
    blood_values = table[TISSUES["aorta"]].astype(np.float64)

    # --- lesions -------------------------------------------------------------------------
    plan = _draw_lesion_plan(rng, config)
    lesion_map = np.zeros(shape, dtype=np.uint16)
    painted = []  # (Lesion, box, local mask, values (n_phase, n_vox))
    if plan and liver_mask.any():
        liver_dist, liver_box = inscribed_distance(liver_mask, spacing)
        voxel_volume = float(np.prod(spacing))
        r_min = (MIN_LESION_VOXELS * voxel_volume * 3.0 / (4.0 * np.pi)) ** (1.0 / 3.0)
        r_max = config.max_lesion_fraction * float(liver_dist.max())
        radii = np.array([min(max(d / 2.0, r_min), r_max) for _, d, _ in plan])
        # Tumour burden at most MAX_TUMOR_FRACTION of the liver: on small grids a few "30 mm"
        # lesions would otherwise replace the organ.
        liver_volume = float(liver_mask.sum()) * voxel_volume
        burden = float((4.0 / 3.0 * np.pi * radii ** 3).sum())
        if burden > MAX_TUMOR_FRACTION * liver_volume:
            radii = np.maximum(radii * (MAX_TUMOR_FRACTION * liver_volume / burden) ** (1.0 / 3.0),
                               min(r_min, r_max))
        taken = []
        for (cls, diameter, low), radius in zip(plan, radii):
            geom = place_lesion(rng, liver_dist, liver_box, shape, spacing, radius, taken,
                                _LOBULATION[cls])
            if geom is None:
                continue
            mask = geom.mask & liver_mask[geom.box] & (lesion_map[geom.box] == 0)
            if mask.sum() < _MIN_KEPT_VOXELS:
                continue
            taken.append((geom.center_vox, geom.radius_mm))
            comps = lesion_compartments(cls, modality, liver_values, blood_values, rng, low)
            raw = _lesion_values(cls, comps, geom, mask, canon, spacing, rng)
            c = config.contrast
            if cls != "cyst":  # fluid density already encodes a low-contrast cyst
                c *= rng.uniform(0.35, 0.55) if low else rng.uniform(0.85, 1.15)
            liver_now = liver_values[canon].astype(np.float32)[:, None]
            values = liver_now + np.float32(c) * (raw - liver_now)
            lesion_map[geom.box][mask] = len(painted) + 1
            lesion = Lesion(cls, tuple(int(v) for v in geom.center_vox), round(2.0 * geom.radius_mm, 2), low,
                            int(mask.sum()), bool(comps.get("has_capsule", False)))
            painted.append((lesion, geom.box, mask, values))

    # Largest lesion first: lesions[0] decides the case class.
    order = sorted(range(len(painted)), key=lambda i: -painted[i][0].n_voxels)
    if order != list(range(len(painted))):
        remap = np.zeros(len(painted) + 1, dtype=np.uint16)
        for new, old in enumerate(order):
            remap[old + 1] = new + 1
        lesion_map = remap[lesion_map]
        painted = [painted[i] for i in order]
    lesions = [p[0] for p in painted]
    label = liver_mask.astype(np.uint8)
    label[lesion_map > 0] = 2

    # --- motion, per phase ---------------------------------------------------------------
    motion = []
    for j in range(len(phases)):
        if j == ref or (config.motion_mm == 0 and config.motion_deg == 0):
            motion.append({"rotation_deg": (0.0, 0.0, 0.0), "translation_mm": (0.0, 0.0, 0.0),
                           "center_mm": centre_mm})
            continue
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        shift = direction * config.motion_mm * rng.uniform(0.3, 1.0)
        angles = rng.uniform(-config.motion_deg, config.motion_deg, 3)
        motion.append({"rotation_deg": tuple(round(float(a), 4) for a in angles),
                       "translation_mm": tuple(round(float(t), 4) for t in shift),
                       "center_mm": centre_mm})
    times = [float(round(rng.uniform(*_ACQUISITION_S[modality][ci]), 1)) for ci in canon]

    # --- images ----------------------------------------------------------------------------
    sigma_vox = [config.blur_sigma_mm / s for s in spacing]
    gain = 1.0 if modality == "CT" else float(rng.uniform(300.0, 700.0))
    noise_abs = config.noise_sigma * (1.0 if modality == "CT" else gain * float(liver_values[0]))
    bias = 1.0 + 0.08 * anatomy.bias if modality == "MRI" else None
    # Tissue texture inside the body only: air stays air.
    texture = anatomy.texture * (tissue_map != TISSUES["air"])
    images, aligned = [], []
    for j, ci in enumerate(canon):
        clean = table[:, ci][tissue_map]
        for lesion, box, mask, values in painted:
            clean[box][mask] = values[j]
        if modality == "CT":
            clean += 4.0 * texture
        else:
            clean *= gain * (1.0 + 0.03 * texture)
        if config.blur_sigma_mm > 0:
            clean = ndimage.gaussian_filter(clean, sigma_vox, mode="nearest", truncate=3.0)
        moved = clean
        if j != ref and (config.motion_mm > 0 or config.motion_deg > 0):
            moved = _apply_motion(clean, spacing, origin, motion[j], fill=float(table[TISSUES["air"], ci]) * gain)
        if modality == "CT":
            noise = rng.standard_normal(shape, dtype=np.float32) * np.float32(noise_abs)
            # Scanners store HU in 12 bits above -1024: clip like they do.
            aligned.append(np.clip(clean + noise, -1024.0, 3071.0))
            images.append(np.clip(moved + noise, -1024.0, 3071.0) if moved is not clean else aligned[-1].copy())
        else:
            n1 = rng.standard_normal(shape, dtype=np.float32) * np.float32(noise_abs)
            n2 = rng.standard_normal(shape, dtype=np.float32) * np.float32(noise_abs)
            # Magnitude images: Rician noise, coil sensitivity fixed to the scanner (not moved).
            aligned.append(np.sqrt((clean * bias + n1) ** 2 + n2 ** 2).astype(np.float32))
            images.append(np.sqrt((moved * bias + n1) ** 2 + n2 ** 2).astype(np.float32)
                          if moved is not clean else aligned[-1].copy())

    tumor = label == 2
    curve = [float(a[tumor].mean()) for a in aligned] if tumor.any() else None
    lesion_curves = []
    if lesions:
        flat_map = lesion_map.ravel()
        counts = np.bincount(flat_map, minlength=len(lesions) + 1)[1:]
        for a in aligned:
            sums = np.bincount(flat_map, weights=a.ravel(), minlength=len(lesions) + 1)[1:]
            lesion_curves.append(sums / counts)
        lesion_curves = [[float(v) for v in col] for col in np.asarray(lesion_curves).T]

    return PhantomCase(
        case_id=case_id, modality=modality, phases=tuple(phases), images=images, aligned_images=aligned,
        label=label, lesion_map=lesion_map, lesions=lesions,
        case_class=lesions[0].class_name if lesions else None, curve=curve, spacing=spacing,
        origin=origin, direction=IDENTITY_DIRECTION, motion=motion, acquisition_times_s=times,
        tissue_map=tissue_map, lesion_curves=lesion_curves, seed=int(seed), index=int(index), config=config)


def _apply_motion(array: np.ndarray, spacing, origin, motion: dict, fill: float) -> np.ndarray:
    """Move the patient by T (see PhantomCase): acquired(q) = aligned(T^-1(q)), trilinear."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in spacing[::-1]))
    image.SetOrigin(origin)
    image.SetDirection(IDENTITY_DIRECTION)
    inverse = euler_transform(motion).GetInverse()
    moved = sitk.Resample(image, image, inverse, sitk.sitkLinear, fill, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(moved)


def generate_cases(n: int, config: PhantomConfig, seed: int, prefix: str = "phantom",
                   progress: bool = True, start: int = 0) -> list[PhantomCase]:
    """Cases `prefix_000` ... ; case i depends only on (seed, i, config), not on n."""
    return list(iter_cases(n, config, seed, prefix, progress, start))


def iter_cases(n: int, config: PhantomConfig, seed: int, prefix: str = "phantom",
               progress: bool = True, start: int = 0) -> Iterator[PhantomCase]:
    """:func:`generate_cases` one case at a time (arguments checked now): a writer that consumes it holds one
    case's volumes at once (about 60 MiB at 64x192x192), not all of them."""
    if int(n) < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    # the prefix becomes file names (nnU-Net's CASE_0000.nii.gz): a slash would make folders nnU-Net never reads
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", str(prefix)):
        raise ValueError(f"case id prefix must be letters, digits, '_' or '-' (starting with a letter or digit), "
                         f"got {prefix!r}")
    if int(seed) < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    indices = range(int(start), int(start) + int(n))
    if progress:
        from tqdm import tqdm

        indices = tqdm(indices, desc=f"phantom {config.modality} {'x'.join(map(str, config.shape))}",
                       unit="case")
    return (generate_case(config, seed, i, f"{prefix}_{i:03d}") for i in indices)
