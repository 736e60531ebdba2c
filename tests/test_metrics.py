"""Every metric against an independent implementation (MONAI, medpy, sklearn, scikit-image)
and against hand-computed answers, anisotropic spacing and empty masks included."""
import json
import math
import warnings

import numpy as np
import pytest
import torch

from nnunet_liver_ext.evaluation import characterization, lesions, metrics

monai_metrics = pytest.importorskip("monai.metrics")
medpy_binary = pytest.importorskip("medpy.metric.binary")
sk_metrics = pytest.importorskip("sklearn.metrics")

# MONAI 1.6 warns about one of its own deprecated defaults on every surface call
pytestmark = pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")

ANISO = (2.5, 0.8, 0.6)  # (z, y, x): thick slices, like a clinical CT


def _onehot(mask):
    return torch.from_numpy(mask[None, None].astype(np.float32))


def _monai_hd95(pred, ref, spacing):
    return float(monai_metrics.compute_hausdorff_distance(_onehot(pred), _onehot(ref), include_background=True,
                                                          percentile=95, spacing=list(spacing))[0, 0])


def _monai_assd(pred, ref, spacing):
    return float(monai_metrics.compute_average_surface_distance(_onehot(pred), _onehot(ref), include_background=True,
                                                                symmetric=True, spacing=list(spacing))[0, 0])


def _ellipsoid(shape, center, radii_mm, spacing):
    grid = np.indices(shape).astype(float)
    d = sum(((grid[i] - center[i]) * spacing[i] / radii_mm[i]) ** 2 for i in range(3))
    return d <= 1.0


@pytest.fixture(scope="module")
def blob_pair():
    """Two overlapping, differently shaped blobs on an anisotropic grid (z, y, x)."""
    shape = (24, 48, 52)
    ref = _ellipsoid(shape, (11, 22, 25), (18, 12, 10), ANISO)
    pred = _ellipsoid(shape, (12.4, 24, 23), (14, 13, 12), ANISO)
    pred[3:6, 5:9, 5:8] = True  # a distant false-positive island stretches the tail
    return pred, ref


# --- hand-computed row: everything of the (1, 1, N) strip is boundary ----------------------

def _strip():
    ref = np.zeros((1, 1, 30), bool)
    ref[0, 0, :10] = True
    pred = np.zeros_like(ref)
    pred[0, 0, :15] = True  # 5 voxels of over-segmentation, x spacing 2 mm
    return pred, ref, (1.0, 1.0, 2.0)


def test_known_answers_on_a_strip():
    pred, ref, spacing = _strip()
    m = metrics.region_metrics(pred, ref, spacing)
    # d(P->R) = 0 x10, 2, 4, 6, 8, 10 mm ; d(R->P) = 0 x10
    assert m["dice"] == pytest.approx(2 * 10 / 25)
    assert m["iou"] == pytest.approx(10 / 15)
    assert m["voe"] == pytest.approx(5 / 15)
    assert m["rvd"] == pytest.approx(0.5)
    assert m["precision"] == pytest.approx(10 / 15) and m["recall"] == 1.0
    assert m["assd_mm"] == pytest.approx(30 / 25)  # pooled: sum / (15 + 10)
    # directed 95th percentile of 15 values, linear interpolation at rank 13.3: 8 + 0.3 * 2
    assert m["hd95_mm"] == pytest.approx(8.6)
    assert m["pred_volume_ml"] == pytest.approx(15 * 2 / 1000)


