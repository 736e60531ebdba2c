"""Mamba-codebook U-Net trainers: ``nnUNetv2_train DATASET 3d_fullres FOLD -tr nnUNetTrainerMambaCodebook``.

The network is ``nnunet_liver_ext.networks.mamba_codebook.MambaCodebookUNet`` built from the plans
(MCE encoder, VQ codebook and Mamba block at the bottleneck). The loss is the paper's eq. 8,
``L = L_seg + 0.4 L_vq + 0.6 L_inc`` (METHODS.md: (alpha, beta) = (0.4, 0.6)), with nnU-Net's
Dice+CE (deep supervision) as ``L_seg`` and the inclusion loss of ``losses.inclusion`` on the
full-resolution output. The inclusion term needs a liver and a tumor label in dataset.json; on
any other dataset it is off and the log says so. The method segments only: characterization
labels in dataset.json are not used (no class head; ``nnunet-liver predict`` writes segmentations).

Optimisation: the convolutional encoder, MCE and decoder keep nnU-Net's SGD and polynomial schedule
(a comparison with ``nnUNetTrainer`` differs there in the method only); the Mamba / attention block
and the codebook train with AdamW (``training.optim``): Mamba's A_log / dt_bias are trained with
Adam everywhere Mamba is used, and a code's gradient is the mean over all bottleneck elements of
its assigned vectors, too small for SGD to move it (tests/test_mamba_codebook.py shows the codes
moving under AdamW).

Every epoch the log gets the codebook's usage (perplexity, used / dead codes, restarts), because
collapse onto a few codes is the known failure of VQ.

Variants (``-tr``): ``_paper`` (the paper's 4-level, small-width network, about 1.24 M parameters on
3d_fullres plans; no dead-code restart), ablations ``_noMCE``, ``_noCodebook``, ``_noGFR``, ``_MHSA``
(self-attention instead of Mamba at the same place), ``_noInclusion`` (loss ablation), and
``_bidirectional``.
"""
from typing import Dict, List

import torch

from nnunet_liver_ext.dataset_json import TUMOR_NAMES, named_tumor
from nnunet_liver_ext.losses.inclusion import inclusion_loss
from nnunet_liver_ext.networks.contract import NetworkOutput, unwrap_network
from nnunet_liver_ext.networks.mamba_codebook import MambaCodebookUNet
from nnunet_liver_ext.networks.ssd import Mamba2SSD, describe_backend
from nnunet_liver_ext.training.multitask_trainer import LiverMultiTaskTrainer, region_key
from nnunet_liver_ext.training.schedules import register_schedule_variants

#: the paper's widths (4 levels; ~1.24 M parameters with nnU-Net's 2 convolutions per stage)
PAPER_STAGE_FEATURES = (13, 26, 52, 104)


