"""DynTransNet trainers: ``nnUNetv2_train DATASET 3d_fullres FOLD -tr nnUNetTrainerDynTransNet``.

The network is ``nnunet_liver_ext.networks.dyntransnet.DynTransNet`` built from the plans (stages,
strides, widths, kernels, norm / nonlin; the plans' patch size is checked against the tokenisation).
It segments only: phases are input channels, there is no case-level head and no case loss, so the
loss is nnU-Net's Dice+CE with its deep supervision. The shared trainer (``LiverMultiTaskTrainer``)
still gives it the phase-synchronised intensity augmentation, validation and schedules.

Ablations of the paper's Tables 2-3, each selectable with ``-tr``: ``_plainMSA`` (no dynamic bias),
``_concatFusion`` / ``_sumFusion`` (FM-M replaced by concatenation / a weighted sum), ``_noRM``.
"""
import torch
from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss, DC_and_CE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.training.nnUNetTrainer.variants.loss.nnUNetTrainerDiceLoss import nnUNetTrainerDiceLoss

from nnunet_liver_ext.networks.dyntransnet import DynTransNet
from nnunet_liver_ext.training.multitask_trainer import LiverMultiTaskTrainer
from nnunet_liver_ext.training.optim import PolyLRWithLinearWarmup
from nnunet_liver_ext.training.schedules import register_schedule_variants


class nnUNetTrainerDynTransNet(LiverMultiTaskTrainer):
    """DynTransNet: transformer encoder with dynamic attention (D-MSA), FM-M + RM decoder; segmentation only.

    Optimiser: AdamW for the whole network in the way nnU-Net's Primus trainers train theirs (weight
    decay 5e-2, betas (0.9, 0.98), gradient clipping at 1, linear warm-up, here over the first 5 % of
    all iterations so that the short schedules keep one, then nnU-Net's polynomial decay per epoch),
    with lr 1e-3 instead of Primus' 3e-4.

    Why, measured (benchmarks/dyntransnet_optimizer_probe.py -> results/dyntransnet_optimizer_probe/
    probe.json: CPU, one seed, phantom volumes 16 x 48 x 48, CPU-demo widths, Dice+CE, 80 steps of
    batch 2, no augmentation but flips; held-out Dice on 4 unseen cases, liver = region {1, 2}):

    =====================================  ==============  ===========  ===========
    setting                                loss, last 10   liver Dice   tumor Dice
    =====================================  ==============  ===========  ===========
    stock U-Net, nnU-Net SGD (reference)   -0.05           0.11         0.00
    DynTransNet, nnU-Net SGD               -0.20           0.60         0.00
    DynTransNet, SGD + AdamW 1e-3 (hybrid) -0.25           0.64         0.02
    DynTransNet, AdamW 3e-4 (Primus)        0.31           0.26         0.05
    DynTransNet, AdamW 1e-3 (this trainer) -0.26           0.56         0.24
    =====================================  ==============  ===========  ===========

    nnU-Net's SGD does train DynTransNet (unlike STD-Net's attention heads), but only AdamW at 1e-3
    started to find the tumors within the probe; Primus' 3e-4 was the slowest to start. 80 steps and
    one seed: a direction, not a verdict. Against stock nnUNetTrainer on the demo schedule:
    benchmarks/results/dyntransnet_vs_nnunet_cpu/demo/report.md.
    """

    network_class = DynTransNet
    network_kwargs = {}
    loss_weights = {"cls": 0.0, "curve": 0.0}
    aux_loss_weights = {}
    dataset_keys_used = ("phases",)
    # segmentation only: no case-level head is built, nnunet-liver predict writes no CASE.json and the
    # end-of-training validation has no characterization pass
    case_heads = ()
    # a plans patch the tokenisation cannot handle fails at construction, naming one that works
    network_takes_patch_size = True
    # no case head looks at the lesion, so the reference lesion mask is not built for the network
    guide_heads_with_reference_lesion = False
    #: AdamW (Primus' settings, a higher learning rate: see the docstring)
    adamw_lr: float = 1e-3
    adamw_weight_decay: float = 5e-2
    adamw_betas = (0.9, 0.98)
    grad_clip_norm: float = 1.0
    #: linear warm-up over this fraction of all training iterations
    warmup_fraction: float = 0.05

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = self.adamw_lr
        self.weight_decay = self.adamw_weight_decay

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.network.parameters(), lr=self.initial_lr, weight_decay=self.weight_decay,
                                      betas=self.adamw_betas)
        self.print_to_log_file(f"Optimizer: AdamW (lr {self.initial_lr}, weight decay {self.weight_decay}, betas "
                               f"{self.adamw_betas}), warm-up over {self.warmup_iterations()} iterations, polynomial "
                               f"decay, gradient clipping at {self.grad_clip_norm}")
        return optimizer, PolyLRWithLinearWarmup(optimizer, self.num_epochs, self.num_iterations_per_epoch,
                                                 self.warmup_iterations())

    def warmup_iterations(self) -> int:
        return int(round(self.warmup_fraction * self.num_epochs * self.num_iterations_per_epoch))

    def on_train_epoch_start(self):
        super().on_train_epoch_start()  # nnU-Net steps the scheduler and logs the epoch's first learning rate
        warmup = self.lr_scheduler.epoch_warmup()
        if warmup is not None:
            # nnU-Net prints the rate rounded to 5 decimals: 0.0 in a long warm-up's first epochs
            self.print_to_log_file(f"Warm-up: the learning rate rises linearly from {warmup[0]:.3g} to "
                                   f"{warmup[1]:.3g} over this epoch")

    def train_step(self, batch: dict) -> dict:
        self.lr_scheduler.begin_iteration()
        return super().train_step(batch)


