"""Experiment planners for this package, run through nnU-Net's own planning API.

``nnUNetv2_plan_experiment -pl`` only searches nnU-Net's package, so ``nnunet-liver plan`` calls
``plan_experiment_dataset(dataset_id, PlannerClass, ...)`` with these classes (DESIGN.md). The
plans they write are ordinary nnU-Net plans: train with ``-p <plans name>``.

- ``nnUNetPlannerCPUDemo``: nnU-Net's U-Net sized for a 2-core CPU (``nnUNetPlans_CPUDemo``).
- One VRAM-aware planner per network (``NetworkPlanner``): nnU-Net's planning, with the network's own
  memory estimate in place of the U-Net's, so patch and batch fit the VRAM target for that network
  (``nnUNetPlans_STDNet``, ``nnUNetPlans_DynTransNet``, ``nnUNetPlans_MambaCodebook``, ``nnUNetPlans_MTINet``).
- The same on nnU-Net's residual-encoder presets (:func:`network_planner` with ``"M"``, ``"L"``, ``"XL"``):
  their ResidualEncoderUNet topology, reference values and VRAM targets (8, 24, 40 GB), plans
  ``nnUNetResEncUNet{M,L,XL}Plans_<Net>``.
"""
from __future__ import annotations

import copy
import functools
import importlib
import inspect
from typing import List, Optional, Sequence, Tuple, Union

from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.experiment_planning.experiment_planners.residual_unets.residual_encoder_unet_planners import (
    nnUNetPlannerResEncL, nnUNetPlannerResEncM, nnUNetPlannerResEncXL)

from nnunet_liver_ext.errors import UserError
from nnunet_liver_ext.trainer_plans.memory import build_network, calibration_factor, calibration_patch, predicted_gb


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


def find_trainer_class(name: str) -> type:
    """A trainer class by its ``-tr`` name: this package's (through the catalogue) or nnU-Net's own."""
    from nnunet_liver_ext.catalogue import closest_trainers, load_catalogue

    entry = load_catalogue().entries.get(name)
    if entry is not None:
        return getattr(importlib.import_module(f"nnunet_liver_ext.trainers.{entry.module}"), name)
    from nnunetv2.utilities.find_objects import recursive_find_python_class
    import nnunetv2

    found = recursive_find_python_class(f"{nnunetv2.__path__[0]}/training/nnUNetTrainer", name,
                                        "nnunetv2.training.nnUNetTrainer")
    if found is None:
        raise UserError(f"no trainer named {name} in this package or in nnU-Net",
                        f"did you mean {', '.join(closest_trainers(name)) or '(nothing close)'}? "
                        f"(`nnunet-liver trainers` lists them)")
    return found


