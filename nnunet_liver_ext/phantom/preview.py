"""A PNG montage of one phantom case: every phase, label contours, and the enhancement curves."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from nnunet_liver_ext.phantom.case import TISSUES, PhantomCase

_CLASS_COLOURS = {"HCC": "tab:red", "hemangioma": "tab:orange", "metastasis": "tab:purple", "cyst": "tab:cyan"}


def _window(case: PhantomCase, images) -> tuple[float, float]:
    if case.modality == "CT":
        return -160.0, 240.0  # abdominal soft-tissue window (W 400, L 40)
    stack = np.concatenate([a[::2, ::4, ::4].ravel() for a in images])
    return float(np.percentile(stack, 1)), float(np.percentile(stack, 99.5))


def save_preview(case: PhantomCase, path, dpi: int = 110) -> Path:
    """Write `path` (PNG): row 1 the motion-free phases with liver (green) and tumor (red)
    contours, row 2 the phases as acquired with the same reference-frame contours (so the
    motion shows), right column a coronal slice and the enhancement curves over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    n = len(case.phases)
    if case.lesions:
        z, y, x = case.lesions[0].center_zyx_vox
    else:
        zz, yy, xx = np.nonzero(case.label)
        z, y, x = (int(np.median(v)) for v in (zz, yy, xx)) if zz.size else (s // 2 for s in case.label.shape)
    vmin, vmax = _window(case, case.aligned_images)
    fig, axes = plt.subplots(2, n + 1, figsize=(3.2 * (n + 1), 6.6), squeeze=False)
    for row, (images, title) in enumerate(((case.aligned_images, "aligned"), (case.images, "as acquired"))):
        for k, phase in enumerate(case.phases):
            ax = axes[row, k]
            ax.imshow(images[k][z], cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.contour(case.label[z] >= 1, levels=[0.5], colors="lime", linewidths=0.7)
            if (case.label[z] == 2).any():
                ax.contour(case.label[z] == 2, levels=[0.5], colors="red", linewidths=0.8)
            ax.set_title(f"{phase} ({title})", fontsize=9)
            ax.set_axis_off()
    # Coronal slice through the lesion (z up; aspect from the anisotropic spacing).
    ax = axes[0, n]
    ref = case.reference_index
    ax.imshow(case.aligned_images[ref][:, y, :], cmap="gray", vmin=vmin, vmax=vmax, origin="lower",
              aspect=case.spacing[0] / case.spacing[2], interpolation="nearest")
    ax.contour(case.label[:, y, :] >= 1, levels=[0.5], colors="lime", linewidths=0.7)
    if (case.label[:, y, :] == 2).any():
        ax.contour(case.label[:, y, :] == 2, levels=[0.5], colors="red", linewidths=0.8)
    ax.set_title(f"coronal, {case.phases[ref]}", fontsize=9)
    ax.set_axis_off()

    ax = axes[1, n]
    # Phases equally spaced (early phases are seconds apart), acquisition time in the labels.
    t = np.arange(n)
    liver = case.label == 1
    aorta = case.tissue_map == TISSUES["aorta"] if case.tissue_map is not None else None
    if aorta is not None and aorta.any():
        ax.plot(t, [a[aorta].mean() for a in case.aligned_images], "k--", lw=1, label="aorta")
    ax.plot(t, [a[liver].mean() for a in case.aligned_images], "g-o", ms=3, lw=1.2, label="liver")
    for k, (lesion, curve) in enumerate(zip(case.lesions, case.lesion_curves)):
        ax.plot(t, curve, "-o", ms=3, lw=2.0 if k == 0 else 0.8, color=_CLASS_COLOURS[lesion.class_name],
                label=f"{lesion.class_name} {lesion.diameter_mm:.0f} mm" + (" (low contrast)" if lesion.low_contrast else ""))
    ax.set_xticks(t)
    ax.set_xticklabels([f"{p.replace('_', ' ')}\n{s:.0f} s" for p, s in zip(case.phases, case.acquisition_times_s)],
                       fontsize=7)
    ax.set_ylabel("HU" if case.modality == "CT" else "signal (a.u.)", fontsize=8)
    ax.set_title("mean intensity per phase", fontsize=9)
    ax.legend(fontsize=6, loc="best")
    ax.tick_params(labelsize=7)
    spacing = "x".join(f"{s:.2f}" for s in case.spacing)
    fig.suptitle(f"{case.case_id}: {case.modality}, class {case.case_class or 'none (no lesion)'}, "
                 f"{len(case.lesions)} lesion(s), spacing {spacing} mm (z, y, x), axial slice z={z}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
