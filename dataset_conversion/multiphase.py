"""Per-case logic shared by the multiphase converters (TCGA-LIHC CT, dynamic MRI).

Every phase is rigidly registered to the reference phase (portal venous: the labels live in
its frame) and resampled onto its grid, linear for images and nearest neighbour for labels,
so all channels of a case share one voxel grid as nnU-Net requires.
"""
from __future__ import annotations

from typing import Sequence

import SimpleITK as sitk

from nnunet_liver_ext.dataset_conversion.common import (
    LABELS, REFERENCE_PHASE, CaseResult, ConversionError, ConversionOptions, build_dataset_json, case_targets,
    check_label_values, match_label_to_image, tumor_curve, write_case)
from nnunet_liver_ext.dataset_conversion.registration import (displacement_vox, mask_points, register_rigid,
                                                               resample_onto, subsample_points)

# Below this fraction of the reference field of view covered by a registered phase, the
# phase does not show the same anatomy (wrong series, truncated scan): stop, do not guess.
MIN_OVERLAP_FRACTION = 0.6


def register_and_write(case_id: str, split: str, out_dir: str, options: ConversionOptions,
                       phase_images: dict[str, tuple[sitk.Image, str]], selected_phases: Sequence[str],
                       label: tuple[sitk.Image, str] | None, source_phases: Sequence[str],
                       csv_curve: Sequence[float] | None, compute_curve: bool,
                       case_class: str | None, notes: list[str], source: str) -> CaseResult:
    """Register, resample and write one multiphase case.

    phase_images: phase -> (image, source path) for at least the selected phases and the
    reference phase. label: (mask in the reference frame, path) or None for unlabeled
    cases. csv_curve: one value per `source_phases` (subset to the selected phases) or None;
    without it and with `compute_curve` the curve is the mean of each registered phase over
    the tumor voxels.
    """
    reference, reference_path = phase_images[REFERENCE_PHASE]
    reference_f = sitk.Cast(reference, sitk.sitkFloat32)
    label_image = None
    if label is not None:
        label_image, label_path = label
        label_image = check_label_values(label_image, case_id, label_path)
        label_image, label_notes = match_label_to_image(label_image, reference_f, case_id, label_path,
                                                        options.geometry_tolerance_vox)
        notes = notes + label_notes
    channels, registration = [], {}
    for phase in selected_phases:
        image, path = phase_images[phase]
        if phase == REFERENCE_PHASE:
            channels.append(reference_f)
            continue
        try:
            result = register_rigid(reference_f, image)
        except RuntimeError as e:
            raise ConversionError(f"registration of phase {phase!r} to {REFERENCE_PHASE} failed "
                                  f"({str(e).strip().splitlines()[-1]})", case_id, path) from None
        if result.overlap_fraction < MIN_OVERLAP_FRACTION:
            # skippable: one patient whose arterial scan covers the liver alone must not stop a whole dataset
            raise ConversionError(f"geometry mismatch after registration: phase {phase!r} covers only "
                                  f"{100 * result.overlap_fraction:.0f}% of the {REFERENCE_PHASE} field of view "
                                  f"(minimum {100 * MIN_OVERLAP_FRACTION:.0f}%; --skip-incomplete skips such a case)",
                                  case_id, path, skippable=True)
        registration[phase] = result.summary()
        if label_image is not None:
            # how far the correction moved the liver: the misalignment there was before registration
            points = subsample_points(mask_points(label_image, (1, 2)), 5000)
            moved = displacement_vox(result.transform, sitk.Euler3DTransform(), points, reference_f)
            if moved.size:
                registration[phase]["liver_correction_vox"] = {"mean": round(float(moved.mean()), 3),
                                                               "max": round(float(moved.max()), 3)}
        channels.append(resample_onto(image, reference_f, result.transform))
    curve = None
    if csv_curve is not None:
        curve = [float(csv_curve[list(source_phases).index(p)]) for p in selected_phases]
    elif compute_curve and label_image is not None:
        curve = tumor_curve(channels, label_image)
    outputs = write_case(out_dir, case_id, split, channels, label_image if split == "train" else None,
                         options.orient)
    return CaseResult(case_id, split, "converted", source=source, phases=list(selected_phases), warnings=notes,
                      case_class=case_class, curve=curve, registration=registration, outputs=outputs)


def multiphase_dataset_json(name: str, channel_name: str, selected_phases: Sequence[str],
                            options: ConversionOptions, description: str):
    def make(results: list[CaseResult]) -> dict:
        n_train = sum(r.status == "converted" and r.split == "train" for r in results)
        characterization, enhancement = case_targets(results)
        return build_dataset_json(name, [channel_name] * len(selected_phases), n_train,
                                  phases=list(selected_phases) if options.phases_mode == "sequence" else None,
                                  labels=LABELS, characterization=characterization, enhancement=enhancement,
                                  description=description)
    return make