class NetworkPlanner(ExperimentPlanner):
    """nnU-Net's planning for one of this package's networks: patch and batch size for a VRAM target
    from the network's own memory estimate.

    nnU-Net's ``get_plans_for_configuration`` starts from a large patch, shrinks it while
    ``static_estimate_VRAM_usage`` (the U-Net's feature-map count) exceeds its reference value scaled by
    the VRAM target, then sets the batch size from the headroom. Here that estimate is the network that
    ``trainer`` builds from the same architecture kwargs and this dataset's channels, phases and classes
    (the trainer's own ``build_network_architecture``, on the meta device): its
    ``compute_conv_feature_map_size`` times a calibration factor that puts it into the U-Net's units
    (``trainer_plans.memory``: bytes saved for backward per counted element, relative to PlainConvUNet,
    measured on the CPU once per 2d / 3d, at the first patch the search tries or a part of it,
    ``memory.calibration_patch``). nnU-Net's reference values and scaling are
    kept, so a network planned for 8 GB gets what its estimate says fits where stock nnU-Net's U-Net
    would fill 8 GB. Widths, stages, kernels, spacing and normalisation stay nnU-Net's, so the 2d and
    3d_fullres configurations reuse nnU-Net's preprocessed data (``nnUNetPlans_2d``, ``nnUNetPlans_3d_fullres``).

    Every patch the search tries is built, so a configuration the network cannot take is refused at
    planning time with a ``UserError`` naming the constraint and the patch (:meth:`check_constraints`).
    Each configuration of the plans gets ``vram_estimate``: the network's count, the calibration, the
    estimate, nnU-Net's U-Net count at the same patch and the GB nnU-Net's scaling predicts at the batch size.
    """

    #: the trainer whose network is planned (``-tr`` name); ``trainer=`` picks one of its variants
    trainer_name: str = None
    #: plans are written as ``<U-Net planner's plans name>_<plans_suffix>`` (``nnUNetPlans_STDNet``); a variant
    #: given as ``trainer=`` gets its own (``nnUNetPlans_STDNet_noWeightSharing``)
    plans_suffix: str = None

    def __init__(self, dataset_name_or_id: Union[str, int], gpu_memory_target_in_gb: Optional[float] = None,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: Optional[str] = None,
                 overwrite_target_spacing: Union[List[float], Tuple[float, ...]] = None,
                 suppress_transpose: bool = False, trainer: Union[str, type, None] = None):
        trainer = trainer or self.trainer_name
        trainer_class = find_trainer_class(trainer) if isinstance(trainer, str) else trainer
        # the U-Net planner's own default target where none is given (8 GB, the ResEnc presets 8, 24, 40)
        target = {} if gpu_memory_target_in_gb is None else {"gpu_memory_target_in_gb": gpu_memory_target_in_gb}
        super().__init__(dataset_name_or_id, preprocessor_name=preprocessor_name,
                         plans_name=plans_name or f"{self.unet_plans_name()}_{self.suffix_for(trainer_class)}",
                         overwrite_target_spacing=overwrite_target_spacing, suppress_transpose=suppress_transpose,
                         **target)
        self.trainer_class = trainer_class
        missing = [k for k in getattr(self.trainer_class, "dataset_keys_required", ()) if not self.dataset_json.get(k)]
        if missing:
            raise UserError(f"{self.trainer_class.__name__} needs dataset.json keys {missing}, which "
                            f"{self.dataset_name} does not have, so there is no network to plan for",
                            "plan a dataset that has them (`nnunet-liver trainers` lists what each trainer needs)")
        self.calibrations = {}  # spatial dims -> calibration_factor(...)

    @classmethod
    def suffix_for(cls, trainer_class: type) -> str:
        """``plans_suffix``, or for a variant its name after ``nnUNetTrainer``: a variant's patch and batch can differ
        from the main trainer's, and its plans must not replace the ones the main trainer trains with."""
        if trainer_class.__name__ == cls.trainer_name:
            return cls.plans_suffix
        return trainer_class.__name__.removeprefix("nnUNetTrainer").lstrip("_") or trainer_class.__name__

    @classmethod
    def unet_plans_name(cls) -> str:
        """The plans name of the nnU-Net planner this one plans on (``nnUNetPlans``, ``nnUNetResEncUNetLPlans``)."""
        base = next(c for c in cls.__mro__ if issubclass(c, ExperimentPlanner) and not issubclass(c, NetworkPlanner))
        return inspect.signature(base.__init__).parameters["plans_name"].default

    def reference_point(self, dims: int) -> Tuple[float, int, float]:
        """``(elements per sample, batch size, GB)`` of the U-Net planner's reference (memory.predicted_gb)."""
        if dims == 2:
            return self.UNet_reference_val_2d, self.UNet_reference_val_corresp_bs_2d, self.UNet_reference_val_corresp_GB
        return self.UNet_reference_val_3d, self.UNet_reference_val_corresp_bs_3d, self.UNet_reference_val_corresp_GB

    def generate_data_identifier(self, configuration_name: str) -> str:
        # with nnU-Net's spacing and preprocessor, 2d and 3d_fullres data are nnU-Net's own: reuse them (as its
        # ResEnc planners do). Another spacing or preprocessor makes other data, which must not overwrite
        # nnU-Net's (its ResEnc planners would); 3d_lowres depends on the full-resolution patch: its own too
        nnunet_data = self.overwrite_target_spacing is None and self.preprocessor_name == "DefaultPreprocessor"
        if configuration_name in ("2d", "3d_fullres") and nnunet_data:
            return "nnUNetPlans_" + configuration_name
        return self.plans_identifier + "_" + configuration_name

    # ------------------------------------------------------------------ the estimate
    @staticmethod
    def configuration_dict(patch_size: Sequence[int], arch_class_name: str, arch_kwargs: dict,
                           arch_kwargs_req_import: Sequence[str]) -> dict:
        return {"patch_size": [int(p) for p in patch_size],
                "architecture": {"network_class_name": arch_class_name, "arch_kwargs": copy.deepcopy(arch_kwargs),
                                 "_kw_requires_import": list(arch_kwargs_req_import)}}

    def build_checked(self, configuration: dict, input_channels: int, output_channels: int):
        """The trainer's network for ``configuration`` (meta device), or a UserError naming the constraint
        it violates and the patch size."""
        patch = configuration["patch_size"]
        arch = configuration["architecture"]["arch_kwargs"]
        try:
            if min(patch) < 1:
                raise ValueError("is what nnU-Net's search reached shrinking the patch while the network's estimate "
                                 "stayed above the VRAM target: no patch of this network fits it")
            network = build_network(self.trainer_class, self.dataset_json, configuration, input_channels,
                                    output_channels, "meta")
            if int(arch["n_stages"]) < 2:  # no decoder: no segmentation output (and an empty deep supervision)
                raise ValueError("leaves one stage, and the network needs an encoder and a decoder (at least two)")
            self.check_constraints(network, patch)
        except ValueError as e:
            raise UserError(
                f"{self.trainer_class.__name__} cannot be planned for {self.dataset_name}: at patch size {patch} "
                f"({len(patch)}d, n_stages {arch['n_stages']}, features {list(arch['features_per_stage'])}, VRAM target "
                f"{self.UNet_vram_target_GB} GB) {e}",
                "no patch nnU-Net's search reaches satisfies this; change the VRAM target (--gpu-memory-target), "
                "the trainer (--trainer) or the network's settings (images this small: plan with nnU-Net's "
                "default planner)") from None
        return network

    def check_constraints(self, network, patch_size: Sequence[int]) -> None:
        """Constraints beyond what the network's constructor checks; raise ValueError naming the constraint."""

    def static_estimate_VRAM_usage(self, patch_size, input_channels, output_channels, arch_class_name, arch_kwargs,
                                   arch_kwargs_req_import):
        # nnU-Net calls this through self: an instance method here, since it needs the dataset and trainer
        configuration = self.configuration_dict(patch_size, arch_class_name, arch_kwargs, arch_kwargs_req_import)
        network = self.build_checked(configuration, input_channels, output_channels)
        return network.compute_conv_feature_map_size(list(patch_size)) * \
            self.calibration(configuration, input_channels, output_channels)["factor"]

    def calibration(self, configuration: dict, input_channels: int, output_channels: int) -> dict:
        """The calibration for this configuration's dimensionality, measured at its first (largest) topology."""
        dims = len(configuration["patch_size"])
        if dims not in self.calibrations:
            patch = calibration_patch(configuration["patch_size"], configuration["architecture"]["arch_kwargs"])
            print(f"{self.trainer_class.__name__} {dims}d memory calibration: one training forward of the network and "
                  f"of nnU-Net's U-Net at patch {list(patch)} on the CPU (deep plans: up to a minute and several GB)")
            self.calibrations[dims] = calibration_factor(self.trainer_class, self.dataset_json, configuration,
                                                         input_channels, output_channels)
            c = self.calibrations[dims]
            print(f"{self.trainer_class.__name__} {dims}d memory calibration at patch {c['patch']}: "
                  f"{c['bytes_per_element']:.2f} saved bytes per counted element vs "
                  f"{c['unet_bytes_per_element']:.2f} for nnU-Net's U-Net -> factor {c['factor']:.3f}")
        return self.calibrations[dims]

    def get_plans_for_configuration(self, spacing, median_shape, data_identifier: str,
                                    approximate_n_voxels_dataset: float, _cache: dict) -> dict:
        plan = super().get_plans_for_configuration(spacing, median_shape, data_identifier,
                                                   approximate_n_voxels_dataset, _cache)
        architecture = plan["architecture"]
        configuration = self.configuration_dict(plan["patch_size"], architecture["network_class_name"],
                                                architecture["arch_kwargs"], architecture["_kw_requires_import"])
        inputs, outputs = len(self.dataset_json["channel_names"]), len(self.dataset_json["labels"])
        network = self.build_checked(configuration, inputs, outputs)
        count = int(network.compute_conv_feature_map_size(list(plan["patch_size"])))
        calibration = self.calibration(configuration, inputs, outputs)
        estimate = count * calibration["factor"]
        unet = int(ExperimentPlanner.static_estimate_VRAM_usage(
            plan["patch_size"], inputs, outputs, architecture["network_class_name"], architecture["arch_kwargs"],
            architecture["_kw_requires_import"]))
        dims = len(plan["patch_size"])
        reference = self.reference_point(dims)
        plan["vram_estimate"] = {
            "trainer": self.trainer_class.__name__,
            "network": type(network).__name__,
            "feature_map_elements": count,
            "calibration": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in calibration.items()},
            "estimate_per_sample": int(round(estimate)),
            "plain_unet_feature_map_elements": unet,
            "gpu_memory_target_gb": float(self.UNet_vram_target_GB),
            "predicted_gb": float(f"{predicted_gb(estimate, plan['batch_size'], dims, reference):.4g}"),
            "plain_unet_predicted_gb": float(f"{predicted_gb(unet, plan['batch_size'], dims, reference):.4g}"),
            "reference": {"elements": int(reference[0]), "batch_size": int(reference[1]), "gb": float(reference[2])},
        }
        return plan


