"""The multi-task mechanics every method's trainer shares, written once.

``LiverMultiTaskTrainer`` is an ``nnUNetTrainer`` whose network follows the contract of
``nnunet_liver_ext.networks.contract``. It adds, through nnU-Net's own hooks:

- ``__init__``: reads the case-level targets from dataset.json and writes what the network's
  shape needs into the plans (``training.plans.PLANS_KEY``), so inference rebuilds it;
- ``build_network_architecture`` (a classmethod, so ablation trainers only change
  ``network_kwargs``): builds ``network_class`` from the plans;
- ``train_step``: ``net(x, heads=True, lesion_mask=...)``, nnU-Net's seg loss plus the weighted
  case-level terms;
- ``get_training_transforms``: nnU-Net's augmentation with intensity transforms shared by all
  phases of a sample (``training.augmentation``);
- ``configure_optimizers``: AdamW for ``adaptive_module_prefixes`` (attention, heads), SGD else;
- ``perform_actual_validation``: nnU-Net's validation, then a ``CASE.json`` per validation case.
- ``save_checkpoint`` / ``load_checkpoint`` / ``on_train_start``: nnU-Net's checkpoint plus the random
  generators, restored on ``--c`` (``training.resume``).

Method trainers (``trainers/nnUNetTrainer<Method>.py``) set ``network_class``,
``network_kwargs`` and ``loss_weights``; anything method-specific goes into
``case_loss_terms`` or ``method_network_kwargs``.
"""
from __future__ import annotations

import copy
import pickle
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.collate_outputs import collate_outputs
from nnunetv2.utilities.helpers import dummy_context
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from torch import autocast, nn

from nnunet_liver_ext.dataset_json import IGNORE_NAME, TUMOR_NAMES, channels_per_phase, named_tumor
from nnunet_liver_ext.losses.case_losses import masked_cross_entropy, masked_l1
from nnunet_liver_ext.networks.contract import NetworkOutput, unwrap_network
from nnunet_liver_ext.training.augmentation import synchronize_phase_intensity
from nnunet_liver_ext.training.case_labels import CaseTargets
from nnunet_liver_ext.training.optim import HybridOptimizer, PolyLRPerGroup, split_parameters
from nnunet_liver_ext.training.plans import PLANS_KEY, liver_ext_block, resolved_arch_kwargs
from nnunet_liver_ext.training.pretrained import install as install_pretrained_weights_loader
from nnunet_liver_ext.training.resume import (RESUME_STATE_KEY, best_ema_after_this_epoch, capture_random_state,
                                              nnunet_checkpoint, read_checkpoint_lazily, restore_random_state)


# nnUNetv2_train -pretrained_weights: our networks take single-phase weights under networks.transfer's rule
# (training.pretrained explains the rebinding; other networks keep nnU-Net's loader)
install_pretrained_weights_loader()


def tumor_label_value(dataset_json: dict) -> int:
    """The label value of the tumor class: ``labels["tumor"]`` (or MSD's "cancer"), else the
    highest foreground label (never nnU-Net's ignore label, ``labels["ignore"]``, which is the highest
    value but no class). In a region-based dataset (``regions_class_order``), the label value nnU-Net
    writes the tumor region as."""
    labels = dataset_json["labels"]
    named = named_tumor(labels)
    if isinstance(named, int):
        return named
    if dataset_json.get("regions_class_order"):
        from nnunetv2.utilities.label_handling.label_handling import LabelManager

        label_manager = LabelManager(labels, dataset_json["regions_class_order"])
        index = tumor_region_index(label_manager, labels)
        return max(label_manager.regions_class_order) if index is None else label_manager.regions_class_order[index]
    values = [v for name, v in labels.items() if isinstance(v, int) and name != IGNORE_NAME]
    return max(values)


def region_key(value) -> tuple:
    """A dataset.json label or region (``2``, ``[1, 2]``) as a sorted tuple of label values."""
    return tuple(sorted(value)) if isinstance(value, (list, tuple)) else (value,)


