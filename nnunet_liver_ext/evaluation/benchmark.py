"""Cross-validation benchmark: collect nnU-Net validation predictions, compute every metric per case.

Inputs follow nnU-Net's layout::

    $nnUNet_results/DatasetXXX_Name/{trainer}__{plans}__{configuration}/fold_{k}/validation/{CASE}{file_ending}
    $nnUNet_preprocessed/DatasetXXX_Name/{splits_final.json, gt_segmentations/, dataset.json}

plus, for our trainers, ``{CASE}.json`` characterization files next to each prediction.

Per-case work (reading both images, all metrics, lesion matching) runs in a
multiprocessing pool; results are cached in ``OUT/.metrics_cache.json`` under a signature of
the prediction, ground-truth and CASE.json files (mtime and size), the case's
characterization truth and the evaluation settings, so a re-run computes only what changed.
Missing folds, missing cases and missing characterization files are collected in a
``Completeness`` record that the report prints; nothing is dropped silently.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from nnunet_liver_ext.dataset_json import ignore_label, named_tumor
from nnunet_liver_ext.errors import UserError
from nnunet_liver_ext.evaluation import lesions as lesion_metrics
from nnunet_liver_ext.evaluation.characterization import load_case_prediction
from nnunet_liver_ext.evaluation.metrics import Region, regions_from_labels, segmentation_metrics
from nnunet_liver_ext.voxels import non_finite_description, short_error, stored_voxels

CACHE_FILE = ".metrics_cache.json"
CACHE_VERSION = 3  # bump whenever a metric's computation changes
BASELINE_TRAINER = "nnUNetTrainer"


@dataclass(frozen=True)
class EvaluationSettings:
    regions: tuple[Region, ...]
    tumor_labels: tuple[int, ...] | None  # label values whose components are lesions; None: no lesion analysis
    connectivity: int = lesion_metrics.DEFAULT_CONNECTIVITY
    size_strata_mm: tuple[float, ...] = lesion_metrics.DEFAULT_SIZE_STRATA_MM
    surface_dice_tolerances_mm: tuple[float, ...] = (2.0,)
    allowed_labels: tuple[int, ...] | None = None  # values a label map may contain; None: unchecked
    labels_assumed: bool = False  # no dataset.json labels: LiTS' are assumed (and enforced)
    # nnU-Net's ignore label: voxels the reference leaves unannotated count for no metric (as in nnU-Net's own
    # evaluation), so a prediction there is neither right nor wrong
    ignore_label: int | None = None

    def fingerprint(self) -> str:
        blob = json.dumps([CACHE_VERSION, asdict(self)], sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()


@dataclass
class CaseTruth:
    """Case-level targets from dataset.json (None where the dataset has none for the case)."""
    class_index: int | None = None
    curve: list[float] | None = None


@dataclass
class CaseJob:
    trainer: str
    fold: int | None
    case: str
    pred_path: str
    gt_path: str
    json_path: str | None
    truth: CaseTruth = field(default_factory=CaseTruth)
    class_names: list[str] | None = None
    phases: list[str] | None = None

    @property
    def key(self) -> str:
        return f"{self.trainer}|{self.fold}|{self.case}"


@dataclass
class Completeness:
    """What was expected and what was found, per trainer. Every list ends up in the report."""
    missing_trainers: list[str] = field(default_factory=list)  # no results folder at all
    missing_folds: dict[str, list[tuple[int, str]]] = field(default_factory=dict)  # trainer -> [(fold, why)]
    missing_cases: dict[str, list[tuple[int | None, str]]] = field(default_factory=dict)  # trainer -> [(fold, case)]
    unexpected_files: dict[str, list[tuple[int | None, str]]] = field(default_factory=dict)
    missing_case_json: dict[str, list[tuple[int | None, str]]] = field(default_factory=dict)
    no_characterization: list[str] = field(default_factory=list)  # trainers that wrote no CASE.json
    cases_without_truth: list[str] = field(default_factory=list)  # no class label in dataset.json

    def add(self, attr: str, trainer: str, item) -> None:
        getattr(self, attr).setdefault(trainer, []).append(item)


@dataclass
class BenchmarkInputs:
    dataset_name: str | None
    configuration: str | None
    plans: str | None
    trainers: list[str]
    baseline: str | None
    folds: list[int] | None
    jobs: list[CaseJob]
    completeness: Completeness
    dataset_json: dict
    settings: EvaluationSettings
    baseline_reason: str = ""  # how the baseline was chosen, for the report


# --- reading ---------------------------------------------------------------------------------

def read_label_map(path: str | Path, case: str) -> tuple[np.ndarray, tuple[float, ...], object]:
    """Label array (z, y, x), spacing in array order, and the SimpleITK image (for geometry)."""
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise ValueError(f"case {case}: cannot read {path}: {str(e).strip().splitlines()[-1]}") from e
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"case {case}: {path} is not a single-channel label map")
    # through SimpleITK a truncated NIfTI file (a killed export) reads as zeros from the cut on, and NaN as 0
    try:
        non_finite = non_finite_description(stored_voxels(str(path), lambda: image))
    except Exception as e:  # noqa: BLE001 - zlib, nibabel and ITK each raise their own kind
        raise ValueError(f"case {case}: cannot read {path}: the voxel data are damaged, the file is truncated or "
                         f"corrupt ({type(e).__name__}: {short_error(e)})") from e
    if non_finite:
        raise ValueError(f"case {case}: {path} holds {non_finite}; not a label map")
    array = sitk.GetArrayFromImage(image)
    if not np.issubdtype(array.dtype, np.integer):
        rounded = np.rint(array)
        if not np.array_equal(rounded, array):
            raise ValueError(f"case {case}: {path} holds non-integer values; not a label map")
        array = rounded.astype(np.int16)
    # SimpleITK's GetSpacing() is (x, y, z); the array is (z, y, x).
    return array, tuple(float(s) for s in image.GetSpacing()[::-1]), image


def _check_geometry(case: str, pred_path: str, gt_path: str, pred_img, gt_img, pred, gt) -> None:
    if pred.shape != gt.shape:
        raise ValueError(f"case {case}: prediction {pred_path} has shape {pred.shape} (z, y, x) but the "
                         f"ground truth {gt_path} has {gt.shape}")
    if not np.allclose(pred_img.GetSpacing(), gt_img.GetSpacing(), rtol=1e-3, atol=1e-4):
        raise ValueError(f"case {case}: spacing of {pred_path} {pred_img.GetSpacing()[::-1]} differs from "
                         f"{gt_path} {gt_img.GetSpacing()[::-1]} (z, y, x)")
    # voxels are compared index by index, so both must lie on one grid in space too (a mask flipped or shifted
    # against the image it was drawn on scores as if it were not); 1e-3 mm and 1e-4 cosine cover NIfTI's float32
    for name, a, b, atol in (("origin", pred_img.GetOrigin(), gt_img.GetOrigin(), 1e-3),
                             ("direction", pred_img.GetDirection(), gt_img.GetDirection(), 1e-4)):
        if not np.allclose(a, b, rtol=1e-5, atol=atol):
            fmt = lambda v: "(" + ", ".join(f"{x:.6g}" for x in v) + ")"  # noqa: E731
            raise ValueError(f"case {case}: {name} of {pred_path} {fmt(a)} differs from {gt_path} {fmt(b)} (x, y, z): "
                             f"the two are not on one grid; resample one onto the other (e.g. the prediction of an "
                             f"image converted with --orient is on that image's grid, not the source mask's)")


def compute_case(job: CaseJob, settings: EvaluationSettings) -> dict:
    """Everything for one case: ``{"row": {...}, "lesions": [...]}`` (plain JSON types)."""
    pred, spacing, pred_img = read_label_map(job.pred_path, job.case)
    gt, gt_spacing, gt_img = read_label_map(job.gt_path, job.case)
    _check_geometry(job.case, job.pred_path, job.gt_path, pred_img, gt_img, pred, gt)
    if settings.allowed_labels is not None:
        for name, arr in ((job.pred_path, pred), (job.gt_path, gt)):
            bad = sorted(set(np.unique(arr).tolist()) - set(settings.allowed_labels))
            if bad:
                whose = ("LiTS' labels (0 background, 1 liver, 2 tumor), assumed without a dataset.json: give yours "
                         "with --dataset-json") if settings.labels_assumed else \
                    f"the dataset's labels {list(settings.allowed_labels)}"
                raise ValueError(f"case {job.case}: {name} contains label values {bad} outside {whose}")
    row: dict = dict(trainer=job.trainer, fold=job.fold if job.fold is not None else "", case=job.case,
                     spacing_zyx="x".join(f"{s:g}" for s in gt_spacing))
    unannotated = None
    if settings.ignore_label is not None:
        unannotated = gt == settings.ignore_label
        pred, gt = np.where(unannotated, 0, pred), np.where(unannotated, 0, gt)
    row.update(segmentation_metrics(pred, gt, gt_spacing, settings.regions, settings.surface_dice_tolerances_mm,
                                    unannotated))
    lesion_rows: list[dict] = []
    if settings.tumor_labels is not None:
        tumor_values = np.asarray(settings.tumor_labels)
        counts, lesion_rows = lesion_metrics.match_lesions(np.isin(pred, tumor_values), np.isin(gt, tumor_values),
                                                           gt_spacing, settings.connectivity, settings.size_strata_mm)
        row.update(counts)
        for lesion in lesion_rows:
            lesion.update(trainer=job.trainer, fold=row["fold"], case=job.case)
    row.update(_characterization_columns(job))
    return {"row": row, "lesions": lesion_rows}


def _characterization_columns(job: CaseJob) -> dict:
    cols: dict = {"char_available": False}
    if job.json_path is None:
        return cols
    pred = load_case_prediction(job.json_path)
    if pred["case"] != job.case:
        raise ValueError(f"case {job.case}: {job.json_path} is for case {pred['case']!r}")
    if pred["classes"]:
        if job.class_names is not None and pred["classes"] != job.class_names:
            raise ValueError(f"case {job.case}: classes {pred['classes']} in {job.json_path} differ from "
                             f"dataset.json's characterization classes {job.class_names}")
        cols.update(char_available=True, pred_class_index=pred["predicted_index"],
                    pred_class=pred["predicted_class"],
                    true_class_index=job.truth.class_index if job.truth.class_index is not None else "",
                    true_class=(pred["classes"][job.truth.class_index] if job.truth.class_index is not None else ""))
        for name, p in zip(pred["classes"], pred["probabilities"]):
            cols[f"prob_{name}"] = p
    curve = pred["enhancement_curve"]
    if curve is not None and job.truth.curve is not None:
        if len(curve) != len(job.truth.curve):
            raise ValueError(f"case {job.case}: {job.json_path} has {len(curve)} curve values but dataset.json's "
                             f"enhancement has {len(job.truth.curve)}")
        phases = job.phases or pred["phases"] or [f"phase_{i}" for i in range(len(curve))]
        for name, p, t in zip(phases, curve, job.truth.curve):
            cols[f"curve_pred_{name}"] = p
            cols[f"curve_true_{name}"] = t
        cols["curve_mae"] = float(np.mean(np.abs(np.asarray(curve) - np.asarray(job.truth.curve))))
    return cols


# --- collecting ------------------------------------------------------------------------------

def settings_from_dataset_json(dataset_json: dict, connectivity: int = lesion_metrics.DEFAULT_CONNECTIVITY,
                               size_strata_mm: Sequence[float] = lesion_metrics.DEFAULT_SIZE_STRATA_MM,
                               surface_dice_tolerances_mm: Sequence[float] = (2.0,)) -> EvaluationSettings:
    labels = dataset_json.get("labels")
    regions = regions_from_labels(labels)
    tumor_labels = None
    allowed = None
    if labels:
        tumor = named_tumor(labels)
        if tumor is not None:
            tumor_labels = tuple(int(v) for v in (tumor if isinstance(tumor, (list, tuple)) else [tumor]))
        allowed = tuple(sorted({int(v) for val in labels.values()
                                for v in (val if isinstance(val, (list, tuple)) else [val])}))
    else:
        # LiTS' labels: a value outside them (an ignore label, a third class) would otherwise score as background
        tumor_labels, allowed = (2,), (0, 1, 2)
    lesion_metrics.stratum_labels(size_strata_mm)  # validates
    return EvaluationSettings(regions=tuple(regions), tumor_labels=tumor_labels, connectivity=int(connectivity),
                              size_strata_mm=tuple(float(s) for s in size_strata_mm),
                              surface_dice_tolerances_mm=tuple(float(t) for t in surface_dice_tolerances_mm),
                              allowed_labels=allowed, labels_assumed=not labels, ignore_label=ignore_label(labels))


def _truth_for(case: str, dataset_json: dict) -> CaseTruth:
    truth = CaseTruth()
    char = dataset_json.get("characterization") or {}
    idx = (char.get("cases") or {}).get(case)
    if idx is not None:
        truth.class_index = int(idx)
    curve = (dataset_json.get("enhancement") or {}).get(case)
    if curve is not None:
        truth.curve = [float(v) for v in curve]
    return truth


def _attach_characterization(job: CaseJob, dataset_json: dict, completeness: Completeness) -> None:
    char = dataset_json.get("characterization") or {}
    job.class_names = list(char["classes"]) if "classes" in char else None
    job.phases = list(dataset_json["phases"]) if dataset_json.get("phases") else None
    job.truth = _truth_for(job.case, dataset_json)
    if job.json_path is not None and job.truth.class_index is None and job.case not in completeness.cases_without_truth:
        completeness.cases_without_truth.append(job.case)


def _file_ending(dataset_json: dict) -> str:
    return dataset_json.get("file_ending", ".nii.gz")


def _case_files(folder: Path, file_ending: str) -> dict[str, Path]:
    return {p.name[: -len(file_ending)]: p for p in sorted(folder.iterdir())
            if p.is_file() and p.name.endswith(file_ending)}


def _env_folder(name: str) -> Path:
    from nnunet_liver_ext.errors import env_folder

    return env_folder(name, "the benchmark reads nnU-Net's folders from it")


def default_baseline(trainers: Sequence[str]) -> tuple[str, str]:
    """The stock nnU-Net trainer on the methods' schedule (``nnUNetTrainer_tiny`` for
    ``nnUNetTrainerSTDNet_tiny``, ``nnUNetTrainer`` for full-length trainers), and why it was chosen.
    Methods on different schedules have no common like-for-like baseline: a UserError."""
    from nnunet_liver_ext.catalogue import is_stock, stock_trainer_for

    methods = [t for t in trainers if not is_stock(t)]
    if not methods:
        return trainers[0], "the first trainer listed (all are stock nnU-Net)"
    wanted: dict[str, list[str]] = {}
    for method in methods:
        wanted.setdefault(stock_trainer_for(method), []).append(method)
    if len(wanted) > 1:
        raise UserError("the trainers run different schedules, so no single stock trainer is their like-for-like "
                        "baseline (" + "; ".join(f"{b} for {', '.join(m)}" for b, m in wanted.items()) + ")",
                        "benchmark each schedule separately, or name the baseline: --baseline "
                        + next(iter(wanted)))
    base = next(iter(wanted))
    return base, f"stock nnU-Net on the same schedule as {', '.join(methods)}"


def _train_command(dataset_name: str, configuration: str, trainer: str, plans: str, folds: Sequence[int],
                   extra: str = "") -> str:
    from nnunet_liver_ext.errors import dataset_id

    cmd = f"nnUNetv2_train {dataset_id(dataset_name)} {configuration} {{}} -tr {trainer} -p {plans}{extra}"
    folds = list(folds)
    if len(folds) == 1:
        return cmd.format(folds[0])
    return f"for f in {' '.join(map(str, folds))}; do {cmd.format('$f')}; done"


def _check_trainers_found(results: Path, dataset_name: str, configuration: str, plans: str, folds: Sequence[int],
                          baseline: str | None, completeness: Completeness, jobs: Sequence[CaseJob]) -> None:
    """A trainer without a results folder is a typo or a run never started, and a baseline without
    predictions leaves the report with no paired tests: both stop with the command that fixes them."""
    missing = completeness.missing_trainers
    if baseline is not None and (baseline in missing or not any(j.trainer == baseline for j in jobs)):
        where = results / f"{baseline}__{plans}__{configuration}"
        whys = completeness.missing_folds.get(baseline, [])
        if baseline in missing:
            what = f"the baseline {baseline} has no results folder {where}"
            fix = _train_command(dataset_name, configuration, baseline, plans, folds)
        elif whys and all("no validation folder" in why for _, why in whys):
            what = f"the baseline {baseline} has no validation predictions in {where} (fold_k/validation missing)"
            fix = _train_command(dataset_name, configuration, baseline, plans, [f for f, _ in whys], " --val") + \
                "   (after training finished: nnU-Net's final validation)"
        else:
            what = f"the baseline {baseline} has no validation predictions for folds {list(folds)} in {where}"
            fix = _train_command(dataset_name, configuration, baseline, plans, [f for f, _ in whys] or folds)
        raise UserError(what + "; a report without it would have no paired tests",
                        fix + "; or choose another baseline with --baseline TRAINER, or none with --baseline none")
    others = [t for t in missing if t != baseline]
    if others:
        trained = sorted(d.name for d in results.glob(f"*__{plans}__{configuration}") if d.is_dir()) \
            if results.is_dir() else []
        trained_names = tuple(name.split("__")[0] for name in trained)
        hints = []
        for t in others:
            close = difflib.get_close_matches(t, [c for c in trained_names if c != t], n=3, cutoff=0.6)
            hints.append(f"{t}: did you mean {', '.join(close)}?" if close else
                         f"{t}: train it ({_train_command(dataset_name, configuration, t, plans, folds)})")
        raise UserError(f"no results folder for {', '.join(others)} under {results} (plans {plans}, configuration "
                        f"{configuration}; trained: {', '.join(trained_names) or 'none'})", "; ".join(hints))


def _check_validation_sets_disjoint(splits: list, folds: Sequence[int], splits_file: Path) -> None:
    """The pooled statistics count each case once: a case in two validation sets (a hand-edited
    splits_final.json; nnU-Net's own splits never overlap) would count twice, and the paired test would
    keep only one of its copies."""
    fold_of: dict[str, int] = {}
    for fold in folds:
        for case in splits[fold]["val"]:
            if case in fold_of:
                where = f"listed twice in fold {fold}'s validation set" if fold_of[case] == fold else \
                    f"in the validation sets of folds {fold_of[case]} and {fold}"
                raise ValueError(f"case {case} is {where} ({splits_file}): the pooled statistics would count it "
                                 f"twice (give each case to one fold, as nnU-Net's splits do)")
            fold_of[case] = fold


def collect_benchmark(dataset: str, configuration: str, trainers: Sequence[str], plans: str = "nnUNetPlans",
                      folds: Sequence[int] = (0, 1, 2, 3, 4), baseline: str | None = None,
                      connectivity: int = lesion_metrics.DEFAULT_CONNECTIVITY,
                      size_strata_mm: Sequence[float] = lesion_metrics.DEFAULT_SIZE_STRATA_MM,
                      surface_dice_tolerances_mm: Sequence[float] = (2.0,)) -> BenchmarkInputs:
    """Find every fold's validation predictions of every trainer and pair them with ground truth.

    ``baseline``: the trainer the others are tested against; None picks stock nnU-Net on the
    methods' schedule (``default_baseline``), "none" means no paired tests. A baseline not in
    ``trainers`` is added to them."""
    from nnunet_liver_ext.errors import resolve_dataset

    if not trainers:
        raise ValueError("no trainer given")
    if len(set(trainers)) != len(trainers):
        raise ValueError(f"trainer list has duplicates: {list(trainers)}")
    if len(set(folds)) != len(folds):  # a case counted twice would narrow every interval
        raise ValueError(f"fold list has duplicates: {list(folds)}")
    trainers = list(trainers)
    dataset_name = resolve_dataset(dataset)
    preprocessed = _env_folder("nnUNet_preprocessed") / dataset_name
    results = _env_folder("nnUNet_results") / dataset_name
    splits_file = preprocessed / "splits_final.json"
    if not splits_file.is_file():
        raise ValueError(f"{splits_file} not found: without nnU-Net's splits the benchmark cannot tell which "
                         f"cases each fold should have (run nnUNetv2_train once, it writes the file)")
    splits = json.loads(splits_file.read_text())
    for f in folds:
        if not 0 <= f < len(splits):
            raise ValueError(f"fold {f} does not exist: {splits_file} has {len(splits)} splits")
    _check_validation_sets_disjoint(splits, folds, splits_file)
    gt_dir = preprocessed / "gt_segmentations"
    if not gt_dir.is_dir():
        raise ValueError(f"ground-truth folder {gt_dir} not found (nnUNetv2_plan_and_preprocess writes it)")
    if baseline is None:
        baseline, baseline_reason = default_baseline(trainers)
    elif baseline.lower() == "none":
        baseline, baseline_reason = None, "none requested (--baseline none)"
    else:
        baseline_reason = "given with --baseline"
    if baseline is not None and baseline not in trainers:
        trainers.insert(0, baseline)
    dataset_json_file = preprocessed / "dataset.json"
    if not dataset_json_file.is_file():
        candidates = [results / f"{t}__{plans}__{configuration}" / "dataset.json" for t in trainers]
        dataset_json_file = next((c for c in candidates if c.is_file()), None)
        if dataset_json_file is None:
            raise ValueError(f"no dataset.json in {preprocessed} nor in any trainer folder under {results}")
    dataset_json = json.loads(Path(dataset_json_file).read_text())
    file_ending = _file_ending(dataset_json)
    settings = settings_from_dataset_json(dataset_json, connectivity, size_strata_mm, surface_dice_tolerances_mm)

    completeness = Completeness()
    jobs: list[CaseJob] = []
    for trainer in trainers:
        trainer_dir = results / f"{trainer}__{plans}__{configuration}"
        if not trainer_dir.is_dir():
            completeness.missing_trainers.append(trainer)
            continue
        trainer_jobs: list[CaseJob] = []
        for fold in folds:
            expected = list(splits[fold]["val"])
            val_dir = trainer_dir / f"fold_{fold}" / "validation"
            if not val_dir.is_dir():
                why = "no fold folder" if not val_dir.parent.is_dir() else \
                    "no validation folder (training not finished, or run without final validation)"
                completeness.add("missing_folds", trainer, (fold, why))
                continue
            found = _case_files(val_dir, file_ending)
            for case in expected:
                if case not in found:
                    completeness.add("missing_cases", trainer, (fold, case))
                    continue
                gt_path = gt_dir / f"{case}{file_ending}"
                if not gt_path.is_file():
                    raise ValueError(f"case {case}: ground truth {gt_path} not found (listed in {splits_file}, "
                                     f"fold {fold})")
                json_path = val_dir / f"{case}.json"
                trainer_jobs.append(CaseJob(trainer, fold, case, str(found[case]), str(gt_path),
                                            str(json_path) if json_path.is_file() else None))
            for case in sorted(set(found) - set(expected)):
                completeness.add("unexpected_files", trainer, (fold, case))
        _finish_characterization(trainer, trainer_jobs, dataset_json, completeness)
        jobs.extend(trainer_jobs)
    _check_trainers_found(results, dataset_name, configuration, plans, folds, baseline, completeness, jobs)
    if not jobs:
        raise ValueError(f"no validation prediction found for any of {trainers} under {results} "
                         f"(plans {plans}, configuration {configuration}, folds {list(folds)})")
    return BenchmarkInputs(dataset_name, configuration, plans, trainers, baseline, list(folds), jobs,
                           completeness, dataset_json, settings, baseline_reason)


def _finish_characterization(trainer: str, jobs: list[CaseJob], dataset_json: dict,
                             completeness: Completeness) -> None:
    if jobs and not any(j.json_path for j in jobs):
        completeness.no_characterization.append(trainer)
        return
    for job in jobs:
        if job.json_path is None:
            completeness.add("missing_case_json", trainer, (job.fold, job.case))
        _attach_characterization(job, dataset_json, completeness)


def collect_folder(pred_dir: str | Path, gt_dir: str | Path, dataset_json: dict | None = None,
                   name: str | None = None, connectivity: int = lesion_metrics.DEFAULT_CONNECTIVITY,
                   size_strata_mm: Sequence[float] = lesion_metrics.DEFAULT_SIZE_STRATA_MM,
                   surface_dice_tolerances_mm: Sequence[float] = (2.0,)) -> BenchmarkInputs:
    """Pair every ground-truth file in gt_dir with the prediction of the same name."""
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    for d in (pred_dir, gt_dir):
        if not d.is_dir():
            raise ValueError(f"{d} is not a folder")
    dataset_json = dict(dataset_json or {})
    file_ending = _file_ending(dataset_json)
    settings = settings_from_dataset_json(dataset_json, connectivity, size_strata_mm, surface_dice_tolerances_mm)
    trainer = name or pred_dir.name
    gts, preds = _case_files(gt_dir, file_ending), _case_files(pred_dir, file_ending)
    if not gts:
        raise ValueError(f"no ground-truth file ending in {file_ending} in {gt_dir}")
    completeness = Completeness()
    jobs = []
    for case, gt_path in gts.items():
        if case not in preds:
            completeness.add("missing_cases", trainer, (None, case))
            continue
        json_path = pred_dir / f"{case}.json"
        jobs.append(CaseJob(trainer, None, case, str(preds[case]), str(gt_path),
                            str(json_path) if json_path.is_file() else None))
    for case in sorted(set(preds) - set(gts)):
        completeness.add("unexpected_files", trainer, (None, case))
    if not jobs:
        raise ValueError(f"no prediction in {pred_dir} has a ground truth of the same name in {gt_dir}")
    _finish_characterization(trainer, jobs, dataset_json, completeness)
    return BenchmarkInputs(None, None, None, [trainer], None, None, jobs, completeness, dataset_json, settings)


# --- computing, with a cache -----------------------------------------------------------------

def _file_signature(path: str | None) -> list | None:
    if path is None:
        return None
    st = os.stat(path)
    return [os.path.abspath(path), st.st_mtime_ns, st.st_size]


def job_signature(job: CaseJob) -> list:
    return [_file_signature(job.pred_path), _file_signature(job.gt_path), _file_signature(job.json_path),
            asdict(job.truth), job.class_names, job.phases]


def _load_cache(path: Path, fingerprint: str) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}  # a damaged cache only costs a recomputation
    if data.get("version") != CACHE_VERSION or data.get("settings") != fingerprint:
        return {}
    return data.get("entries", {})


def _save_cache(path: Path, fingerprint: str, entries: dict) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"version": CACHE_VERSION, "settings": fingerprint, "entries": entries}))
    os.replace(tmp, path)


def _run_job(args: tuple[CaseJob, EvaluationSettings]) -> tuple[str, dict]:
    job, settings = args
    return job.key, compute_case(job, settings)


def compute_all(jobs: Sequence[CaseJob], settings: EvaluationSettings, out_dir: str | Path,
                num_processes: int = 1, progress: bool = True) -> tuple[list[dict], list[dict], dict]:
    """Per-case rows and lesion rows for all jobs, reusing cached results whose files are unchanged.

    Returns (rows, lesion_rows, stats) with stats = {"computed": n, "cached": m}. Rows come
    back in job order, so outputs do not depend on the pool's scheduling.
    """
    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_path = out_dir / CACHE_FILE
    fingerprint = settings.fingerprint()
    cached = _load_cache(cache_path, fingerprint)
    entries: dict = {}
    todo: list[CaseJob] = []
    for job in jobs:
        signature = json.loads(json.dumps(job_signature(job)))
        hit = cached.get(job.key)
        if hit is not None and hit.get("signature") == signature:
            entries[job.key] = hit
        else:
            todo.append(job)
    signatures = {job.key: json.loads(json.dumps(job_signature(job))) for job in todo}
    try:
        if todo:
            work = [(job, settings) for job in todo]
            bar = tqdm(total=len(todo), desc="evaluating cases", disable=not progress, unit="case")
            if num_processes > 1 and len(todo) > 1:
                import multiprocessing

                ctx = multiprocessing.get_context("spawn")
                with ctx.Pool(min(num_processes, len(todo))) as pool:
                    for key, result in pool.imap_unordered(_run_job, work):
                        entries[key] = dict(signature=signatures[key], **result)
                        bar.update()
            else:
                for item in work:
                    key, result = _run_job(item)
                    entries[key] = dict(signature=signatures[key], **result)
                    bar.update()
            bar.close()
    finally:
        # Whatever finished is kept, so an interrupted or failed run resumes where it stopped;
        # entries of cases no longer in the job list are kept too (other fold selections).
        merged = dict(cached)
        merged.update(entries)
        _save_cache(cache_path, fingerprint, merged)
    rows, lesion_rows = [], []
    for job in jobs:
        entry = entries[job.key]
        rows.append(entry["row"])
        lesion_rows.extend(entry["lesions"])
    return rows, lesion_rows, {"computed": len(todo), "cached": len(jobs) - len(todo)}


def finite(values: Iterable) -> np.ndarray:
    """Float array of the finite values (NaN marks an undefined metric, see the policy)."""
    arr = np.asarray([v for v in values if v != "" and v is not None], dtype=float)
    return arr[np.isfinite(arr)]
