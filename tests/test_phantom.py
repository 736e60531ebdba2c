"""The phantom generator: contract, determinism, intensities, motion, and that the lesion class
really is decidable from the enhancement dynamics (and not from the portal venous phase alone)."""
import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from nnunet_liver_ext.phantom import (
    CT_PHASES, LESION_CLASSES, MRI_PHASES, REFERENCE_PHASE, TISSUES, PhantomCase, PhantomConfig,
    generate_case, generate_cases,
)
from nnunet_liver_ext.phantom.case import euler_transform

SMALL = (24, 64, 64)


@pytest.fixture(scope="module")
def ct_cases():
    return generate_cases(4, PhantomConfig(shape=(32, 96, 96), n_lesions_range=(1, 3)), seed=11, progress=False)


@pytest.fixture(scope="module")
def mri_case():
    return generate_case(PhantomConfig(modality="MRI", shape=(32, 96, 96), n_lesions_range=(1, 2)), 5, 0, "mri_000")


# ------------------------------------------------------------------------------------- config

@pytest.mark.parametrize("kwargs, message", [
    ({"modality": "PET"}, "modality"),
    ({"phases": ("arterial", "delayed")}, "portal_venous"),
    ({"phases": ("portal_venous", "arterial")}, "acquisition order"),
    ({"phases": ("arterial", "portal_venous", "delay")}, "unknown CT phase"),
    ({"modality": "MRI", "phases": ("arterial", "portal_venous", "delayed")}, "unknown MRI phase"),
    ({"phases": "portal_venous"}, "sequence"),
    ({"shape": (4, 64, 64)}, "shape"),
    ({"lesion_classes": ("HCC", "FNH")}, "lesion_classes"),
    ({"n_lesions_range": (3, 1)}, "n_lesions_range"),
    ({"lesion_diameter_range_mm": (0, 10)}, "lesion_diameter_range_mm"),
    ({"noise_sigma": -1}, "noise_sigma"),
    ({"contrast": 0}, "contrast"),
])
def test_config_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PhantomConfig(**kwargs)


def test_config_defaults_per_modality():
    ct, mri = PhantomConfig(), PhantomConfig(modality="MRI")
    assert ct.phases == ("arterial", "portal_venous", "delayed") and ct.shape == (64, 192, 192)
    assert mri.phases == MRI_PHASES and mri.noise_sigma == pytest.approx(0.04)
    assert PhantomConfig(lesion_classes=("cyst", "HCC")).lesion_classes == ("HCC", "cyst")
    assert PhantomConfig.from_dict(ct.to_dict()) == ct


# ----------------------------------------------------------------------------- contract, determinism

def test_case_contract(ct_cases):
    lo_in, hi_in = PhantomConfig().inplane_spacing_range
    lo_z, hi_z = PhantomConfig().slice_spacing_range
    for i, case in enumerate(ct_cases):
        assert isinstance(case, PhantomCase) and case.case_id == f"phantom_{i:03d}"
        assert case.phases == ("arterial", "portal_venous", "delayed")
        assert len(case.images) == len(case.aligned_images) == 3
        for a, b in zip(case.images, case.aligned_images):
            assert a.dtype == b.dtype == np.float32 and a.shape == b.shape == (32, 96, 96)
        assert case.label.dtype == np.uint8 and set(np.unique(case.label)) <= {0, 1, 2}
        assert case.lesion_map.dtype == np.uint16
        # lesion_map numbers lesions[k-1] and is exactly the tumor label
        assert case.lesion_map.max() == len(case.lesions) >= 1
        assert np.array_equal(case.lesion_map > 0, case.label == 2)
        sizes = [int((case.lesion_map == k + 1).sum()) for k in range(len(case.lesions))]
        assert sizes == [les.n_voxels for les in case.lesions] and sizes == sorted(sizes, reverse=True)
        assert case.case_class == case.lesions[0].class_name
        for les in case.lesions:
            assert les.class_name in LESION_CLASSES
            assert case.label[tuple(les.center_zyx_vox)] in (1, 2)
        tumor = case.label == 2
        np.testing.assert_allclose(case.curve, [a[tumor].mean() for a in case.aligned_images], rtol=1e-5)
        z, y, x = case.spacing
        assert lo_z <= z <= hi_z and lo_in <= y == x <= hi_in
        assert case.direction == (1, 0, 0, 0, 1, 0, 0, 0, 1) and len(case.origin) == 3
        assert case.acquisition_times_s == sorted(case.acquisition_times_s)
        ref = case.reference_index
        assert case.motion[ref]["rotation_deg"] == (0, 0, 0) and case.motion[ref]["translation_mm"] == (0, 0, 0)
        np.testing.assert_array_equal(case.images[ref], case.aligned_images[ref])


