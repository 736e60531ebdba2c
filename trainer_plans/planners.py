"""Experiment planners for this package, run through nnU-Net's own planning API.

``nnUNetv2_plan_experiment -pl`` only searches nnU-Net's package, so ``nnunet-liver plan`` calls
``plan_experiment_dataset(dataset_id, PlannerClass, ...)`` with these classes (DESIGN.md). The
plans they write are ordinary nnU-Net plans: train with ``-p <plans name>``.
"""
from __future__ import annotations

from typing import List, Tuple, Union

from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner


class nnUNetPlannerCPUDemo(ExperimentPlanner):
    """nnU-Net's default planning with a network sized for a 2-core CPU: 8 base features (max 64 in
    3d, 128 in 2d), one convolution per stage, and at most ``max_batch_size[dim]`` samples per batch,
    so the demo and the end-to-end tests train in minutes. Spacing, patch size and normalisation are
    still nnU-Net's own decisions.

    Why the batch cap: nnU-Net sizes the batch to fill a GPU's memory (64 slices of 80x80 for the
    demo's 2d configuration). On a CPU time grows with the batch while memory is no limit, and many
    small steps learn faster per second than few large ones (README, "On a CPU")."""

    max_batch_size = {2: 12, 3: 2}

    def __init__(self, dataset_name_or_id: Union[str, int], gpu_memory_target_in_gb: float = 8,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: str = "nnUNetPlans_CPUDemo",
                 overwrite_target_spacing: Union[List[float], Tuple[float, ...]] = None,
                 suppress_transpose: bool = False):
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name, plans_name,
                         overwrite_target_spacing, suppress_transpose)
        self.UNet_base_num_features = 8
        self.UNet_max_features_3d = 64
        self.UNet_max_features_2d = 128
        self.UNet_blocks_per_stage_encoder = (1,) * 14
        self.UNet_blocks_per_stage_decoder = (1,) * 13

    def get_plans_for_configuration(self, spacing, median_shape, data_identifier: str,
                                    approximate_n_voxels_dataset: float, _cache: dict) -> dict:
        plan = super().get_plans_for_configuration(spacing, median_shape, data_identifier,
                                                   approximate_n_voxels_dataset, _cache)
        plan["batch_size"] = min(plan["batch_size"], self.max_batch_size[len(plan["patch_size"])])
        return plan


PRESETS = {
    "cpu-demo": nnUNetPlannerCPUDemo,
    "default": ExperimentPlanner,
}