def test_pooled_versus_directed_definitions_differ_and_we_use_the_stated_ones():
    """ASSD: MONAI's symmetric ASD concatenates both directions (pooled, like LiTS and medpy
    0.5's assd), which is 30/25 = 1.2 mm here, whereas the mean of the two directed means
    (used by some papers) gives (30/15 + 0/10) / 2 = 1.0 mm: the pooled mean weights each
    surface by its voxel count. HD95: MONAI takes the max of the two directed 95th
    percentiles (8.6 mm); medpy's hd95 takes the 95th percentile of the pooled distances
    (rank 22.8 of 25 -> 6 + 0.8 * 2 = 7.6 mm). Ours follows MONAI / Metrics Reloaded."""
    pred, ref, spacing = _strip()
    ours = metrics.surface_metrics(pred, ref, spacing)
    d_pr, d_rp = metrics.directed_surface_distances(pred, ref, spacing)
    assert ours["assd_mm"] == pytest.approx(_monai_assd(pred, ref, spacing), abs=1e-5) == pytest.approx(1.2)
    assert ours["assd_mm"] == pytest.approx(medpy_binary.assd(pred, ref, spacing))
    assert (d_pr.mean() + d_rp.mean()) / 2 == pytest.approx(1.0)
    assert ours["hd95_mm"] == pytest.approx(_monai_hd95(pred, ref, spacing), abs=1e-5) == pytest.approx(8.6)
    assert medpy_binary.hd95(pred, ref, spacing) == pytest.approx(7.6)


def test_surface_metrics_match_monai_and_medpy_on_anisotropic_blobs(blob_pair):
    pred, ref = blob_pair
    ours = metrics.surface_metrics(pred, ref, ANISO)
    assert ours["hd95_mm"] == pytest.approx(_monai_hd95(pred, ref, ANISO), rel=1e-5)
    assert ours["assd_mm"] == pytest.approx(_monai_assd(pred, ref, ANISO), rel=1e-5)
    assert ours["assd_mm"] == pytest.approx(medpy_binary.assd(pred, ref, ANISO, connectivity=1), rel=1e-9)
    # the stretched tail makes the two HD95 definitions disagree on a realistic shape too
    assert ours["hd95_mm"] != pytest.approx(medpy_binary.hd95(pred, ref, ANISO), rel=1e-3)
    # spacing is in array order: giving it as SimpleITK's (x, y, z) changes the answer
    assert metrics.surface_metrics(pred, ref, ANISO[::-1])["hd95_mm"] != pytest.approx(ours["hd95_mm"], rel=1e-3)


def test_surface_dice_matches_monai(blob_pair):
    pred, ref = blob_pair
    for tol in (0.0, 1.0, 2.5):
        ours = metrics.surface_metrics(pred, ref, ANISO, surface_dice_tolerances_mm=(tol,))[metrics.nsd_key(tol)]
        theirs = float(monai_metrics.compute_surface_dice(_onehot(pred), _onehot(ref), class_thresholds=[tol],
                                                          include_background=True, spacing=list(ANISO))[0, 0])
        assert ours == pytest.approx(theirs, abs=1e-6)
    loose = metrics.surface_metrics(pred, ref, ANISO, surface_dice_tolerances_mm=(1e3,))
    assert loose[metrics.nsd_key(1e3)] == 1.0


def test_overlap_metrics_match_medpy_and_sklearn(blob_pair):
    pred, ref = blob_pair
    m = metrics.overlap_metrics(pred, ref)
    assert m["dice"] == pytest.approx(medpy_binary.dc(pred, ref))
    assert m["dice"] == pytest.approx(sk_metrics.f1_score(ref.ravel(), pred.ravel()))
    assert m["iou"] == pytest.approx(sk_metrics.jaccard_score(ref.ravel(), pred.ravel()))
    assert m["voe"] == pytest.approx(1 - m["iou"])
    assert m["precision"] == pytest.approx(sk_metrics.precision_score(ref.ravel(), pred.ravel()))
    assert m["recall"] == pytest.approx(sk_metrics.recall_score(ref.ravel(), pred.ravel()))
    assert m["rvd"] == pytest.approx(medpy_binary.ravd(pred, ref))  # signed (|P| - |R|) / |R|
    under = metrics.overlap_metrics(ref & ~pred, ref)
    assert under["rvd"] < 0