class nnUNetTrainerMambaCodebook(LiverMultiTaskTrainer):
    """Mamba-codebook U-Net: MCE encoder, VQ codebook and Mamba (SSD) bottleneck, inclusion loss."""

    network_class = MambaCodebookUNet
    network_kwargs = {"dead_code_restart": True}
    loss_weights = {}
    #: segmentation only: no case-level head is built, validation and ``nnunet-liver predict`` write no CASE.json
    case_heads = ()
    aux_loss_weights = {"vq": 0.4}
    #: weight of the inclusion loss (METHODS.md: beta = 0.6); 0 turns it off
    inclusion_weight = 0.6
    #: structuring element of the liver-region erosion in the inclusion loss (voxels, odd)
    inclusion_kernel = 3
    adaptive_module_prefixes = ("gfr.", "codebook.")
    guide_heads_with_reference_lesion = False
    dataset_keys_used = ()
    # the network reads a cascade's segmentation as more input channels; it takes their count for the
    # pretrained-weight transfer (networks.transfer)
    network_takes_previous_stage_channels = True

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.case_targets.has_classes:
            self.print_to_log_file("The Mamba-codebook U-Net segments only: the dataset's characterization labels "
                                   "are not used (no class head).")
        self.inclusion_channels = self.liver_and_tumor_channels(self.label_manager, dataset_json)
        if self.inclusion_weight <= 0:
            self.print_to_log_file("Inclusion loss: off (weight 0).")
        elif self.inclusion_channels is None:
            self.print_to_log_file(f"Inclusion loss: OFF, the dataset's labels {dataset_json['labels']} are not "
                                   f"liver + tumor (need a 'liver' label and one of {list(TUMOR_NAMES)}; with "
                                   f"regions, a 'liver' region that contains the tumor region).")
        else:
            liver, tumor, activation = self.inclusion_channels
            kind = "region" if activation == "sigmoid" else "label"
            self.print_to_log_file(f"Inclusion loss: on, weight {self.inclusion_weight}, liver / tumor {kind} output "
                                   f"channels ({liver}, {tumor}), erosion kernel {self.inclusion_kernel}.")

    @staticmethod
    def liver_and_tumor_channels(label_manager, dataset_json: dict):
        """(liver, tumor, activation) output channels, or None when the labels are not liver + tumor: with
        regions, a liver region that contains the tumor region (``"liver": [1, 2], "tumor": 2``)."""
        labels = dataset_json["labels"]
        liver = labels.get("liver")
        tumor = named_tumor(labels)
        if liver is None or tumor is None:
            return None
        if label_manager.has_regions:
            regions = [region_key(r) for r in label_manager.foreground_regions]
            liver, tumor = region_key(liver), region_key(tumor)
            if liver not in regions or tumor not in regions or liver == tumor or not set(tumor) <= set(liver):
                return None
            return regions.index(liver), regions.index(tumor), "sigmoid"
        all_labels = list(label_manager.all_labels)
        if not isinstance(liver, int) or not isinstance(tumor, int) or liver not in all_labels \
                or tumor not in all_labels or liver == tumor:
            return None
        return all_labels.index(liver), all_labels.index(tumor), "softmax"

    def _get_deep_supervision_scales(self):
        # ``stage_features`` (the ``_paper`` widths) can cut the plans' U-Net to fewer stages. nnU-Net derives
        # the targets and loss weights from the plans, and its wrapper zips them with the outputs, so without
        # the cut the coarsest output the network has would be trained (weight 0.13, not nnU-Net's 0), the
        # weights would not sum to 1 and the loader would downsample targets nobody reads.
        scales = super()._get_deep_supervision_scales()
        stage_features = self.network_kwargs.get("stage_features")
        if scales is None or stage_features is None:
            return scales
        return scales[:len(stage_features) - 1]

    def initialize(self):
        super().initialize()
        network = unwrap_network(self.network)
        if network.gfr is not None and isinstance(network.gfr.mixer, Mamba2SSD):
            self.print_to_log_file(f"GFR Mamba2 block backend: {describe_backend(self.device, network.gfr.mixer.backend)}")
        elif network.gfr is not None:
            self.print_to_log_file("GFR: multi-head self-attention (MHSA ablation)")

    def case_loss_terms(self, output: NetworkOutput, target, keys: List[str]) -> Dict[str, torch.Tensor]:
        terms = super().case_loss_terms(output, target, keys)
        if self.inclusion_channels is not None and self.inclusion_weight > 0:
            liver, tumor, activation = self.inclusion_channels
            terms["inc"] = self.inclusion_weight * inclusion_loss(output.seg_highres, liver, tumor,
                                                                  self.inclusion_kernel, activation)
        return terms

    def on_train_epoch_end(self, train_outputs: List[dict]):
        super().on_train_epoch_end(train_outputs)
        codebook = unwrap_network(self.network).codebook
        if codebook is not None:
            s = codebook.usage_stats(reset=True)
            self.print_to_log_file(f"codebook usage: perplexity {s['perplexity']:.2f} of {codebook.num_codes} codes, "
                                   f"used {s['used_codes']}, dead {s['dead_codes']}, restarted {s['restarted']} "
                                   f"({s['assignments']} assignments)")


class nnUNetTrainerMambaCodebook_paper(nnUNetTrainerMambaCodebook):
    """Mamba-codebook U-Net at the paper's size: 4 levels, widths 13..104 (~1.24 M parameters), no code restart."""

    network_kwargs = {"stage_features": PAPER_STAGE_FEATURES, "dead_code_restart": False}


class nnUNetTrainerMambaCodebook_noMCE(nnUNetTrainerMambaCodebook):
    """Mamba-codebook ablation: no multi-scale context encoder (plain nnU-Net encoder stages)."""

    network_kwargs = {**nnUNetTrainerMambaCodebook.network_kwargs, "use_mce": False}


class nnUNetTrainerMambaCodebook_noCodebook(nnUNetTrainerMambaCodebook):
    """Mamba-codebook ablation: no VQ codebook (continuous bottleneck, no L_vq)."""

    network_kwargs = {**nnUNetTrainerMambaCodebook.network_kwargs, "use_codebook": False}


class nnUNetTrainerMambaCodebook_noGFR(nnUNetTrainerMambaCodebook):
    """Mamba-codebook ablation: no global feature representation (no Mamba block)."""

    network_kwargs = {**nnUNetTrainerMambaCodebook.network_kwargs, "gfr": None}


class nnUNetTrainerMambaCodebook_MHSA(nnUNetTrainerMambaCodebook):
    """Mamba-codebook ablation: multi-head self-attention instead of Mamba at the bottleneck."""

    network_kwargs = {**nnUNetTrainerMambaCodebook.network_kwargs, "gfr": "mhsa"}


class nnUNetTrainerMambaCodebook_noInclusion(nnUNetTrainerMambaCodebook):
    """Mamba-codebook loss ablation: L_seg + 0.4 L_vq, no inclusion loss."""

    inclusion_weight = 0.0


class nnUNetTrainerMambaCodebook_bidirectional(nnUNetTrainerMambaCodebook):
    """Mamba-codebook U-Net with a bidirectional Mamba block (forward and reversed z scans, summed)."""

    network_kwargs = {**nnUNetTrainerMambaCodebook.network_kwargs, "bidirectional": True}


# nnUNetTrainerMambaCodebook_tiny, ..._MHSA_short, ...: every trainer above on every schedule of
# training.schedules.SCHEDULES
register_schedule_variants(globals())
