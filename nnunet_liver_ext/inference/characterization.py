"""Characterization-aware prediction on top of nnU-Net's ``nnUNetPredictor``.

Sliding-window prediction sees patches; characterization is per case. For every patch the
network's heads are evaluated together with the segmentation (``net(x, heads=True)``, with the
same mirroring as the segmentation), and the patch's class logits (and enhancement curve) are
averaged with weights equal to the number of voxels inside the patch that the pass's segmentation
calls lesion (argmax = tumor, after nnU-Net has combined the overlapping patches). Counting voxels
rather than summing soft probabilities keeps the weights independent of calibration: two million
background voxels at p = 1e-4 add nothing, where as a soft mass they outweighed a cleanly
segmented 512-voxel lesion and flipped the case's class. Counting them in the combined
segmentation rather than in each patch's own keeps a patch's low-weight border guess, which the
Gaussian-weighted combination overrules, from steering the class or declaring a lesion that the
written segmentation does not have. Folds are combined like nnU-Net combines them (mean of
logits), over the folds whose segmentation found a lesion.

When no fold predicts any lesion voxel, the heads still give probabilities (the unweighted mean
over patches), but they do not describe a lesion: ``lesion_detected`` is false, ``aggregation``
says ``no_lesion_uniform``, and the CSV carries the same two columns. ``lesion_detected`` follows the
written segmentation where the heads' pass disagrees with it (the mean of the folds, the resampling
to the image's spacing or, in the end-of-training validation, nnU-Net's mirroring can remove a lesion
or make one); ``aggregation`` then says so.

Written next to each ``CASE.nii.gz``: ``CASE.json`` with
``{"case", "classes", "probabilities", "predicted_class", "predicted_index", "lesion_detected",
"lesion_voxels", "enhancement_curve", "phases", "aggregation"}``; and one ``characterization.csv``
per folder. ``lesion_voxels`` is the tumor voxel count of the segmentation file written beside it
(read back after nnU-Net's export, so the two always agree).
"""
from __future__ import annotations

import csv
import hashlib
import itertools
import json
import os
import tempfile
from dataclasses import dataclass
from typing import Iterable, List, Optional

import numpy as np
import torch
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from filelock import FileLock
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.label_handling.label_handling import convert_labelmap_to_one_hot

from nnunet_liver_ext.dataset_json import named_tumor
from nnunet_liver_ext.networks.contract import NetworkOutput, unwrap_network
from nnunet_liver_ext.training.multitask_trainer import lesion_output, tumor_label_value
from nnunet_liver_ext.training.plans import PLANS_KEY, liver_ext_block, trained_case_heads

CSV_NAME = "characterization.csv"


@dataclass
class CaseCharacterization:
    case: str
    classes: List[str]
    probabilities: List[float]
    lesion_detected: bool
    lesion_voxels: Optional[int]
    enhancement_curve: Optional[List[float]]
    phases: Optional[List[str]]
    aggregation: str

    @property
    def predicted_index(self) -> Optional[int]:
        return int(np.argmax(self.probabilities)) if self.probabilities else None

    @property
    def predicted_class(self) -> Optional[str]:
        return self.classes[self.predicted_index] if self.probabilities else None

    def to_json(self) -> dict:
        result = {"case": self.case, "classes": self.classes, "probabilities": self.probabilities,
                  "predicted_class": self.predicted_class, "predicted_index": self.predicted_index,
                  "lesion_detected": self.lesion_detected, "lesion_voxels": self.lesion_voxels,
                  "enhancement_curve": self.enhancement_curve, "phases": self.phases,
                  "aggregation": self.aggregation}
        if self.aggregation.endswith(NOT_WRITTEN):
            result["note"] = ("the written segmentation has no lesion: the probabilities describe the lesion that "
                              "the heads' pass found at the network's resolution, which the written segmentation "
                              "lost (to the mean of the folds, the resampling to the image's spacing, or in "
                              "fold_X/validation to nnU-Net's mirroring, which the heads' pass there skips)")
        elif self.aggregation.endswith(ONLY_WRITTEN):
            result["note"] = ("the written segmentation has a lesion that the heads' pass did not find at the "
                              "network's resolution (the mean of the folds, the resampling to the image's spacing "
                              "or nnU-Net's mirroring made it): the probabilities are the mean over all patches "
                              "and do not describe it")
        elif not self.lesion_detected:
            result["note"] = ("no lesion was segmented: the probabilities are the mean over all patches and do "
                              "not describe a lesion")
        return result