def test_cube_shift_with_anisotropic_spacing_has_hand_computable_hd95():
    """A cube shifted by 2 slices along z (2.5 mm each): every boundary voxel that is not
    on the shared part is at most 5 mm away; the directed 95th percentile reaches 5 mm only
    if more than 5 % of the boundary is on the moved faces."""
    ref = np.zeros((20, 20, 20), bool)
    ref[4:12, 5:15, 5:15] = True
    pred = np.roll(ref, 2, axis=0)
    m = metrics.surface_metrics(pred, ref, ANISO)
    d_pr, d_rp = metrics.directed_surface_distances(pred, ref, ANISO)
    assert d_pr.max() == pytest.approx(5.0) and d_rp.max() == pytest.approx(5.0)
    assert m["hd95_mm"] == pytest.approx(_monai_hd95(pred, ref, ANISO), rel=1e-6)
    assert m["hd95_mm"] == pytest.approx(max(np.percentile(d_pr, 95), np.percentile(d_rp, 95)))
    assert metrics.overlap_metrics(pred, ref)["dice"] == pytest.approx(6 / 8)


def test_empty_mask_policy_matches_its_documented_table():
    empty = np.zeros((5, 6, 7), bool)
    full = empty.copy()
    full[1:4, 2:5, 2:5] = True
    both = metrics.region_metrics(empty, empty, ANISO, (1.0,))
    ref_empty = metrics.region_metrics(full, empty, ANISO, (1.0,))
    pred_empty = metrics.region_metrics(empty, full, ANISO, (1.0,))
    assert (both["status"], ref_empty["status"], pred_empty["status"]) == ("both_empty", "ref_empty", "pred_empty")

    column_of = {"Dice, IoU": ("dice", "iou"), "VOE": ("voe",), "RVD": ("rvd",), "precision": ("precision",),
                 "recall": ("recall",), "ASSD, HD95": ("assd_mm", "hd95_mm"), "surface Dice": ("nsd_1mm",)}
    for name, *texts in metrics.EMPTY_MASK_POLICY:
        for text, result in zip(texts, (both, ref_empty, pred_empty)):
            expected = math.nan if text.startswith("NaN") else float(text)
            for key in column_of[name]:
                got = result[key]
                assert (math.isnan(got) if math.isnan(expected) else got == expected), (name, text, key, got)
    # MONAI answers one-empty cases with inf/nan as well (with a warning): no silent 0 anywhere
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert not np.isfinite(_monai_hd95(full, empty, ANISO))


def test_label_map_regions_keep_both_liver_definitions_apart():
    ref = np.zeros((10, 12, 12), np.uint8)
    ref[2:8, 2:10, 2:10] = 1
    ref[4:6, 4:6, 4:6] = 2
    pred = ref.copy()
    pred[pred == 2] = 1  # tumor called liver: region {1,2} perfect, label 1 alone is not
    out = metrics.segmentation_metrics(pred, ref, ANISO)
    assert out["liver_region_dice"] == 1.0
    assert out["liver_label1_dice"] < 1.0
    assert out["tumor_status"] == "pred_empty" and out["tumor_dice"] == 0.0
    assert set(metrics.metric_columns(metrics.DEFAULT_REGIONS)) <= set(out)
    assert metrics.regions_from_labels({"background": 0, "liver": 1, "tumor": 2}) == metrics.DEFAULT_REGIONS
    other = metrics.regions_from_labels({"background": 0, "lesion": 1})
    assert [r.labels for r in other] == [(1,)]


@pytest.mark.parametrize("tumor_name", ["cancer", "lesion"])
def test_liver_with_a_tumor_named_otherwise_gets_both_liver_definitions(tumor_name):
    """nnU-Net's own MSD Task03 conversion keeps 'cancer': label 1 alone must not be reported as 'liver'."""
    regions = metrics.regions_from_labels({"background": 0, "liver": 1, tumor_name: 2})
    assert [(r.key, r.labels) for r in regions] == [("liver_region", (1, 2)), ("liver_label1", (1,)), ("tumor", (2,))]
    assert regions[2].display == f"{tumor_name} (label 2)"


def test_bad_arguments_are_rejected():
    a = np.zeros((4, 4, 4), bool)
    with pytest.raises(ValueError, match="shape"):
        metrics.overlap_metrics(a, np.zeros((4, 4, 5), bool))
    with pytest.raises(ValueError, match="array axis order"):
        metrics.surface_metrics(a, a, (1.0, 1.0))
    with pytest.raises(ValueError, match="positive"):
        metrics.surface_metrics(a, a, (1.0, 0.0, 1.0))