def test_same_seed_same_arrays_independent_of_n():
    config = PhantomConfig(shape=SMALL)
    three = generate_cases(3, config, seed=7, progress=False)
    two = generate_cases(2, config, seed=7, progress=False)
    again = generate_case(config, 7, 1, "phantom_001")
    for a, b in ((three[0], two[0]), (three[1], two[1]), (three[1], again)):
        for x, y in zip(a.images + a.aligned_images + [a.label, a.lesion_map],
                        b.images + b.aligned_images + [b.label, b.lesion_map]):
            np.testing.assert_array_equal(x, y)
        assert a.lesions == b.lesions and a.motion == b.motion and a.spacing == b.spacing
    other = generate_case(config, 8, 1, "phantom_001")
    assert not np.array_equal(other.images[1], three[1].images[1])


def test_to_sitk_geometry(ct_cases):
    case = ct_cases[0]
    image = case.to_sitk(case.label)
    assert image.GetSpacing() == pytest.approx(case.spacing[::-1])
    assert image.GetOrigin() == pytest.approx(case.origin)
    assert image.GetDirection() == pytest.approx(case.direction)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), case.label)
    with pytest.raises(ValueError, match=case.case_id):
        case.to_sitk(case.label[:-1])


# --------------------------------------------------------------------------------- intensities

def _tissue_means(case, name, erosion=1):
    mask = case.tissue_map == TISSUES[name]
    if name == "liver":
        mask &= case.label == 1
    core = ndimage.binary_erosion(mask, iterations=erosion) if erosion else mask
    assert core.sum() > 20, f"{name} too small in {case.case_id}"
    return {p: float(a[core].mean()) for p, a in zip(case.phases, case.aligned_images)}


def test_ct_values_per_tissue_and_phase():
    config = PhantomConfig(shape=(32, 128, 128), phases=CT_PHASES, n_lesions_range=(2, 3),
                           lesion_classes=("cyst",))
    for case in generate_cases(3, config, seed=3, progress=False):
        liver, aorta = _tissue_means(case, "liver"), _tissue_means(case, "aorta")
        # The aorta peaks in the arterial phase, the liver in the portal venous phase.
        assert max(aorta, key=aorta.get) == "arterial" and aorta["arterial"] > 200
        assert max(liver, key=liver.get) == "portal_venous"
        assert 35 <= liver["pre_contrast"] <= 75 and 85 <= liver["portal_venous"] <= 150
        assert aorta["pre_contrast"] < 70
        fat = _tissue_means(case, "visceral_fat")
        assert all(-130 <= v <= -60 for v in fat.values())
        air = ndimage.binary_erosion(case.tissue_map == TISSUES["air"], iterations=2)
        assert abs(case.aligned_images[0][air].mean() + 1000) < 3
        spleen = _tissue_means(case, "spleen")
        assert spleen["arterial"] > spleen["pre_contrast"] + 30
        # Cysts: water density and no enhancement in any phase.
        for k, lesion in enumerate(case.lesions):
            core = ndimage.binary_erosion(case.lesion_map == k + 1)
            if core.sum() >= 10:
                means = [float(a[core].mean()) for a in case.aligned_images]
                assert all(-10 <= m <= 40 for m in means), means
                assert max(means) - min(means) < 12


def test_mri_values_per_phase(mri_case):
    liver, aorta = _tissue_means(mri_case, "liver"), _tissue_means(mri_case, "aorta")
    assert mri_case.phases == MRI_PHASES
    assert max(aorta, key=aorta.get) == "arterial" and max(liver, key=liver.get) == "portal_venous"
    assert all(a.min() >= 0 for a in mri_case.aligned_images)  # magnitude images
    assert aorta["arterial"] > 2 * liver["arterial"]


def test_small_grids_still_hold_visible_lesions():
    config = PhantomConfig(shape=(32, 96, 96))
    cases = generate_cases(16, config, seed=21, progress=False)
    with_lesion = [c for c in cases if c.lesions]
    assert 10 <= len(with_lesion) <= 16  # most cases have a lesion, a few none
    for case in with_lesion:
        assert case.lesions[0].n_voxels >= 30
        assert all(les.n_voxels >= 5 for les in case.lesions)
        assert ((case.label == 2) <= (case.label >= 1)).all()


def test_lesion_sizes_span_small_to_large():
    config = PhantomConfig(shape=(48, 192, 192), inplane_spacing_range=(0.9, 1.0), n_lesions_range=(4, 4),
                           lesion_diameter_range_mm=(6, 70), noise_sigma=0, motion_mm=0, motion_deg=0)
    diameters = [les.diameter_mm for i in range(3) for les in generate_case(config, 2, i, "x").lesions]
    assert min(diameters) < 10 and max(diameters) > 40, diameters


# --------------------------------------------------------------------------------------- motion

def test_configured_motion_is_present_and_invertible():
    config = PhantomConfig(shape=(32, 96, 96), motion_mm=4.0, motion_deg=2.0, noise_sigma=0.0)
    case = generate_case(config, 4, 0, "moving")
    ref = case.reference_index
    interior = (slice(4, -4), slice(10, -10), slice(10, -10))
    for k, phase in enumerate(case.phases):
        if k == ref:
            continue
        shift = np.linalg.norm(case.motion[k]["translation_mm"])
        assert 0.3 * 4.0 - 1e-6 <= shift <= 4.0 + 1e-6
        assert max(abs(a) for a in case.motion[k]["rotation_deg"]) <= 2.0
        acquired, aligned = case.images[k], case.aligned_images[k]
        before = np.abs(acquired - aligned)[interior].mean()
        # Resampling the acquired phase with the recorded transform (reference -> phase frame,
        # what registration would find) brings it back onto the reference frame.
        moving = case.to_sitk(acquired)
        restored = sitk.GetArrayFromImage(sitk.Resample(moving, moving, case.motion_transform(phase),
                                                        sitk.sitkLinear, -1000.0))
        after = np.abs(restored - aligned)[interior].mean()
        assert before > 10 and after < 0.35 * before, (phase, before, after)