AGGREGATION_LESION = "predicted_lesion_voxels"
AGGREGATION_NO_LESION = "no_lesion_uniform"
#: appended to ``aggregation`` when ``lesion_detected`` follows the written segmentation against the heads' pass:
#: the folds found a lesion that the written segmentation does not have, or the reverse
NOT_WRITTEN = " (not in the written segmentation)"
ONLY_WRITTEN = " (a lesion only in the written segmentation)"


class CharacterizationPredictor(nnUNetPredictor):
    """``nnUNetPredictor`` that also aggregates the case-level heads of our networks."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._patch_records: list = []
        self._patch_slicers: list = []
        self._fold_records: list = []
        self.last_case: Optional[dict] = None
        # every CASE.json written by this predictor, in order: the caller's table of the run
        self.written_results: List[CaseCharacterization] = []

    # --- what the plans say about the heads
    @property
    def case_classes(self) -> List[str]:
        return list(liver_ext_block(self.plans_manager.plans).get("case_classes") or [])

    @property
    def case_heads(self) -> List[str]:
        """The case-level heads the trained network has (``training.plans.trained_case_heads``)."""
        return trained_case_heads(self.plans_manager.plans)

    def no_heads_reason(self) -> str:
        """Why this model writes no CASE.json, in the user's terms."""
        plans = self.plans_manager.plans
        if PLANS_KEY not in plans:
            return (f"{self.trainer_name} is not one of this package's multi-task trainers, so its network has no "
                    f"characterization head")
        if not liver_ext_block(plans).get("method_case_heads", ["cls"]):
            return f"{self.trainer_name} is a segmentation-only method (no case-level heads)"
        return (f"the dataset {plans.get('dataset_name')} that {self.trainer_name} was trained on has no "
                f"'characterization' labels (nor 'enhancement' curves) in its dataset.json, so no head was built")

    # --- per patch
    @torch.inference_mode()
    def _internal_maybe_mirror_and_predict(self, x: torch.Tensor) -> torch.Tensor:
        if not self.case_heads:
            return super()._internal_maybe_mirror_and_predict(x)
        mirror_axes = self.allowed_mirroring_axes if self.use_mirroring else None
        out: NetworkOutput = self.network(x, heads=True)
        seg = out.seg
        cls = out.cls_logits.float() if out.cls_logits is not None else None
        curve = out.curve.float() if out.curve is not None else None
        combos = []
        if mirror_axes is not None:
            assert max(mirror_axes) <= x.ndim - 3, "mirror_axes does not match the dimension of the input!"
            axes = [m + 2 for m in mirror_axes]
            combos = [c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)]
        for flip_axes in combos:
            o = self.network(torch.flip(x, flip_axes), heads=True)
            seg = seg + torch.flip(o.seg, flip_axes)
            if cls is not None:
                cls = cls + o.cls_logits.float()
            if curve is not None:
                curve = curve + o.curve.float()
        n = len(combos) + 1
        # kept on the device: the pass is not synchronised per patch
        self._patch_records.append((cls[0] / n if cls is not None else None,
                                    curve[0] / n if curve is not None else None))
        return seg / n

    # --- one attempt at a sliding-window pass
    @torch.inference_mode()
    def _internal_predict_sliding_window_return_logits(self, data: torch.Tensor, slicers, do_on_device: bool = True):
        # nnU-Net retries the whole pass with results on the CPU after a RuntimeError (out of memory):
        # the failed attempt's patch records must not count twice
        self._patch_records = []
        self._patch_slicers = slicers  # in the order nnU-Net predicts the patches
        return super()._internal_predict_sliding_window_return_logits(data, slicers, do_on_device)

    # --- per fold (one sliding-window pass)
    @torch.inference_mode()
    def predict_sliding_window_return_logits(self, input_image: torch.Tensor):
        self._patch_records = []
        logits = super().predict_sliding_window_return_logits(input_image)
        if self.case_heads:
            self._fold_records.append(self._aggregate_patches(self._patch_records, self._patch_lesion_voxels(logits)))
        return logits

    def _patch_lesion_voxels(self, logits: torch.Tensor) -> torch.Tensor:
        """``(P,)`` float64: for each patch of the pass, the voxels inside it that the pass's segmentation
        calls lesion. ``logits`` ``(K, *S)``: the pass's output, the patches combined as nnU-Net combines them."""
        tumor, activation = lesion_output(self.label_manager, self.dataset_json)
        # as nnU-Net turns the logits into the written segmentation: argmax of labels, a region above 0.5
        lesion = (logits[tumor] > 0) if activation == "sigmoid" else argmax_is(logits, tumor)
        # The slicers are the padded image's. nnU-Net pads only an axis shorter than the patch, which then has
        # one tile, from 0 to the patch size: on the unpadded mask that slice is the whole axis.
        return torch.stack([lesion[s[1:]].sum() for s in self._patch_slicers]).double().cpu()

    @staticmethod
    def _aggregate_patches(records, voxels: torch.Tensor) -> dict:
        """Patch heads weighted by ``voxels`` ``(P,)``, the lesion voxels in each patch; uniform when there
        are none."""
        if len(records) != len(voxels):
            raise RuntimeError(f"{len(records)} patch predictions for {len(voxels)} patches")
        detected = bool(voxels.sum() > 0)
        weights = voxels / voxels.sum() if detected else torch.full_like(voxels, 1.0 / len(records))

        def weighted_mean(index: int) -> Optional[torch.Tensor]:
            if records[0][index] is None:
                return None
            return weights @ torch.stack([r[index] for r in records]).double().cpu()

        return {"cls_logits": weighted_mean(0), "curve": weighted_mean(1), "lesion_detected": detected}

    # --- per case (all folds)
    def predict_logits_from_preprocessed_data(self, data: torch.Tensor) -> torch.Tensor:
        self._fold_records = []
        logits = super().predict_logits_from_preprocessed_data(data)
        self.last_case = self._combine_folds() if self.case_heads else None
        return logits

    def characterize_preprocessed(self, data: torch.Tensor) -> dict:
        """One sliding-window pass with the network as it is (no fold loop): the trainer's
        end-of-training validation uses this with its live network."""
        self._fold_records = []
        self.predict_sliding_window_return_logits(data)
        return self._combine_folds()

    def _combine_folds(self) -> dict:
        """Mean of the folds' aggregated heads over the folds that found a lesion (all folds if none did)."""
        records = [r for r in self._fold_records if r["lesion_detected"]] or self._fold_records
        detected = records[0]["lesion_detected"]
        probabilities = None
        if records[0]["cls_logits"] is not None:
            probabilities = torch.softmax(torch.stack([r["cls_logits"] for r in records]).mean(0), 0).tolist()
        curve = None
        if records[0]["curve"] is not None:
            mean, std = liver_ext_block(self.plans_manager.plans).get("enhancement_stats", (0.0, 1.0))
            curve = (torch.stack([r["curve"] for r in records]).mean(0) * std + mean).tolist()
        aggregation = AGGREGATION_LESION if detected else AGGREGATION_NO_LESION
        if detected and len(records) < len(self._fold_records):
            aggregation += f" ({len(records)} of {len(self._fold_records)} folds found a lesion)"
        return {"probabilities": probabilities, "curve": curve, "lesion_detected": detected,
                "aggregation": aggregation}

    def case_result(self, case: str, heads: dict, lesion_voxels: Optional[int] = None) -> CaseCharacterization:
        """The case's record; ``lesion_voxels``: the tumor voxels of the segmentation written beside it, which
        decides ``lesion_detected`` when given."""
        detected, aggregation = heads["lesion_detected"], heads["aggregation"]
        if lesion_voxels is not None and detected != (lesion_voxels > 0):
            detected, aggregation = lesion_voxels > 0, aggregation + (ONLY_WRITTEN if lesion_voxels else NOT_WRITTEN)
        return CaseCharacterization(case=case, classes=self.case_classes if heads["probabilities"] else [],
                                    probabilities=heads["probabilities"] or [],
                                    lesion_detected=detected, lesion_voxels=lesion_voxels,
                                    enhancement_curve=heads["curve"],
                                    phases=liver_ext_block(self.plans_manager.plans).get("phases"),
                                    aggregation=aggregation)

    def written_lesion_voxels(self, segmentation_file: str) -> int:
        """Tumor voxels of a segmentation nnU-Net wrote (label values, the source image's grid). A tumor region
        (``labels["tumor"] = [2, 3]``) counts every label of it: nnU-Net writes a sub-region such as a necrotic
        core (3) over the tumor's own value."""
        seg, _ = self.plans_manager.image_reader_writer_class().read_seg(segmentation_file)
        named = named_tumor(self.dataset_json["labels"])
        values = list(named) if isinstance(named, (list, tuple)) else [tumor_label_value(self.dataset_json)]
        return int(np.isin(np.asarray(seg), values).sum())

    # --- files
    def predict_from_data_iterator(self, data_iterator, save_probabilities: bool = False,
                                   num_processes_segmentation_export: int = 3):
        if not self.case_heads:
            print(f"No CASE.json: {self.no_heads_reason()}. Writing segmentations only.")
            return super().predict_from_data_iterator(data_iterator, save_probabilities,
                                                      num_processes_segmentation_export)
        heads_of_file: List[tuple] = []

        def tap(items: Iterable[dict]):
            # nnU-Net predicts item k between our yield of it and its request for item k + 1
            for item in items:
                yield item
                if item["ofile"] is not None and self.last_case is not None:
                    heads_of_file.append((item["ofile"], self.last_case))

        ret = super().predict_from_data_iterator(tap(data_iterator), save_probabilities,
                                                 num_processes_segmentation_export)
        if isinstance(data_iterator, MultiThreadedAugmenter):
            data_iterator._finish()
        # every export has finished: count the lesion in the files as written
        ending = self.dataset_json["file_ending"]
        results = []
        for ofile, heads in heads_of_file:
            results.append((os.path.dirname(ofile), self._write_case_json(ofile, heads, ending)))
        for folder in sorted({f for f, _ in results}):
            write_characterization_csv(os.path.join(folder, CSV_NAME), [r for f, r in results if f == folder])
        return ret

    def _write_case_json(self, ofile: str, heads: dict, ending: str) -> CaseCharacterization:
        result = self.case_result(os.path.basename(ofile), heads, self.written_lesion_voxels(ofile + ending))
        write_case_json(ofile + ".json", result)
        self.written_results.append(result)
        return result

    def predict_case_in_process(self, files: List[str], ofile: str, save_probabilities: bool = False,
                                previous_stage_segmentation: Optional[str] = None) -> None:
        """One case without worker processes (nnU-Net's ``predict_from_files_sequential``): writes
        ``ofile`` + file ending (and ``.npz``/``.pkl`` with ``save_probabilities``) and, for a model
        with case-level heads, ``ofile.json``. An exception concerns this case alone."""
        self.last_case = None
        self.predict_from_files_sequential([list(files)], [ofile], save_probabilities=save_probabilities,
                                           overwrite=True,
                                           folder_with_segs_from_prev_stage=None if previous_stage_segmentation is None
                                           else os.path.dirname(previous_stage_segmentation))
        if self.case_heads:
            self._write_case_json(ofile, self.last_case, self.dataset_json["file_ending"])