# --- unannotated voxels (nnU-Net's ignore label) -------------------------------------------

def _brute_force_boundary(mask, unannotated):
    """A voxel of the mask is boundary when a face neighbour is outside the array or annotated background."""
    padded = np.pad(mask | unannotated, 1, constant_values=False)
    inner = tuple(slice(1, -1) for _ in mask.shape)
    interior = np.ones_like(mask)
    for axis in range(mask.ndim):
        for step in (-1, 1):
            interior &= np.roll(padded, step, axis)[inner]
    return mask & ~interior


def _brute_force_surface_metrics(pred, ref, spacing, unannotated, tolerance):
    from scipy.spatial.distance import cdist

    scale = np.asarray(spacing)
    p = np.argwhere(_brute_force_boundary(pred & ~unannotated, unannotated)) * scale
    r = np.argwhere(_brute_force_boundary(ref & ~unannotated, unannotated)) * scale
    d = cdist(p, r)
    d_pr, d_rp = d.min(1), d.min(0)
    pooled = np.concatenate([d_pr, d_rp])
    return dict(assd_mm=pooled.mean(), hd95_mm=max(np.percentile(d_pr, 95), np.percentile(d_rp, 95)),
                nsd=np.mean(pooled <= tolerance + 1e-6))


@pytest.mark.parametrize("seed", range(4))
def test_observable_surfaces_match_a_brute_force_neighbour_count(seed):
    """With unannotated voxels, a boundary voxel is one next to annotated background or the array edge, and the
    distances between those boundaries are the brute-force nearest neighbours."""
    rng = np.random.default_rng(seed)
    shape = (9, 12, 11)
    unannotated = np.zeros(shape, bool)
    unannotated[6:] = True                      # the top slices...
    unannotated[:, :, :2] = rng.random((9, 12, 2)) < 0.5  # ...and a ragged margin
    ref, pred = _ellipsoid(shape, (5, 6, 5), (8, 10, 9), ANISO), _ellipsoid(shape, (4, 6, 6), (7, 9, 8), ANISO)
    ref ^= rng.random(shape) < 0.05
    pred ^= rng.random(shape) < 0.05
    for mask in (pred, ref):
        assert np.array_equal(metrics.boundary(mask & ~unannotated, unannotated),
                              _brute_force_boundary(mask & ~unannotated, unannotated))
    ours = metrics.surface_metrics(pred, ref, ANISO, (1.0,), unannotated=unannotated)
    expected = _brute_force_surface_metrics(pred, ref, ANISO, unannotated, 1.0)
    assert ours["assd_mm"] == pytest.approx(expected["assd_mm"])
    assert ours["hd95_mm"] == pytest.approx(expected["hd95_mm"])
    assert ours[metrics.nsd_key(1.0)] == pytest.approx(expected["nsd"])


def test_where_the_annotation_stops_is_no_surface():
    """Both masks cut by an unannotated slab: the cut is no surface on which they agree. A prediction one voxel
    too thin everywhere it is observable has surface Dice 0 at tolerance 0, not the share of the cut face."""
    shape = (20, 20, 20)
    unannotated = np.zeros(shape, bool)
    unannotated[10:] = True
    ref = np.zeros(shape, bool)
    ref[1:, 5:15, 5:15] = True  # a column through the cut
    pred = np.zeros(shape, bool)
    pred[2:, 6:14, 6:14] = True  # one voxel inside ref on every observable side
    spacing = (1.0, 1.0, 1.0)
    ours = metrics.surface_metrics(pred, ref, spacing, (0.0,), unannotated=unannotated)
    assert ours[metrics.nsd_key(0.0)] == 0.0
    assert ours["assd_mm"] >= 1.0 and ours["hd95_mm"] <= math.sqrt(2) + 1e-9  # one voxel in, or its diagonal
    # zeroing the unannotated voxels alone makes the cut (z = 9) a shared surface
    cut = metrics.surface_metrics(pred & ~unannotated, ref & ~unannotated, spacing, (0.0,))
    assert cut[metrics.nsd_key(0.0)] > 0.1  # the 2 x 64 voxels of the cut face where pred meets ref
    # the unannotated voxels' content changes nothing, and no unannotated voxel is counted
    region = metrics.region_metrics(pred | unannotated, ref, spacing, (0.0,), unannotated=unannotated)
    assert region[metrics.nsd_key(0.0)] == 0.0 and region["pred_volume_ml"] == pytest.approx(8 * 64 / 1000)
    assert region["dice"] == pytest.approx(2 * 8 * 64 / (8 * 64 + 9 * 100))  # slices z 2-9 and 1-9
    # no unannotated voxel at all: the plain definitions
    assert metrics.surface_metrics(pred, ref, spacing, (0.0,), unannotated=np.zeros(shape, bool)) == \
        metrics.surface_metrics(pred, ref, spacing, (0.0,))