def tumor_region_index(label_manager, labels: dict) -> Optional[int]:
    """Index among nnU-Net's foreground regions (its outputs, in dataset.json order) of the tumor region:
    ``labels["tumor"]`` (or "cancer", "lesion"), else the region that is the highest label of
    ``regions_class_order`` alone; None when there is no such region."""
    regions = [region_key(r) for r in label_manager.foreground_regions]
    named = named_tumor(labels)
    wanted = region_key(named) if named is not None else (max(label_manager.regions_class_order),)
    return regions.index(wanted) if wanted in regions else None


def lesion_output(label_manager, dataset_json: dict) -> Optional[Tuple[int, str]]:
    """``(output channel, activation)`` of the tumor: the channel of the tumor label and ``softmax`` (nnU-Net
    orders the outputs by label value), or, for region-based training, the channel of the tumor region and
    ``sigmoid`` (one output per foreground region); None for regions without a tumor region."""
    if not label_manager.has_regions:
        return list(label_manager.all_labels).index(tumor_label_value(dataset_json)), "softmax"
    index = tumor_region_index(label_manager, dataset_json["labels"])
    return None if index is None else (index, "sigmoid")


def cascade_input_channels(configuration_manager, num_input_channels: int) -> int:
    """How many of ``num_input_channels`` are nnU-Net's cascade input (the previous stage's one-hot
    segmentation, appended after the image channels): the input channels beyond the configuration's image
    channels (one normalization scheme each) in a configuration with a ``previous_stage``; else 0."""
    if configuration_manager.previous_stage_name is None:
        return 0
    image_channels = len(configuration_manager.normalization_schemes)
    if num_input_channels <= image_channels:
        raise ValueError(f"configuration with previous_stage {configuration_manager.previous_stage_name!r}: "
                         f"{num_input_channels} input channels leave none for the previous stage's segmentation "
                         f"after the {image_channels} image channels")
    return num_input_channels - image_channels