def argmax_is(logits: torch.Tensor, index: int) -> torch.Tensor:
    """``logits.argmax(0) == index`` (ties to the first maximum, as argmax) for ``logits`` ``(K, *S)``, as a
    bool ``(*S)`` built from comparisons: argmax's int64 map of a whole case takes 8 bytes a voxel, more
    than nnU-Net's fp16 logits of three labels (6), on the GPU."""
    index %= logits.shape[0]
    chosen = logits[index]
    result = torch.ones(chosen.shape, dtype=torch.bool, device=chosen.device)
    for other in range(logits.shape[0]):
        if other != index:
            result &= chosen > logits[other] if other < index else chosen >= logits[other]
    return result


def write_case_json(path: str, result: CaseCharacterization) -> None:
    with open(path, "w") as f:
        json.dump(result.to_json(), f, indent=2)


def write_characterization_csv(path: str, results: List[CaseCharacterization], drop: Iterable[str] = ()) -> None:
    """One row per case; rows of cases already in an existing table (continued predictions, or the other
    parts of a ``-num_parts`` run) are kept, except those of the cases in ``drop`` (cases whose prediction
    failed: their files are gone). The table is read and rewritten under a lock, so calls on this machine
    that end at the same time keep each other's rows; the lock file lies in the temporary folder, named
    after the table's path, rather than among the predictions."""
    key = hashlib.sha1(os.path.realpath(path).encode()).hexdigest()[:16]
    with FileLock(os.path.join(tempfile.gettempdir(), f"nnunet-liver-{key}.lock")):
        _update_characterization_csv(path, results, drop)


