"""Case-level targets carried in dataset.json (../shared/DESIGN.md, "Multiphase data").

``"characterization": {"classes": [...], "cases": {CASE: index}}`` and, where available,
``"enhancement": {CASE: [one value per phase]}``. nnU-Net copies dataset.json into the
preprocessed and results folders, so the trainer reads these keys from its ``dataset_json`` and
looks a batch's labels up by ``batch['keys']``. A case without a label is excluded from that loss,
never given a made-up one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from nnunet_liver_ext.dataset_json import checked_phases


@dataclass(frozen=True)
class CaseTargets:
    classes: Tuple[str, ...] = ()
    class_of_case: Dict[str, int] = field(default_factory=dict)
    enhancement: Dict[str, Tuple[float, ...]] = field(default_factory=dict)
    phases: Optional[Tuple[str, ...]] = None

    @classmethod
    def from_dataset_json(cls, dataset_json: dict) -> "CaseTargets":
        """Validates what it reads: a bad entry names the case and the key."""
        characterization = dataset_json.get("characterization") or {}
        classes = tuple(characterization.get("classes") or ())
        class_of_case = {}
        for case, index in (characterization.get("cases") or {}).items():
            if not isinstance(index, int) or not 0 <= index < len(classes):
                raise ValueError(f"dataset.json characterization: case {case!r} has class index {index!r}, "
                                 f"but classes are {list(classes)}")
            class_of_case[case] = index
        phases = dataset_json.get("phases")
        if phases is not None:
            phases = checked_phases(phases)
        enhancement = {}
        for case, curve in (dataset_json.get("enhancement") or {}).items():
            # one NaN would make the standardisation stats NaN, and with them every case's curve loss
            if not isinstance(curve, (list, tuple)) or not curve or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in curve):
                raise ValueError(f"dataset.json enhancement: case {case!r} has {curve!r}; a curve is a list of finite "
                                 f"numbers, one per phase (leave a case without a curve out of 'enhancement')")
            if phases is not None and len(curve) != len(phases):
                raise ValueError(f"dataset.json enhancement: case {case!r} has {len(curve)} values but "
                                 f"phases are {phases}")
            enhancement[case] = tuple(float(v) for v in curve)
        lengths = {len(c) for c in enhancement.values()}
        if len(lengths) > 1:
            raise ValueError(f"dataset.json enhancement: curves of different lengths {sorted(lengths)}")
        return cls(classes, class_of_case, enhancement, tuple(phases) if phases is not None else None)

    @property
    def has_classes(self) -> bool:
        return bool(self.classes) and bool(self.class_of_case)

    @property
    def has_enhancement(self) -> bool:
        return bool(self.enhancement)

    def class_labels(self, keys: Sequence[str], device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """(labels (B,) int64 with -1 where unknown, known (B,) bool) for a batch's case keys."""
        labels = torch.tensor([self.class_of_case.get(k, -1) for k in keys], dtype=torch.long, device=device)
        return labels, labels >= 0

    def curves(self, keys: Sequence[str], num_phases: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """(curves (B, N) float32, known (B,) bool) for a batch's case keys."""
        rows: List[Sequence[float]] = []
        known = []
        for k in keys:
            curve = self.enhancement.get(k)
            known.append(curve is not None)
            rows.append(curve if curve is not None else [0.0] * num_phases)
        return (torch.tensor(rows, dtype=torch.float32, device=device),
                torch.tensor(known, dtype=torch.bool, device=device))
