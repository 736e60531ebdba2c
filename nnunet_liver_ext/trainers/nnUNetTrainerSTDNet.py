"""STD-Net trainers: ``nnUNetv2_train DATASET 3d_fullres FOLD -tr nnUNetTrainerSTDNet``.

The network is ``nnunet_liver_ext.networks.std_net.STDNet`` built from the plans; the loss is
nnU-Net's Dice+CE (weight 1.0) plus 0.5 x cross-entropy of the characterization head (METHODS.md:
lambda1 = 1.0, lambda2 = 0.5). The convolutional encoder and decoder keep nnU-Net's SGD and
polynomial schedule, so a comparison with ``nnUNetTrainer`` differs there in the method only; the
Transformer and the characterization head train with AdamW (``training.optim``: under nnU-Net's
SGD they stayed at chance). ``nnUNetTrainerSTDNet_paper`` uses the paper's AdamW / cosine
schedule for everything.

Ablations of the paper's Table 4, each selectable with ``-tr``:
``_noTemporal`` (a), ``_earlyFusion`` (b), ``_noWeightSharing`` (c), ``_ConvGRU`` (d), ``_hybrid`` (e),
plus ``_refPhase`` (decode from the portal venous phase alone, as the paper does).
"""
import torch

from nnunet_liver_ext.networks.std_net import STDNet
from nnunet_liver_ext.training.multitask_trainer import LiverMultiTaskTrainer
from nnunet_liver_ext.training.schedules import WarmupCosineLRScheduler, register_schedule_variants


class nnUNetTrainerSTDNet(LiverMultiTaskTrainer):
    """STD-Net: shared phase encoder, Transformer across phases, [CLS] characterization head."""

    network_class = STDNet
    network_kwargs = {}
    loss_weights = {"cls": 0.5}
    # the Transformer, the case pooling and the MLP train with AdamW; encoder and decoder keep SGD
    adaptive_module_prefixes = ("temporal.", "case_pool.", "cls_head.")
    network_takes_lesion_channel = True
    network_takes_previous_stage_channels = True
    network_takes_channels_per_phase = True
    #: decode from this phase alone (the paper's choice) instead of fusing the phases
    reference_phase_name = None

    @classmethod
    def method_network_kwargs(cls, plans_block: dict, num_image_channels: int) -> dict:
        if cls.reference_phase_name is None:
            return {}
        phases = plans_block.get("phases")
        if not phases or cls.reference_phase_name not in phases:
            raise ValueError(f"{cls.__name__} decodes from the {cls.reference_phase_name} phase, but dataset.json "
                             f"phases are {phases}")
        return {"reference_phase": phases.index(cls.reference_phase_name)}


class nnUNetTrainerSTDNet_noTemporal(nnUNetTrainerSTDNet):
    """STD-Net ablation (a): no temporal modeler, phases fused by their mean.

    The mean replaces the fusion everywhere: at the bottleneck and at every skip, where the full network
    fuses phases with a learned voxel-wise attention (ours, not the paper's). The difference to
    ``nnUNetTrainerSTDNet`` measures the Transformer and that attention together."""

    network_kwargs = {"temporal": "mean"}


class nnUNetTrainerSTDNet_earlyFusion(nnUNetTrainerSTDNet):
    """STD-Net ablation (b): phases as channels of one encoder (joint space-time)."""

    network_kwargs = {"fusion": "early"}


class nnUNetTrainerSTDNet_noWeightSharing(nnUNetTrainerSTDNet):
    """STD-Net ablation (c): one encoder per phase."""

    network_kwargs = {"share_encoder": False}


class nnUNetTrainerSTDNet_ConvGRU(nnUNetTrainerSTDNet):
    """STD-Net ablation (d): ConvGRU temporal modeler instead of the Transformer."""

    network_kwargs = {"temporal": "convgru"}


class nnUNetTrainerSTDNet_hybrid(nnUNetTrainerSTDNet):
    """STD-Net ablation (e): low-rank spatial-temporal fusion after the third Transformer layer."""

    network_kwargs = {"temporal": "hybrid"}


class nnUNetTrainerSTDNet_refPhase(nnUNetTrainerSTDNet):
    """STD-Net decoding from the portal venous phase alone, as the paper does."""

    dataset_keys_required = ("phases",)
    reference_phase_name = "portal_venous"


class nnUNetTrainerSTDNet_paper(nnUNetTrainerSTDNet):
    """STD-Net with the paper's optimisation: AdamW lr 1e-4, wd 1e-5, 20-epoch linear warm-up then cosine, 500 epochs."""

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 1e-4
        self.weight_decay = 1e-5
        self.num_epochs = 500
        self.warmup_epochs = 20

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.network.parameters(), lr=self.initial_lr, weight_decay=self.weight_decay)
        return optimizer, WarmupCosineLRScheduler(optimizer, self.initial_lr, self.num_epochs, self.warmup_epochs)


# nnUNetTrainerSTDNet_5epochs, ..._tiny, nnUNetTrainerSTDNet_hybrid_short, ...: every trainer above on every
# schedule of training.schedules.SCHEDULES
register_schedule_variants(globals())