def _update_characterization_csv(path: str, results: List[CaseCharacterization], drop: Iterable[str]) -> None:
    rows, old_fields = {}, None
    if os.path.isfile(path):
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows = {row["case"]: row for row in reader}
            old_fields = reader.fieldnames
    dropped = [c for c in drop if rows.pop(c, None) is not None]
    if not results:
        if dropped:
            _write_rows(path, old_fields, rows)
        return
    classes, phases = results[0].classes, results[0].phases
    curve = results[0].enhancement_curve
    curve_names = [f"curve_{p}" for p in (phases or range(len(curve)))] if curve is not None else []
    for r in results:
        row = {"case": r.case, "predicted_class": r.predicted_class or "", "lesion_detected": r.lesion_detected,
               "lesion_voxels": r.lesion_voxels, "aggregation": r.aggregation}
        row.update({f"prob_{c}": f"{p:.6f}" for c, p in zip(classes, r.probabilities)})
        if curve_names:
            row.update({n: f"{v:.4f}" for n, v in zip(curve_names, r.enhancement_curve)})
        rows[r.case] = row
    fields = ["case", "predicted_class", *[f"prob_{c}" for c in classes], "lesion_detected", "lesion_voxels",
              "aggregation", *curve_names]
    _write_rows(path, fields, rows)