def test_a_mask_without_an_observable_surface_has_no_distances():
    """An annotated pocket inside unannotated voxels that the reference fills has no observable surface: the
    distances are NaN; surface Dice is 0 when the prediction has one there, NaN when neither has."""
    shape = (12, 12, 12)
    unannotated = np.ones(shape, bool)
    unannotated[4:8, 4:8, 4:8] = False
    ref = ~unannotated
    both = metrics.surface_metrics(ref, ref, (1.0, 1.0, 1.0), (1.0,), unannotated=unannotated)
    assert math.isnan(both["assd_mm"]) and math.isnan(both["hd95_mm"]) and math.isnan(both[metrics.nsd_key(1.0)])
    pred = ref.copy()
    pred[5, 5, 5] = False  # a hole: its neighbours are the prediction's observable surface
    one = metrics.surface_metrics(pred, ref, (1.0, 1.0, 1.0), (1.0,), unannotated=unannotated)
    assert math.isnan(one["assd_mm"]) and one[metrics.nsd_key(1.0)] == 0.0
    with pytest.raises(ValueError, match="boundary"):
        metrics.directed_surface_distances(ref, ref, (1.0, 1.0, 1.0), unannotated)

# --- lesions -------------------------------------------------------------------------------

def test_connectivity_is_explicit_and_matches_scikit_image():
    measure = pytest.importorskip("skimage.measure")
    mask = np.zeros((6, 6, 6), bool)
    mask[1, 1, 1] = mask[2, 2, 2] = True  # corner neighbours only
    mask[1, 4, 4] = mask[1, 4, 5] = True  # face neighbours
    mask[4, 1, 4] = mask[4, 2, 5] = True  # edge neighbours
    for connectivity, expected in ((1, 5), (2, 4), (3, 3)):
        _, n = lesions.label_components(mask, connectivity)
        assert n == expected == measure.label(mask, connectivity=connectivity).max()
    with pytest.raises(ValueError, match="connectivity"):
        lesions.label_components(mask, 4)


def test_lesion_detection_at_iou_above_one_half():
    ref = np.zeros((10, 30, 30), bool)
    ref[2:6, 2:6, 2:6] = True   # lesion A, 64 voxels
    ref[2:6, 20:24, 20:24] = True  # lesion B, 64 voxels
    pred = np.zeros_like(ref)
    pred[2:6, 2:6, 2:8] = True   # A: IoU 64/96 = 0.67 -> detected
    pred[2:6, 20:24, 20:22] = True  # B: IoU 32/64 = 0.5 exactly -> not detected
    pred[8:10, 10:12, 10:12] = True  # false positive
    counts, rows = lesions.match_lesions(pred, ref, ANISO, connectivity=3)
    assert counts == dict(lesion_tp=1, lesion_fp=2, lesion_fn=1, n_ref_lesions=2, n_pred_lesions=3)
    refs = [r for r in rows if r["kind"] == "reference"]
    assert [r["detected"] for r in refs] == [True, False]
    assert refs[0]["best_iou"] == pytest.approx(64 / 96) and refs[1]["best_iou"] == pytest.approx(0.5)
    assert refs[1]["lesion_dice"] == pytest.approx(2 * 32 / (64 + 32))
    assert refs[0]["volume_mm3"] == pytest.approx(64 * np.prod(ANISO))
    scores = lesions.detection_scores(1, 2, 1)
    assert scores["lesion_precision"] == pytest.approx(1 / 3) and scores["lesion_recall"] == pytest.approx(0.5)
    assert scores["lesion_f1"] == pytest.approx(sk_metrics.f1_score([1, 1, 0, 0], [1, 0, 1, 1]))
    assert math.isnan(lesions.detection_scores(0, 0, 0)["lesion_recall"])


