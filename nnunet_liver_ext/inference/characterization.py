"""Characterization-aware prediction on top of nnU-Net's ``nnUNetPredictor``.

Sliding-window prediction sees patches; characterization is per case. For every patch the
network's heads are evaluated together with the segmentation (``net(x, heads=True)``, with the
same mirroring as the segmentation), and the patch's class logits (and enhancement curve) are
averaged with weights equal to the patch's predicted lesion mass: the sum over the patch of the
tumor softmax probability, in voxels. A case with no predicted lesion mass anywhere falls back
to the unweighted mean over patches, and its JSON says so. Logits are averaged over folds like
nnU-Net averages the segmentation logits, then turned into probabilities.

Written next to each ``CASE.nii.gz``: ``CASE.json`` with
``{"case", "classes", "probabilities", "predicted_class", "predicted_index", "lesion_voxels",
"enhancement_curve", "phases", "aggregation"}``; and one ``characterization.csv`` per folder.
``lesion_voxels`` counts tumor voxels of the argmax at the network's (preprocessed) resolution.
"""
from __future__ import annotations

import csv
import itertools
import json
import os
from dataclasses import dataclass
from typing import Iterable, List, Optional

import numpy as np
import torch
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

from nnunet_liver_ext.networks.contract import NetworkOutput, unwrap_network
from nnunet_liver_ext.training.multitask_trainer import tumor_label_value
from nnunet_liver_ext.training.plans import liver_ext_block

CSV_NAME = "characterization.csv"


@dataclass
class CaseCharacterization:
    case: str
    classes: List[str]
    probabilities: List[float]
    lesion_voxels: int
    enhancement_curve: Optional[List[float]]
    phases: Optional[List[str]]
    aggregation: str

    @property
    def predicted_index(self) -> int:
        return int(np.argmax(self.probabilities))

    def to_json(self) -> dict:
        return {"case": self.case, "classes": self.classes, "probabilities": self.probabilities,
                "predicted_class": self.classes[self.predicted_index], "predicted_index": self.predicted_index,
                "lesion_voxels": self.lesion_voxels, "enhancement_curve": self.enhancement_curve,
                "phases": self.phases, "aggregation": self.aggregation}


def _seg_channel_of_tumor(label_manager, dataset_json: dict) -> int:
    if label_manager.has_regions:
        raise NotImplementedError("characterization with region-based training is not supported")
    return list(label_manager.all_labels).index(tumor_label_value(dataset_json))