def _write_rows(path: str, fields: List[str], rows: dict) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for case in sorted(rows):
            writer.writerow(rows[case])


def characterize_validation_cases(trainer, val_keys: List[str]) -> None:
    """After nnU-Net's validation: ``CASE.json`` for every validation case in
    ``fold_X/validation/`` and the folder's CSV, so five folds give out-of-fold class predictions
    for every case. Mirroring is off here (one extra forward per tile, an eighth of the 3d
    mirrored validation's cost); ``nnunet-liver predict`` mirrors like nnU-Net does."""
    network = unwrap_network(trainer.network)
    network.eval()
    # nnU-Net's validation switches deep supervision back on when it ends; the predictor needs it off
    trainer.set_deep_supervision_enabled(False)
    try:
        _characterize(trainer, network, val_keys)
    finally:
        trainer.set_deep_supervision_enabled(trainer.enable_deep_supervision)


def _characterize(trainer, network, val_keys: List[str]) -> None:
    predictor = CharacterizationPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                          perform_everything_on_device=True, device=trainer.device,
                                          verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    predictor.manual_initialization(network, trainer.plans_manager, trainer.configuration_manager, None,
                                    trainer.dataset_json, trainer.__class__.__name__,
                                    trainer.inference_allowed_mirroring_axes)
    folder = os.path.join(trainer.output_folder, "validation")
    dataset = trainer.dataset_class(trainer.preprocessed_dataset_folder, val_keys,
                                    folder_with_segs_from_previous_stage=trainer.folder_with_segs_from_previous_stage)
    results = []
    ending = trainer.dataset_json["file_ending"]
    for key in dataset.identifiers:
        data, _, previous_stage, _ = dataset.load_case(key)
        data = np.asarray(data[:])
        if trainer.is_cascaded:  # the network's input as nnU-Net's validation gives it
            data = np.vstack((data, convert_labelmap_to_one_hot(np.asarray(previous_stage[:]),
                                                                trainer.label_manager.foreground_labels,
                                                                output_dtype=data.dtype)))
        data = torch.from_numpy(data)
        # the lesion as nnU-Net's validation wrote it (with its mirroring), next to this file
        voxels = predictor.written_lesion_voxels(os.path.join(folder, key + ending))
        result = predictor.case_result(key, predictor.characterize_preprocessed(data), voxels)
        write_case_json(os.path.join(folder, f"{key}.json"), result)
        results.append(result)
    write_characterization_csv(os.path.join(folder, CSV_NAME), results)
    labelled = [r for r in results if r.case in trainer.case_targets.class_of_case and r.probabilities]
    if labelled:
        correct = sum(r.predicted_index == trainer.case_targets.class_of_case[r.case] for r in labelled)
        trainer.print_to_log_file(f"Characterization on validation: accuracy {correct / len(labelled):.3f} "
                                  f"({correct}/{len(labelled)} labelled cases)", also_print_to_console=True)