def test_lesion_dice_of_a_lesion_split_in_two_counts_both_pieces():
    """A lesion predicted as two pieces is scored on both (the union of the touching components), not on the
    larger piece alone."""
    ref = np.zeros((1, 1, 5), bool)
    ref[0, 0, :] = True  # voxels 0-4
    pred = np.zeros_like(ref)
    pred[0, 0, [0, 1, 3, 4]] = True  # two pieces: 0-1 and 3-4
    counts, rows = lesions.match_lesions(pred, ref, (1.0, 1.0, 1.0), connectivity=3)
    assert counts["n_pred_lesions"] == 2
    assert rows[0]["lesion_dice"] == pytest.approx(2 * 4 / (5 + 4))


def test_size_strata_use_the_equivalent_sphere_diameter():
    assert lesions.stratum_labels((10, 20)) == ["<10mm", "10-20mm", ">=20mm"]
    volume_15mm = math.pi / 6 * 15 ** 3
    assert lesions.equivalent_diameter_mm(volume_15mm) == pytest.approx(15)
    assert lesions.size_stratum(15.0) == "10-20mm"
    assert lesions.size_stratum(20.0) == ">=20mm" and lesions.size_stratum(9.99) == "<10mm"
    for bad in ((20, 10), (float("nan"),), (10, float("nan")), (10, float("inf")), ()):
        with pytest.raises(ValueError, match="size strata must be positive and strictly increasing"):
            lesions.stratum_labels(bad)


# --- characterization ----------------------------------------------------------------------

def test_classification_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    y_true = np.array([0, 1, 2, 2, 1, 0, 2, 1, 0, 2, 1, 1])
    logits = rng.normal(size=(12, 3)) + 1.5 * np.eye(3)[y_true]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y_pred = probs.argmax(1)
    out = characterization.classification_metrics(y_true, probs, ["hcc", "metastasis", "cyst"])
    assert out["auc_ovr_macro"] == pytest.approx(sk_metrics.roc_auc_score(y_true, probs, multi_class="ovr"))
    assert out["accuracy"] == pytest.approx(sk_metrics.accuracy_score(y_true, y_pred))
    assert out["balanced_accuracy"] == pytest.approx(sk_metrics.balanced_accuracy_score(y_true, y_pred))
    assert out["f1_weighted"] == pytest.approx(sk_metrics.f1_score(y_true, y_pred, average="weighted"))
    assert out["precision_weighted"] == pytest.approx(
        sk_metrics.precision_score(y_true, y_pred, average="weighted", zero_division=0))
    assert out["recall_weighted"] == pytest.approx(sk_metrics.recall_score(y_true, y_pred, average="weighted"))
    assert np.array_equal(out["confusion_matrix"], sk_metrics.confusion_matrix(y_true, y_pred))
    assert np.asarray(out["confusion_matrix"]).sum() == 12


def test_classification_auc_edge_cases():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    binary = characterization.classification_metrics([0, 1, 1], probs, ["benign", "malignant"])
    assert binary["auc_ovr_macro"] == pytest.approx(sk_metrics.roc_auc_score([0, 1, 1], probs[:, 1]))
    single = characterization.classification_metrics([1, 1, 1], probs, ["benign", "malignant"])
    assert math.isnan(single["auc_ovr_macro"])
    with pytest.raises(ValueError, match="shape"):
        characterization.classification_metrics([0, 1], probs, ["benign", "malignant"])