class CharacterizationPredictor(nnUNetPredictor):
    """``nnUNetPredictor`` that also aggregates the case-level heads of our networks."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._patch_records: list = []
        self._fold_records: list = []
        self.last_case: Optional[dict] = None

    # --- what the plans say about the heads
    @property
    def case_classes(self) -> List[str]:
        return list(liver_ext_block(self.plans_manager.plans).get("case_classes") or [])

    # --- per patch
    @torch.inference_mode()
    def _internal_maybe_mirror_and_predict(self, x: torch.Tensor) -> torch.Tensor:
        if not self.case_classes:
            return super()._internal_maybe_mirror_and_predict(x)
        mirror_axes = self.allowed_mirroring_axes if self.use_mirroring else None
        out: NetworkOutput = self.network(x, heads=True)
        seg, cls = out.seg, out.cls_logits.float()
        curve = out.curve.float() if out.curve is not None else None
        combos = []
        if mirror_axes is not None:
            assert max(mirror_axes) <= x.ndim - 3, "mirror_axes does not match the dimension of the input!"
            axes = [m + 2 for m in mirror_axes]
            combos = [c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)]
        for flip_axes in combos:
            o = self.network(torch.flip(x, flip_axes), heads=True)
            seg = seg + torch.flip(o.seg, flip_axes)
            cls = cls + o.cls_logits.float()
            if curve is not None:
                curve = curve + o.curve.float()
        n = len(combos) + 1
        seg, cls = seg / n, cls / n
        curve = curve / n if curve is not None else None
        tumor = _seg_channel_of_tumor(self.label_manager, self.dataset_json)
        mass = torch.softmax(seg.float(), 1)[:, tumor].sum()
        self._patch_records.append((mass.item(), cls[0].cpu(), curve[0].cpu() if curve is not None else None))
        return seg

    # --- per fold (one sliding-window pass)
    @torch.inference_mode()
    def predict_sliding_window_return_logits(self, input_image: torch.Tensor):
        self._patch_records = []
        logits = super().predict_sliding_window_return_logits(input_image)
        if self.case_classes:
            self._fold_records.append(self._aggregate_patches(self._patch_records))
        return logits

    @staticmethod
    def _aggregate_patches(records) -> dict:
        masses = torch.tensor([r[0] for r in records], dtype=torch.float64)
        weighted = bool(masses.sum() >= 1.0)  # at least one voxel's worth of tumor probability
        weights = masses / masses.sum() if weighted else torch.full_like(masses, 1.0 / len(records))
        cls = sum(w * r[1].double() for w, r in zip(weights, records))
        curve = None
        if records[0][2] is not None:
            curve = sum(w * r[2].double() for w, r in zip(weights, records))
        return {"cls_logits": cls, "curve": curve, "weighted": weighted}

    # --- per case (all folds)
    def predict_logits_from_preprocessed_data(self, data: torch.Tensor) -> torch.Tensor:
        self._fold_records = []
        logits = super().predict_logits_from_preprocessed_data(data)
        self.last_case = self._combine_folds(logits) if self.case_classes else None
        return logits

    def characterize_preprocessed(self, data: torch.Tensor) -> dict:
        """One sliding-window pass with the network as it is (no fold loop): the trainer's
        end-of-training validation uses this with its live network."""
        self._fold_records = []
        logits = self.predict_sliding_window_return_logits(data)
        return self._combine_folds(logits)

    def _combine_folds(self, logits: torch.Tensor) -> dict:
        cls = torch.stack([r["cls_logits"] for r in self._fold_records]).mean(0)
        probabilities = torch.softmax(cls, 0)
        curve = None
        if self._fold_records[0]["curve"] is not None:
            curve = torch.stack([r["curve"] for r in self._fold_records]).mean(0)
            mean, std = liver_ext_block(self.plans_manager.plans).get("enhancement_stats", (0.0, 1.0))
            curve = (curve * std + mean).tolist()
        tumor = _seg_channel_of_tumor(self.label_manager, self.dataset_json)
        weighted = all(r["weighted"] for r in self._fold_records)
        return {"probabilities": probabilities.tolist(), "curve": curve,
                "lesion_voxels": int((logits.argmax(0) == tumor).sum()),
                "aggregation": "lesion_mass" if weighted else "uniform (no predicted lesion mass)"}

    def case_result(self, case: str, heads: dict) -> CaseCharacterization:
        return CaseCharacterization(case=case, classes=self.case_classes, probabilities=heads["probabilities"],
                                    lesion_voxels=heads["lesion_voxels"], enhancement_curve=heads["curve"],
                                    phases=liver_ext_block(self.plans_manager.plans).get("phases"),
                                    aggregation=heads["aggregation"])

    # --- files
    def predict_from_data_iterator(self, data_iterator, save_probabilities: bool = False,
                                   num_processes_segmentation_export: int = 3):
        if not self.case_classes:
            print("This model has no characterization head (its dataset had no case labels): writing "
                  "segmentations only.")
            return super().predict_from_data_iterator(data_iterator, save_probabilities,
                                                      num_processes_segmentation_export)
        results: List[tuple] = []

        def tap(items: Iterable[dict]):
            # nnU-Net predicts item k between our yield of it and its request for item k + 1
            for item in items:
                yield item
                if item["ofile"] is not None and self.last_case is not None:
                    case = os.path.basename(item["ofile"])
                    results.append((os.path.dirname(item["ofile"]), self.case_result(case, self.last_case)))
                    write_case_json(item["ofile"] + ".json", results[-1][1])

        ret = super().predict_from_data_iterator(tap(data_iterator), save_probabilities,
                                                 num_processes_segmentation_export)
        if isinstance(data_iterator, MultiThreadedAugmenter):
            data_iterator._finish()
        for folder in sorted({f for f, _ in results}):
            write_characterization_csv(os.path.join(folder, CSV_NAME), [r for f, r in results if f == folder])
        return ret


def write_case_json(path: str, result: CaseCharacterization) -> None:
    with open(path, "w") as f:
        json.dump(result.to_json(), f, indent=2)


def write_characterization_csv(path: str, results: List[CaseCharacterization]) -> None:
    """One row per case; rows of cases already in an existing table (continued predictions) are kept."""
    rows = {}
    if os.path.isfile(path):
        with open(path, newline="") as f:
            rows = {row["case"]: row for row in csv.DictReader(f)}
    if not results:
        return
    classes, phases = results[0].classes, results[0].phases
    curve_names = [f"curve_{p}" for p in phases] if phases and results[0].enhancement_curve is not None else []
    for r in results:
        row = {"case": r.case, "predicted_class": r.classes[r.predicted_index], "lesion_voxels": r.lesion_voxels,
               "aggregation": r.aggregation}
        row.update({f"prob_{c}": f"{p:.6f}" for c, p in zip(classes, r.probabilities)})
        if curve_names:
            row.update({n: f"{v:.4f}" for n, v in zip(curve_names, r.enhancement_curve)})
        rows[r.case] = row
    fields = ["case", "predicted_class", *[f"prob_{c}" for c in classes], "lesion_voxels", "aggregation",
              *curve_names]
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
    for key in dataset.identifiers:
        data = torch.from_numpy(np.asarray(dataset.load_case(key)[0][:]))
        result = predictor.case_result(key, predictor.characterize_preprocessed(data))
        write_case_json(os.path.join(folder, f"{key}.json"), result)
        results.append(result)
    write_characterization_csv(os.path.join(folder, CSV_NAME), results)
    labelled = [r for r in results if r.case in trainer.case_targets.class_of_case]
    if labelled:
        correct = sum(r.predicted_index == trainer.case_targets.class_of_case[r.case] for r in labelled)
        trainer.print_to_log_file(f"Characterization on validation: accuracy {correct / len(labelled):.3f} "
                                  f"({correct}/{len(labelled)} labelled cases)", also_print_to_console=True)