class LiverMultiTaskTrainer(nnUNetTrainer):
    network_class: type = None
    #: constructor arguments of ``network_class`` beyond the plans; ablation trainers override it
    network_kwargs: Dict = {}
    #: weights of the case-level terms relative to nnU-Net's segmentation loss (weight 1)
    loss_weights: Dict[str, float] = {"cls": 0.5, "curve": 0.0}
    #: an ``aux_losses`` entry of the network without a weight here is an error, not ignored
    aux_loss_weights: Dict[str, float] = {}
    #: parameters whose names start with these train with AdamW (``training.optim``); the rest keep
    #: nnU-Net's SGD. Empty: nnU-Net's optimizer unchanged.
    adaptive_module_prefixes: tuple = ()
    adaptive_lr: float = 1e-3
    adaptive_weight_decay: float = 1e-5
    #: brightness/contrast/gamma augmentation identical for all phases of a sample (training.augmentation)
    synchronize_phase_intensity_augmentation: bool = True
    #: in training, the case heads look at the reference tumor mask (``lesion_mask`` of the network
    #: contract) rather than at the network's own prediction, so they learn from the first iteration
    #: instead of waiting for the segmentation to find tumors; validation and inference use the
    #: prediction (benchmarks/characterization_probe.py)
    guide_heads_with_reference_lesion: bool = True
    #: case-level heads the method has ("cls": characterization, "curve": enhancement curve); each is built only
    #: when the dataset has its targets, and the characterization predictor runs the heads that were built
    case_heads: tuple = ("cls",)
    #: dataset.json keys the method cannot train without: a dataset lacking one is refused at construction
    #: with a message naming the key (``nnunet-liver trainers`` lists them)
    dataset_keys_required: tuple = ()
    #: the network's constructor takes ``lesion_channel`` (the tumor's seg output, which its heads look at);
    #: the trainer sets it from dataset.json's labels through the plans
    network_takes_lesion_channel: bool = False
    #: the network's constructor takes the plans' ``patch_size`` (to check its tokenisation at construction)
    network_takes_patch_size: bool = False
    #: the network's constructor takes ``previous_stage_channels``: in nnU-Net's cascade (3d_cascade_fullres) the
    #: input's last channels are the previous stage's one-hot segmentation, which a network that reads the
    #: channels as phases must not take for phases, and the pretrained-weight transfer must not take for images.
    #: Networks without it read them as more input channels.
    network_takes_previous_stage_channels: bool = False
    #: the network's constructor takes ``channels_per_phase``: set from dataset.json's ``phases`` (image channels
    #: / phases), so that a dataset with several channels per phase is not read as that many more phases
    network_takes_channels_per_phase: bool = False
    #: gradient clipping norm of the update (nnU-Net's 12; transformers train with smaller ones)
    grad_clip_norm: float = 12.0
    #: dataset.json keys the method reads when they are there
    dataset_keys_used: tuple = ("phases", "characterization")

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        missing = [key for key in self.dataset_keys_required if not dataset_json.get(key)]
        if missing:
            raise ValueError(f"{type(self).__name__} needs dataset.json keys {missing}, which this dataset "
                             f"({dataset_json.get('name', '?')}) does not have; see `nnunet-liver trainers`")
        targets = CaseTargets.from_dataset_json(dataset_json)
        plans = self.plans_with_liver_block(plans, dataset_json, targets)
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.case_targets = targets
        self.tumor_label = tumor_label_value(dataset_json)
        # region-based training: the targets are one binary map per region, the tumor's is the lesion channel
        # plans_with_liver_block found (None: the regions have no tumor)
        self.tumor_region_channel = None
        if self.label_manager.has_regions:
            block = liver_ext_block(self.plans_manager.plans)
            self.tumor_region_channel = block.get("lesion_channel")
            if self.tumor_region_channel is None and block.get("case_heads"):
                raise ValueError(f"{type(self).__name__}'s case-level heads look at the tumor, but the regions of "
                                 f"dataset.json {dataset_json['labels']} have none: name the tumor region 'tumor' (or "
                                 f"one of {list(TUMOR_NAMES[1:])}), or give the highest label of regions_class_order "
                                 f"a region of its own")
        if "cls" not in self.case_heads:
            pass  # a segmentation method: nothing to say about case labels it never reads
        elif targets.has_classes:
            self.print_to_log_file(f"Characterization: {len(targets.class_of_case)} labelled cases, classes "
                                   f"{list(targets.classes)}; loss weight {self.loss_weights.get('cls', 0)}")
        else:
            self.print_to_log_file("Characterization: dataset.json has no 'characterization' labels, so this run "
                                   "trains segmentation only (no class head, no classification loss).")
        if targets.phases is None:
            self.print_to_log_file("dataset.json has no 'phases' key: the input channels are read as phases in "
                                   "channel order.")
            channels = len(dataset_json["channel_names"])
            lengths = sorted({len(curve) for curve in targets.enhancement.values()})
            if "curve" in self.case_heads and lengths and lengths != [channels]:
                # otherwise the first batch fails inside torch.tensor, naming nothing
                raise ValueError(f"dataset.json enhancement: curves of {lengths[0]} values, but without a 'phases' key "
                                 f"the {channels} input channels are the phases: add 'phases' (one name per curve "
                                 f"value, in channel order) or give one value per channel")
        if self.is_cascaded:
            # the networks that read phases encode it with every phase image; the others read it as stock nnU-Net
            read_as = "encoded together with every phase image" if self.network_takes_channels_per_phase \
                else "more input channels of the network"
            self.print_to_log_file(f"Cascade: the {self.configuration_manager.previous_stage_name} stage's "
                                   f"segmentation ({len(self.label_manager.foreground_labels)} one-hot channels "
                                   f"after the images) is {read_as}.")

    @classmethod
    def plans_with_liver_block(cls, plans: dict, dataset_json: dict, targets: Optional[CaseTargets] = None) -> dict:
        """A copy of ``plans`` with this package's block: what the network's shape depends on beyond nnU-Net's
        plans, so that inference (which sees the plans, not dataset.json) rebuilds the same network."""
        targets = targets or CaseTargets.from_dataset_json(dataset_json)
        plans = copy.deepcopy(plans)
        plans[PLANS_KEY] = cls.plans_block(targets, plans.get(PLANS_KEY))
        label_manager = PlansManager(plans).get_label_manager(dataset_json)
        lesion = lesion_output(label_manager, dataset_json)
        if lesion is not None:
            plans[PLANS_KEY]["lesion_channel"], plans[PLANS_KEY]["lesion_activation"] = lesion
        else:  # regions without a tumor: no lesion channel, whatever plans this block was copied from said
            plans[PLANS_KEY].pop("lesion_channel", None)
            plans[PLANS_KEY].pop("lesion_activation", None)
        return plans

    @classmethod
    def plans_block(cls, targets: CaseTargets, existing: Optional[dict]) -> dict:
        block = dict(existing or {})
        block["case_classes"] = list(targets.classes) if targets.has_classes else []
        # the heads the network is built with: the method's, where the dataset has their targets
        available = {"cls": targets.has_classes, "curve": targets.has_enhancement}
        block["method_case_heads"] = list(cls.case_heads)
        block["case_heads"] = [head for head in cls.case_heads if available[head]]
        block["phases"] = list(targets.phases) if targets.phases is not None else None
        if targets.has_enhancement:
            values = np.array(list(targets.enhancement.values()), dtype=np.float64)
            # curves are regressed in standardised units; inference maps them back with these
            block["enhancement_stats"] = [float(values.mean()), float(values.std() + 1e-6)]
        return block

    # ------------------------------------------------------------------ network
    @classmethod
    def method_network_kwargs(cls, plans_block: dict, num_image_channels: int) -> dict:
        """Constructor arguments a method derives from the plans block and the number of image channels
        (the input channels less a cascade's previous-stage segmentation)."""
        return {}

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        if cls.network_class is None:
            raise TypeError(f"{cls.__name__} sets no network_class")
        block = liver_ext_block(plans_manager.plans)
        kwargs = dict(resolved_arch_kwargs(configuration_manager))
        kwargs.update(cls.network_kwargs)
        if cls.network_takes_lesion_channel and "lesion_channel" in block:
            kwargs["lesion_channel"] = block["lesion_channel"]
            kwargs["lesion_activation"] = block.get("lesion_activation", "softmax")
        if cls.network_takes_patch_size:
            kwargs["patch_size"] = configuration_manager.patch_size
        previous_stage_channels = cascade_input_channels(configuration_manager, num_input_channels)
        if cls.network_takes_previous_stage_channels and previous_stage_channels:
            kwargs["previous_stage_channels"] = previous_stage_channels
        num_image_channels = num_input_channels - previous_stage_channels
        if cls.network_takes_channels_per_phase and block.get("phases"):
            kwargs["channels_per_phase"] = channels_per_phase(block["phases"], num_image_channels)
        kwargs.update(cls.method_network_kwargs(block, num_image_channels))
        # plans written before "case_heads" existed had a class head exactly when they had classes
        has_cls_head = "cls" in block.get("case_heads", ["cls"])
        num_case_classes = len(block.get("case_classes") or []) if has_cls_head else 0
        return cls.network_class(num_input_channels, num_output_channels, enable_deep_supervision,
                                 num_case_classes=num_case_classes, **kwargs)

    # ------------------------------------------------------------------ training
    @classmethod
    def get_training_transforms(cls, *args, **kwargs):
        transforms = super().get_training_transforms(*args, **kwargs)
        if cls.synchronize_phase_intensity_augmentation and synchronize_phase_intensity(transforms) == 0:
            raise RuntimeError("found none of nnU-Net's intensity transforms to synchronize across phases; has "
                               "nnU-Net's augmentation pipeline changed?")
        return transforms

    def configure_optimizers(self):
        if not self.adaptive_module_prefixes:
            return super().configure_optimizers()
        sgd_params, adaptive_params = split_parameters(unwrap_network(self.network), self.adaptive_module_prefixes)
        optimizers = [torch.optim.SGD(sgd_params, self.initial_lr, weight_decay=self.weight_decay, momentum=0.99,
                                      nesterov=True)]
        if adaptive_params:
            optimizers.append(torch.optim.AdamW(adaptive_params, self.adaptive_lr,
                                                weight_decay=self.adaptive_weight_decay))
        optimizer = HybridOptimizer(optimizers)
        self.print_to_log_file(f"Optimizer: SGD (lr {self.initial_lr}) for {len(sgd_params)} tensors, AdamW "
                               f"(lr {self.adaptive_lr}) for {len(adaptive_params)} tensors of "
                               f"{list(self.adaptive_module_prefixes)}; polynomial decay on both")
        return optimizer, PolyLRPerGroup(optimizer, self.num_epochs)

    def _autocast(self):
        return autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context()

    def case_loss_terms(self, output: NetworkOutput, target, keys: List[str]) -> Dict[str, torch.Tensor]:
        """Weighted case-level loss terms of one batch (already multiplied by their weights).

        The classification and curve terms only count samples whose patch contains tumor voxels and whose
        case has the target: both describe the lesion, which a patch without it cannot show (the curve is
        the lesion's enhancement). With none in the batch a term is a graph-connected zero. Under DDP each
        term is the mean over every rank's qualifying samples (``losses/case_losses.py``).
        """
        terms: Dict[str, torch.Tensor] = {}
        has_lesion = self.reference_tumor(target).flatten(1).any(1)
        if output.cls_logits is not None and self.loss_weights.get("cls", 0) > 0:
            labels, known = self.case_targets.class_labels(keys, self.device)
            terms["cls"] = self.loss_weights["cls"] * masked_cross_entropy(output.cls_logits, labels,
                                                                           known & has_lesion)
        if output.curve is not None and self.loss_weights.get("curve", 0) > 0:
            mean, std = liver_ext_block(self.plans_manager.plans).get("enhancement_stats", (0.0, 1.0))
            curves, known = self.case_targets.curves(keys, output.curve.shape[1], self.device)
            terms["curve"] = self.loss_weights["curve"] * masked_l1(output.curve, (curves - mean) / std,
                                                                    known & has_lesion)
        for name, value in output.aux_losses.items():
            if name not in self.aux_loss_weights:
                raise KeyError(f"network returned aux loss {name!r} but {type(self).__name__}.aux_loss_weights "
                               f"has no weight for it")
            terms[name] = self.aux_loss_weights[name] * value.float()
        return terms

    def _backward_and_step(self, loss: torch.Tensor, after_backward: Optional[Callable[[], None]] = None) -> None:
        """nnU-Net's update: grad scaler on CUDA, gradient clipping at ``grad_clip_norm``. ``after_backward``
        runs between the backward pass and clipping (MTI-Net drops its discriminator's gradients there)."""
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            if after_backward is not None:
                after_backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.grad_clip_norm)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            if after_backward is not None:
                after_backward()
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.grad_clip_norm)
            self.optimizer.step()

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self.iteration_in_epoch = 0

    #: non-finite steps in a row that a run with nnU-Net's grad scaler rides out (the scaler skips each one)
    max_non_finite_steps = 25

    def check_finite_losses(self, terms: Dict[str, torch.Tensor]) -> bool:
        """True when every loss term is finite. A NaN or Inf term is named with the epoch, iteration and cases.
        Without a grad scaler (CPU, MPS) training stops before the term reaches the weights: nnU-Net itself
        would train on and save a broken checkpoint. With nnU-Net's CUDA grad scaler, which skips a step whose
        gradients are not finite and lowers its scale, the step is logged and left to it, as stock nnU-Net
        does with one bad fp16 batch, until ``max_non_finite_steps`` in a row stop the run."""
        names = list(terms)
        finite = torch.isfinite(torch.stack([terms[n].detach().float().reshape(()) for n in names]))
        if bool(finite.all()):
            self._non_finite_steps = 0
            return True
        self._non_finite_steps = getattr(self, "_non_finite_steps", 0) + 1
        bad = {n: float(terms[n].detach().float()) for n, ok in zip(names, finite.tolist()) if not ok}
        what = (f"{type(self).__name__}: non-finite loss term(s) {bad} at epoch {self.current_epoch}, iteration "
                f"{getattr(self, 'iteration_in_epoch', 0)} (cases {getattr(self, '_last_keys', '?')})")
        if self.grad_scaler is None:
            raise FloatingPointError(f"{what}; stopped before the weights were updated")
        if self._non_finite_steps >= self.max_non_finite_steps:
            raise FloatingPointError(f"{what}: {self._non_finite_steps} steps in a row, stopped (the grad scaler "
                                     f"skipped every one)")
        self.print_to_log_file(f"warning: {what}; nnU-Net's grad scaler skips this step ({self._non_finite_steps} in a "
                               f"row; {self.max_non_finite_steps} stop the run)", also_print_to_console=True)
        return False

    def unpack_batch(self, batch: dict):
        """(data, target, keys, tumor) of an nnU-Net batch on the trainer's device: target as nnU-Net gives it
        (the deep-supervision list or one tensor), keys the case ids, tumor the full-resolution reference
        tumor mask ``(B, 1, *S)`` bool. Method trainers with their own train_step start here too."""
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)
        keys = [str(k) for k in batch["keys"]]
        self._last_keys = keys
        return data, target, keys, self.reference_tumor(target)

    def reference_tumor(self, target) -> torch.Tensor:
        """``(B, 1, *S)`` bool: the reference tumor of nnU-Net's (deep-supervision) target at full resolution,
        a label map, or with region-based training one binary map per region."""
        full_resolution = target[0] if isinstance(target, (list, tuple)) else target
        if not self.label_manager.has_regions:
            return full_resolution == self.tumor_label
        if self.tumor_region_channel is None:  # regions without a tumor: a segmentation-only method's dataset
            return torch.zeros_like(full_resolution[:, :1], dtype=torch.bool)
        channel = self.tumor_region_channel
        return full_resolution[:, channel:channel + 1] > 0.5

    def annotated_voxels(self, target) -> Optional[torch.Tensor]:
        """``(B, 1, *S)`` bool: the voxels of nnU-Net's (deep-supervision) target at full resolution that carry a
        label, i.e. not nnU-Net's ignore label; None for a dataset without one. With region-based training
        nnU-Net's loader gives the ignore mask as the target's last channel."""
        if not self.label_manager.has_ignore_label:
            return None
        full_resolution = target[0] if isinstance(target, (list, tuple)) else target
        if self.label_manager.has_regions:
            return full_resolution[:, -1:] < 0.5
        return full_resolution != self.label_manager.ignore_label

    def train_step(self, batch: dict) -> dict:
        data, target, keys, tumor = self.unpack_batch(batch)
        lesion_mask = tumor.float() if self.guide_heads_with_reference_lesion else None

        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            output = self.network(data, heads=True, lesion_mask=lesion_mask)
            seg_loss = self.loss(output.seg, target)
            terms = self.case_loss_terms(output, target, keys)
            loss = seg_loss + sum(terms.values()) if terms else seg_loss
        self.check_finite_losses({"seg": seg_loss, **terms})
        self._backward_and_step(loss)
        self.iteration_in_epoch = getattr(self, "iteration_in_epoch", 0) + 1
        result = {"loss": loss.detach().cpu().numpy(), "seg_loss": seg_loss.detach().cpu().numpy()}
        result.update({f"{name}_loss": value.detach().cpu().numpy() for name, value in terms.items()})
        return result

    def on_train_epoch_end(self, train_outputs: List[dict]):
        super().on_train_epoch_end(train_outputs)
        # nnU-Net's logger keeps a fixed set of keys, so the case-level terms go to the log file
        outputs = collate_outputs(train_outputs)
        parts = [f"{k} {np.mean(v):.4f}" for k, v in outputs.items() if k.endswith("_loss")]
        if parts:
            self.print_to_log_file("train terms (weighted): " + ", ".join(parts))

    # ------------------------------------------------------------------ checkpoints (--c)
    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint plus the random number generators' state (``training.resume``), so that
        ``nnUNetv2_train --c`` continues the run it resumes rather than a differently drawn one."""
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            super().save_checkpoint(filename)  # nnU-Net's "no checkpoint written" message
            return
        checkpoint = nnunet_checkpoint(self)
        checkpoint["_best_ema"] = best_ema_after_this_epoch(self)
        checkpoint[RESUME_STATE_KEY] = {"random": capture_random_state(self.device)}
        torch.save(checkpoint, filename)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        """nnU-Net's loading (an error names the file when it does not fit this trainer), then the saved random
        state: restored at once, and again in ``on_train_start`` once nnU-Net's data loaders have drawn their
        warm-up batches, which the uninterrupted run drew at its start, not at this epoch."""
        from nnunet_liver_ext.errors import UserError

        try:
            super().load_checkpoint(filename_or_checkpoint)
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError) as e:
            where = filename_or_checkpoint if isinstance(filename_or_checkpoint, str) else "the checkpoint"
            first_line = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            if isinstance(e, (EOFError, pickle.UnpicklingError)) or any(
                    words in str(e) for words in ("PytorchStreamReader", "zip archive", "central directory")):
                # nnU-Net writes checkpoint_latest.pth in place: a job killed meanwhile leaves it truncated
                raise UserError(f"{where} cannot be read ({first_line}): truncated or corrupt, e.g. by a job killed "
                                f"while it was written",
                                "move it aside and rerun with --c: nnU-Net then resumes from the fold's next "
                                "checkpoint (checkpoint_final, checkpoint_latest, checkpoint_best.pth, in that order)"
                                ) from e
            raise UserError(f"{where} does not fit {type(self).__name__} with these plans: {first_line}",
                            "resume with the trainer, plans and configuration that wrote it, or start without --c"
                            ) from e
        self._resume_random_state = None
        checkpoint = read_checkpoint_lazily(filename_or_checkpoint) if isinstance(filename_or_checkpoint, str) \
            else filename_or_checkpoint
        writer = checkpoint.get("trainer_name")
        if writer is not None and writer != type(self).__name__:
            # nnU-Net loads any checkpoint whose weights fit; the optimizer state (learning rates, betas, weight
            # decay, which of Adam / AdamW) and with it the schedule's rates are the writer's
            message = (f"WARNING: this checkpoint was written by {writer}, and continues as {type(self).__name__}: "
                       f"the weights fit, but the optimizer's settings and learning rates are {writer}'s. Continue "
                       f"with -tr {writer}, or start {type(self).__name__} without --c.")
            self.print_to_log_file(message)  # printed too
        state = checkpoint.get(RESUME_STATE_KEY)
        if state is None or "random" not in state:
            self.print_to_log_file("Resuming: the checkpoint has no random state (written by nnU-Net's own trainer "
                                   "or an older version of this package); dropout and sampling draw afresh.")
        elif self.is_ddp:
            self.print_to_log_file("Resuming under DDP: each rank keeps fresh random generators (the checkpoint "
                                   "holds rank 0's only).")
        else:
            restore_random_state(state["random"], self.device)
            self._resume_random_state = state["random"]

    def on_train_start(self):
        super().on_train_start()
        # nnU-Net's get_dataloaders has just drawn a warm-up batch from each loader; put the generators back where
        # the checkpoint left them (measured without it: the resumed probe run of
        # tests/test_resume_transfer_nnunet.py trained epoch 1 on other patches, loss 5.702 instead of 5.694)
        state = getattr(self, "_resume_random_state", None)
        if state is not None:
            restore_random_state(state, self.device)
            self._resume_random_state = None

    # ------------------------------------------------------------------ validation
    def perform_actual_validation(self, save_probabilities: bool = False):
        super().perform_actual_validation(save_probabilities)
        if not liver_ext_block(self.plans_manager.plans).get("case_heads") or self.local_rank != 0:
            return
        from nnunet_liver_ext.inference.characterization import characterize_validation_cases
        _, val_keys = self.do_split()
        characterize_validation_cases(self, val_keys)