@pytest.mark.parametrize("classes", [3, 4])
def test_auc_with_a_class_absent_is_one_vs_rest_on_the_raw_columns(classes):
    """A small fold often has no case of some class: each present class is still scored against the rest on
    its own probability column (renormalising the present columns changed the ranking: 0.4 against 0.3)."""
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(classes), size=14)
    y_true = rng.integers(0, 2, size=14)  # classes 0 and 1 only
    out = characterization.classification_metrics(y_true, probs, [f"c{k}" for k in range(classes)])
    expected = np.mean([sk_metrics.roc_auc_score(y_true == c, probs[:, c]) for c in (0, 1)])
    assert out["auc_ovr_macro"] == pytest.approx(expected)


def test_regression_mae_matches_sklearn():
    rng = np.random.default_rng(1)
    true, pred = rng.normal(size=(7, 3)), rng.normal(size=(7, 3))
    out = characterization.regression_metrics(true, pred, ["arterial", "portal_venous", "delayed"])
    assert out["mae_overall"] == pytest.approx(sk_metrics.mean_absolute_error(true, pred))
    per_phase = sk_metrics.mean_absolute_error(true, pred, multioutput="raw_values")
    assert list(out["mae_per_phase"].values()) == pytest.approx(list(per_phase))


def test_relative_curve_mae_ignores_each_case_s_signal_gain():
    """MRI signal carries a per-scan gain that nnU-Net's z-score normalisation removes from the images: the relative
    MAE (curves divided by their first phase) must not change when a case's curves are scaled by its gain."""
    rng = np.random.default_rng(2)
    true = rng.uniform(100, 900, size=(6, 4))
    pred = true * rng.uniform(0.8, 1.2, size=(6, 4))
    gain = rng.uniform(0.5, 2.0, size=(6, 1))
    out = characterization.regression_metrics(true, pred, ["pre", "arterial", "portal_venous", "delay"])
    scaled = characterization.regression_metrics(true * gain, pred * gain, ["pre", "arterial", "portal_venous", "delay"])
    assert scaled["mae_relative_overall"] == pytest.approx(out["mae_relative_overall"])
    assert scaled["mae_overall"] != pytest.approx(out["mae_overall"])  # the raw MAE does change
    expected = np.abs(pred / pred[:, :1] - true / true[:, :1])
    assert out["mae_relative_overall"] == pytest.approx(expected.mean())
    assert out["mae_relative_per_phase"]["pre"] == 0.0  # both ratios are 1 there
    # a scale-only error (the prediction is the truth at another gain) costs nothing relative
    assert characterization.regression_metrics(true, true * gain, None)["mae_relative_overall"] == pytest.approx(0)
    hu = characterization.regression_metrics(true - 500, pred - 500, None)  # CT curves in HU can be <= 0
    assert hu["mae_relative_overall"] is None and "not positive" in hu["relative_note"]


def test_case_json_is_validated(tmp_path):
    good = dict(case="c1", classes=["a", "b"], probabilities=[0.3, 0.7], predicted_class="b", predicted_index=1,
                lesion_voxels=12, enhancement_curve=[1.0, 2.0], phases=["arterial", "delayed"])
    (tmp_path / "c1.json").write_text(json.dumps(good))
    assert characterization.load_case_prediction(tmp_path / "c1.json")["enhancement_curve"] == [1.0, 2.0]
    bad = dict(good, predicted_index=0)
    (tmp_path / "c2.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="c2.json"):
        characterization.load_case_prediction(tmp_path / "c2.json")


def test_a_curve_only_case_json_is_read_without_classes(tmp_path):
    """MTI-Net's segmentation + regression ablation has a curve head and no class head."""
    curve_only = dict(case="c3", classes=[], probabilities=[], predicted_class=None, predicted_index=None,
                      lesion_voxels=5, enhancement_curve=[1.0, 2.0], phases=["arterial", "delayed"])
    (tmp_path / "c3.json").write_text(json.dumps(curve_only))
    read = characterization.load_case_prediction(tmp_path / "c3.json")
    assert read["predicted_index"] is None and read["predicted_class"] is None
    assert read["enhancement_curve"] == [1.0, 2.0]