class nnUNetPlannerSTDNet(NetworkPlanner):
    """STD-Net: the shared encoder runs once per phase, the temporal Transformer at every bottleneck voxel."""

    trainer_name = "nnUNetTrainerSTDNet"
    plans_suffix = "STDNet"


class nnUNetPlannerDynTransNet(NetworkPlanner):
    """DynTransNet: patch embedding and merging need a patch that tokenises (a multiple of the total stride per
    axis) and at least two stages (a stem and a transformer stage); a stage of more than
    ``max_global_tokens`` tokens attends in (shifted) windows, which the estimate counts on the padded grid.
    The network's constructor checks these (the trainer passes the patch size)."""

    trainer_name = "nnUNetTrainerDynTransNet"
    plans_suffix = "DynTransNet"


class nnUNetPlannerMambaCodebook(NetworkPlanner):
    """Mamba-codebook U-Net: the Mamba2 block scans the bottleneck (``expand * width`` must split into heads
    of ``headdim``), the codebook keeps a distance per bottleneck location and code."""

    trainer_name = "nnUNetTrainerMambaCodebook"
    plans_suffix = "MambaCodebook"


class nnUNetPlannerMTINet(NetworkPlanner):
    """MTI-Net: the encoder and MdIEF run once per phase; the phases' features are concatenated per stage."""

    trainer_name = "nnUNetTrainerMTINet"
    plans_suffix = "MTINet"