def test_no_motion_when_disabled():
    case = generate_case(PhantomConfig(shape=SMALL, motion_mm=0, motion_deg=0), 1, 0, "still")
    for a, b in zip(case.images, case.aligned_images):
        np.testing.assert_array_equal(a, b)


def test_motion_transform_matches_record(ct_cases):
    case = ct_cases[1]
    t = euler_transform(case.motion[0])
    assert t.GetTranslation() == pytest.approx(case.motion[0]["translation_mm"])
    assert np.rad2deg([t.GetAngleX(), t.GetAngleY(), t.GetAngleZ()]) == pytest.approx(case.motion[0]["rotation_deg"])


# ------------------------------------------------------------------------- kinetics decide the class

@pytest.fixture(scope="module")
def lesion_table():
    """Per-lesion mean intensity per phase, from the ground-truth masks on the aligned images."""
    cases = generate_cases(40, PhantomConfig(shape=(32, 96, 96)), seed=2024, progress=False)
    features, classes = [], []
    for case in cases:
        for k, lesion in enumerate(case.lesions):
            mask = case.lesion_map == k + 1
            features.append([float(a[mask].mean()) for a in case.aligned_images])
            classes.append(lesion.class_name)
    return np.asarray(features), np.asarray(classes), cases[0].phases


def _cv_auc(features, target, scoring):
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=0)
    return float(cross_val_score(model, features, target, cv=folds, scoring=scoring).mean())


def test_hcc_vs_hemangioma_needs_the_dynamics(lesion_table):
    features, classes, phases = lesion_table
    pair = np.isin(classes, ("HCC", "hemangioma"))
    target = (classes[pair] == "HCC").astype(int)
    assert min(target.sum(), (1 - target).sum()) >= 8, "too few lesions of one class for a 5-fold AUC"
    all_phases = _cv_auc(features[pair], target, "roc_auc")
    pv = phases.index(REFERENCE_PHASE)
    pv_only = _cv_auc(features[pair][:, [pv]], target, "roc_auc")
    assert all_phases >= 0.95, all_phases
    assert pv_only <= 0.75, pv_only


def test_all_classes_from_all_phases(lesion_table):
    features, classes, _ = lesion_table
    assert set(classes) == set(LESION_CLASSES)
    macro = _cv_auc(features, classes, "roc_auc_ovr")
    assert macro >= 0.95, macro


def test_hcc_washes_out_and_the_liver_native_density_varies_by_case():
    """Guards against an HCC without portal/delayed washout (the pattern that tells it from other classes) and
    against the per-case steatosis offset landing on another tissue than the liver."""
    from nnunet_liver_ext.phantom.kinetics import CT_TISSUE_VALUES, lesion_compartments, tissue_table

    liver, blood = np.array(CT_TISSUE_VALUES["liver"], float), np.array(CT_TISSUE_VALUES["aorta"], float)
    for seed in range(20):
        core = lesion_compartments("HCC", "CT", liver, blood, np.random.default_rng(seed), False)["core"]
        assert core[1] > liver[1] and core[3] < liver[3]
    from nnunet_liver_ext.phantom import TISSUES
    native = [tissue_table("CT", np.random.default_rng(seed))[TISSUES["liver"], 0] for seed in range(40)]
    assert max(native) - min(native) > 10  # uniform(-10, 8) HU of steatosis, beyond the +-3 HU jitter


def test_the_arterial_timing_varies_the_arterial_phase_alone():
    """Guards against the per-case arterial timing scaling another phase's enhancement than the arterial one."""
    from nnunet_liver_ext.phantom import TISSUES
    from nnunet_liver_ext.phantom.kinetics import CT_TISSUE_VALUES, tissue_table

    aorta, ivc = CT_TISSUE_VALUES["aorta"], CT_TISSUE_VALUES["ivc"]
    portal, arterial = [], []
    for seed in range(10):
        t = tissue_table("CT", np.random.default_rng(seed))
        enhancement = lambda tissue, phase: t[TISSUES[tissue], phase] - t[TISSUES[tissue], 0]  # noqa: E731
        portal.append(enhancement("aorta", 2) / enhancement("ivc", 2))
        arterial.append(enhancement("aorta", 1) / enhancement("ivc", 1))
    # the bolus scales both vessels alike; the timing scales the aorta's arterial peak only
    np.testing.assert_allclose(portal, (aorta[2] - aorta[0]) / (ivc[2] - ivc[0]), rtol=1e-4)
    assert np.ptp(arterial) > 0.1