class nnUNetTrainerDynTransNet_paper(nnUNetTrainerDynTransNet):
    """DynTransNet with the paper's training: Adam lr 1e-4 (constant), Dice loss only, 300 epochs.

    The batch size stays the plans' (nnU-Net's 3d_fullres default is 2, the paper's batch)."""

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 1e-4
        self.weight_decay = 0.0
        self.num_epochs = 300
        self.grad_clip_norm = 12.0  # nnU-Net's clipping; the paper names none

    def warmup_iterations(self) -> int:
        return 0

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.network.parameters(), lr=self.initial_lr, weight_decay=self.weight_decay)
        self.print_to_log_file(f"Optimizer: Adam (lr {self.initial_lr}, constant), Dice loss only (the paper's)")
        # the paper's constant rate: no decay (exponent 0), no warm-up
        return optimizer, PolyLRWithLinearWarmup(optimizer, self.num_epochs, self.num_iterations_per_epoch, 0,
                                                 exponent=0.0)

    def _build_loss(self):
        # Dice only: nnU-Net's own Dice-loss trainer's loss (soft Dice, its deep supervision weights)
        loss = nnUNetTrainerDiceLoss._build_loss(self)
        if self.label_manager.has_ignore_label:
            # that trainer reads nnU-Net's ignore label as a class (an index error with labels, a Dice over the
            # ignore channel as a third region with regions); nnU-Net's compound losses mask it instead
            masked = self._dice_loss_masking_the_ignore_label()
            if self.enable_deep_supervision:
                loss.loss = masked
            else:
                loss = masked
        if self.enable_deep_supervision and self.is_ddp and not self._do_i_compile():
            # that trainer gives the coarsest output weight 0 even under DDP, so its parameters get no gradient
            # and DDP fails on the second step; nnUNetTrainer._build_loss keeps 1e-6 there for this reason
            weights = [1 / 2 ** i for i in range(len(loss.weight_factors))]
            weights[-1] = 1e-6
            loss.weight_factors = tuple(w / sum(weights) for w in weights)
        return loss

    def _dice_loss_masking_the_ignore_label(self):
        """nnUNetTrainerDiceLoss's soft Dice (same arguments) inside nnU-Net's compound loss, which leaves the
        voxels under the ignore label out, with the cross-entropy term weighted 0."""
        dice_kwargs = {"batch_dice": self.configuration_manager.batch_dice, "do_bg": self.label_manager.has_regions,
                       "smooth": 1e-5, "ddp": self.is_ddp}
        if self.label_manager.has_regions:
            return DC_and_BCE_loss({}, dice_kwargs, weight_ce=0, use_ignore_label=True,
                                   dice_class=MemoryEfficientSoftDiceLoss)
        return DC_and_CE_loss(dice_kwargs, {}, weight_ce=0, ignore_label=self.label_manager.ignore_label,
                              dice_class=MemoryEfficientSoftDiceLoss)


class nnUNetTrainerDynTransNet_plainMSA(nnUNetTrainerDynTransNet):
    """DynTransNet ablation (Table 3): plain multi-head self-attention instead of D-MSA (no dynamic bias)."""

    network_kwargs = {"dynamic_bias": False}


class nnUNetTrainerDynTransNet_concatFusion(nnUNetTrainerDynTransNet):
    """DynTransNet ablation (Table 2): FM-M replaced by concatenation and a 1x1 convolution."""

    network_kwargs = {"fusion": "concat"}


class nnUNetTrainerDynTransNet_sumFusion(nnUNetTrainerDynTransNet):
    """DynTransNet ablation (Table 2): FM-M replaced by a learned weighted sum."""

    network_kwargs = {"fusion": "sum"}


class nnUNetTrainerDynTransNet_noRM(nnUNetTrainerDynTransNet):
    """DynTransNet ablation (Table 3): no residual module (RM) in the decoder."""

    network_kwargs = {"residual_module": False}


# nnUNetTrainerDynTransNet_5epochs, ..._tiny, nnUNetTrainerDynTransNet_noRM_short, ...: every trainer above on
# every schedule of training.schedules.SCHEDULES
register_schedule_variants(globals())