#: nnU-Net's residual-encoder presets (``nnUNetPlannerResEnc{M,L,XL}``), by size
RESENC_PLANNERS = {"M": nnUNetPlannerResEncM, "L": nnUNetPlannerResEncL, "XL": nnUNetPlannerResEncXL}


@functools.lru_cache(maxsize=None)
def network_planner(planner: type, resenc: Optional[str] = None) -> type:
    """``planner`` (a :class:`NetworkPlanner`), or with ``resenc`` ("M", "L", "XL") the same network planned
    on nnU-Net's residual-encoder preset of that size: its ResidualEncoderUNet topology (blocks per stage),
    reference values and default VRAM target, plans ``nnUNetResEncUNet<size>Plans_<Net>``. The network's
    estimate is calibrated against the ResidualEncoderUNet of the same plans."""
    if resenc is None:
        return planner
    if resenc not in RESENC_PLANNERS:
        raise ValueError(f"resenc must be one of {sorted(RESENC_PLANNERS)}, got {resenc!r}")
    base = RESENC_PLANNERS[resenc]
    return type(f"{planner.__name__}ResEnc{resenc}", (planner, base), {
        "__module__": __name__,
        "__doc__": f"{planner.__doc__}\n\nPlanned on nnU-Net's {base.__name__} (residual encoder, {resenc}).",
    })


PRESETS = {
    "cpu-demo": nnUNetPlannerCPUDemo,
    "default": ExperimentPlanner,
    "stdnet": nnUNetPlannerSTDNet,
    "dyntransnet": nnUNetPlannerDynTransNet,
    "mamba-codebook": nnUNetPlannerMambaCodebook,
    "mti-net": nnUNetPlannerMTINet,
}
