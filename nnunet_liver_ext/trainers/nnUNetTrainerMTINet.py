"""MTI-Net trainers: ``nnUNetv2_train DATASET 3d_fullres FOLD -tr nnUNetTrainerMTINet`` (``2d`` for the
paper's setting).

The network is ``nnunet_liver_ext.networks.mti_net.MTINet`` built from the plans. One training step:

- generator step: ``net(x, heads=True, lesion_mask=reference tumor)``; loss = ``seg`` x nnU-Net's
  Dice+CE + ``curve`` x L1 of the curve head to dataset.json ``enhancement`` in standardised units
  (the shared trainer's term) + ``cls`` x cross-entropy (shared) + ``tim`` x L_1seg + ``adv`` x the
  discriminator's BCE of the predicted (curve, class probabilities) against "real"; the encoder,
  MdIEF, decoder and heads are updated, the discriminator is not;
- discriminator step: BCE of the discriminator on the reference (curve, one-hot class) pairs
  (real) and on the generator step's detached predictions (fake); only the discriminator is
  updated (its own Adam, lr ``discriminator_lr``).

TIM (L_1seg): the predicted tumor probability (full-resolution output, not detached: the term trains
the segmentation) weights every phase image of the batch; the weighted means form a curve, compared
(L1) with the same curve under the reference tumor mask on the same nnU-Net-normalised images.
Samples whose patch has no reference tumor are left out of TIM, the class and the adversarial terms.

The discriminator is a submodule of the network (so the checkpoint's ``network_weights`` hold it and
stock ``nnUNetv2_predict`` rebuilds and strictly loads it; inference never runs it) and its Adam is
the last optimizer of the trainer's ``HybridOptimizer`` (so nnU-Net's checkpoint ``optimizer_state``
and ``--c`` carry it). DDP: the generator step runs through DDP's forward and every parameter,
the discriminator's included, receives a gradient in its backward (the discriminator's are then
dropped); the discriminator step's backward runs outside DDP's forward, which DDP ignores, and its
gradients are averaged across ranks explicitly.

Convolutional parts (encoder, MdIEF, concatenation, decoder) keep nnU-Net's SGD and polynomial
decay; the token pooling, Transformer and heads train with AdamW (as for STD-Net: under nnU-Net's
SGD the heads stayed at chance). ``_paper``: Adam lr 1e-4 for everything, constant, 100 epochs.
Ablations (paper Tables 3-4): ``_noMdIEF``, ``_noSpectral``, ``_noSpatial``, ``_noTIM``, ``_noTDD``,
``_segOnly``, ``_segReg``, ``_segCls``; plus ``_noWeightSharing`` (one encoder per phase).
"""
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from nnunet_liver_ext.losses.case_losses import masked_bce_with_logits, masked_l1, samples_over_ranks
from nnunet_liver_ext.networks.blocks import output_probability
from nnunet_liver_ext.networks.contract import NetworkOutput, unwrap_network
from nnunet_liver_ext.networks.mti_net import MTINet, masked_phase_means
from nnunet_liver_ext.training.multitask_trainer import LiverMultiTaskTrainer
from nnunet_liver_ext.training.optim import HybridOptimizer, PolyLRPerGroup
from nnunet_liver_ext.training.plans import liver_ext_block
from nnunet_liver_ext.training.schedules import register_schedule_variants

DISCRIMINATOR_PREFIX = "discriminator."


class nnUNetTrainerMTINet(LiverMultiTaskTrainer):
    """MTI-Net: per-phase encoder + MdIEF, concatenation decoder, Transformer curve/class heads, TIM and TDD."""

    network_class = MTINet
    network_kwargs = {}
    #: L_seg (nnU-Net's Dice+CE), L_reg (curve L1, standardised units), L_cls (CE), L_1seg (TIM), L_adv
    loss_weights = {"seg": 1.0, "curve": 1.0, "cls": 0.5, "tim": 0.5, "adv": 0.05}
    adaptive_module_prefixes = ("token_pools.", "transformer.", "curve_head.", "cls_head.")
    network_takes_lesion_channel = True
    network_takes_previous_stage_channels = True
    network_takes_channels_per_phase = True
    #: built where the dataset has their targets (the shared trainer's plans block); the TDD needs both
    case_heads = ("cls", "curve")
    dataset_keys_required = ("characterization", "enhancement")
    dataset_keys_used = ("phases", "characterization", "enhancement")
    discriminator_lr: float = 1e-4
    discriminator_betas = (0.5, 0.999)

    # ------------------------------------------------------------------ network
    @classmethod
    def method_network_kwargs(cls, plans_block: dict, num_image_channels: int) -> dict:
        # build only what the training step uses (DDP without find_unused_parameters)
        heads = plans_block.get("case_heads", [])
        curve = "curve" in heads and bool(plans_block.get("enhancement_stats"))
        classes = "cls" in heads and bool(plans_block.get("case_classes"))
        return {"curve_head": curve, "discriminator": curve and classes and cls.loss_weights.get("adv", 0) > 0}

    # ------------------------------------------------------------------ optimisers
    def generator_optimizers(self, sgd_params: list, adaptive_params: list) -> List[torch.optim.Optimizer]:
        optimizers = [torch.optim.SGD(sgd_params, self.initial_lr, weight_decay=self.weight_decay, momentum=0.99,
                                      nesterov=True)]
        if adaptive_params:
            optimizers.append(torch.optim.AdamW(adaptive_params, self.adaptive_lr,
                                                weight_decay=self.adaptive_weight_decay))
        return optimizers

    def lr_scheduler_for(self, optimizer):
        return PolyLRPerGroup(optimizer, self.num_epochs)

    def configure_optimizers(self):
        network = unwrap_network(self.network)
        named = [(n, p) for n, p in network.named_parameters() if p.requires_grad]
        prefixes = tuple(self.adaptive_module_prefixes)
        generator = [(n, p) for n, p in named if not n.startswith(DISCRIMINATOR_PREFIX)]
        sgd = [p for n, p in generator if not n.startswith(prefixes)]
        adaptive = [p for n, p in generator if n.startswith(prefixes)]
        optimizers = self.generator_optimizers(sgd, adaptive)
        discriminator = [p for n, p in named if n.startswith(DISCRIMINATOR_PREFIX)]
        self.discriminator_optimizer = None
        if discriminator:
            # the last optimizer of the HybridOptimizer: nnU-Net's checkpoint (optimizer_state) and --c carry it
            self.discriminator_optimizer = torch.optim.Adam(discriminator, self.discriminator_lr,
                                                            betas=self.discriminator_betas)
            optimizers.append(self.discriminator_optimizer)
        optimizer = HybridOptimizer(optimizers)
        self.print_to_log_file(
            "Optimizers: " + ", ".join(f"{type(o).__name__} (lr {o.param_groups[0]['lr']}, "
                                       f"{sum(len(g['params']) for g in o.param_groups)} tensors)" for o in optimizers)
            + f"; discriminator: {'yes' if discriminator else 'none'}; loss weights {self.loss_weights}")
        return optimizer, self.lr_scheduler_for(optimizer)

    # ------------------------------------------------------------------ losses
    def tim_loss(self, data: torch.Tensor, output: NetworkOutput, tumor: torch.Tensor,
                 annotated: Optional[torch.Tensor] = None) -> torch.Tensor:
        """L_1seg: L1 between the curve under the predicted tumor probability and under the reference
        tumor mask, both the weighted means of the same normalised phase images. tumor ``(B, 1, *S)`` bool;
        ``annotated`` ``(B, 1, *S)`` bool (nnU-Net's ignore label): the predicted curve reads only those
        voxels, since the reference curve cannot hold a tumor where nothing is annotated."""
        network = unwrap_network(self.network)
        block = liver_ext_block(self.plans_manager.plans)
        probability = output_probability(output.seg_highres, block.get("lesion_channel", -1),
                                         block.get("lesion_activation", "softmax"))
        if annotated is not None:
            probability = probability * annotated
        images = data[:, :network.num_phases * network.channels_per_phase]  # not a cascade's segmentation
        predicted = masked_phase_means(images, probability, network.channels_per_phase)
        reference = masked_phase_means(images, tumor.float(), network.channels_per_phase)
        return masked_l1(predicted, reference, tumor.flatten(1).any(1))

    def adversarial_pairs(self, output: NetworkOutput, keys: List[str], tumor: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Predicted ("fake") and reference ("real") (curve, class probabilities) of the batch, and the
        samples that have both labels and tumor in their patch."""
        mean, std = liver_ext_block(self.plans_manager.plans).get("enhancement_stats", (0.0, 1.0))
        curves, known_curve = self.case_targets.curves(keys, output.curve.shape[1], self.device)
        labels, known_class = self.case_targets.class_labels(keys, self.device)
        k = output.cls_logits.shape[1]
        return {"fake_curve": output.curve.float(), "fake_probs": torch.softmax(output.cls_logits.float(), -1),
                "real_curve": (curves - mean) / std, "real_probs": F.one_hot(labels.clamp(min=0), k).float(),
                "mask": known_curve & known_class & tumor.flatten(1).any(1)}

    # ------------------------------------------------------------------ the step
    def train_step(self, batch: dict) -> dict:
        data, target, keys, tumor = self.unpack_batch(batch)
        lesion_mask = tumor.float() if self.guide_heads_with_reference_lesion else None
        discriminator = unwrap_network(self.network).discriminator

        self.optimizer.zero_grad(set_to_none=True)
        pairs = None
        with self._autocast():
            output = self.network(data, heads=True, lesion_mask=lesion_mask)
            seg_loss = self.loss(output.seg, target)
            terms = self.case_loss_terms(output, target, keys)
            if self.loss_weights.get("tim", 0) > 0:
                terms["tim"] = self.loss_weights["tim"] * self.tim_loss(data, output, tumor,
                                                                        self.annotated_voxels(target))
            if discriminator is not None:
                pairs = self.adversarial_pairs(output, keys, tumor)
                # the generator wants its pairs judged real; the discriminator's own gradients from this
                # term are computed (DDP expects every parameter in this backward) and then dropped
                terms["adv"] = self.loss_weights["adv"] * masked_bce_with_logits(
                    discriminator(pairs["fake_curve"], pairs["fake_probs"]), True, pairs["mask"])
            loss = self.loss_weights.get("seg", 1.0) * seg_loss + sum(terms.values())
        finite = self.check_finite_losses({"seg": seg_loss, **terms})
        self._generator_update(loss, discriminator)  # the grad scaler skips a non-finite step
        self.iteration_in_epoch = getattr(self, "iteration_in_epoch", 0) + 1
        result = {"loss": loss.detach().cpu().numpy(), "seg_loss": seg_loss.detach().cpu().numpy()}
        result.update({f"{name}_loss": value.detach().cpu().numpy() for name, value in terms.items()})
        if pairs is not None:
            # the discriminator's step has no grad scaler to skip it: non-finite pairs must not reach it, and
            # under DDP every rank takes the step or none does (its gradients are all-reduced by hand)
            if self.is_ddp:
                flag = torch.tensor(float(finite), device=self.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MIN)
                finite = bool(flag.item())
            result["disc_loss"] = self._discriminator_update(discriminator, pairs) if finite else np.float32(np.nan)
        return result

    def _generator_update(self, loss: torch.Tensor, discriminator) -> None:
        """nnU-Net's update (the shared ``_backward_and_step``) of everything but the discriminator: its
        gradients are dropped before clipping, so its Adam (inside the HybridOptimizer) skips it."""
        def drop_discriminator_gradients():
            for p in discriminator.parameters():
                p.grad = None

        self._backward_and_step(loss, drop_discriminator_gradients if discriminator is not None else None)

    def _discriminator_update(self, discriminator, pairs: Dict[str, torch.Tensor]):
        """One step of the discriminator alone on real pairs and the generator step's detached predictions.
        Runs in fp32 (the discriminator casts) without the grad scaler; outside DDP's forward, so DDP
        leaves these gradients alone and they are averaged across ranks here."""
        self.optimizer.zero_grad(set_to_none=True)
        mask = pairs["mask"]
        d_real = discriminator(pairs["real_curve"], pairs["real_probs"])
        d_fake = discriminator(pairs["fake_curve"].detach(), pairs["fake_probs"].detach())
        loss = 0.5 * (masked_bce_with_logits(d_real, True, mask) + masked_bce_with_logits(d_fake, False, mask))
        loss.backward()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            world = dist.get_world_size()
            for p in discriminator.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world
        if samples_over_ranks(mask).item() > 0:  # the same decision on every rank (the count is over all ranks)
            self.discriminator_optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach().cpu().numpy()


class nnUNetTrainerMTINet_paper(nnUNetTrainerMTINet):
    """MTI-Net with the paper's optimisation: Adam lr 1e-4 (constant) for everything, 100 epochs; train it on 2d."""

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 1e-4
        self.num_epochs = 100
        if configuration != "2d" and "2d" in plans.get("configurations", {}):
            self.print_to_log_file("The paper trains on 2D slices: nnUNetv2_train DATASET 2d FOLD -tr "
                                   f"{type(self).__name__} reproduces that setting (this run: {configuration}).")

    def generator_optimizers(self, sgd_params: list, adaptive_params: list) -> List[torch.optim.Optimizer]:
        return [torch.optim.Adam(sgd_params + adaptive_params, self.initial_lr)]

    def lr_scheduler_for(self, optimizer):
        return PolyLRPerGroup(optimizer, self.num_epochs, exponent=0.0)  # constant


class nnUNetTrainerMTINet_noMdIEF(nnUNetTrainerMTINet):
    """MTI-Net ablation (Table 3): no MdIEF, the encoder features go to the decoder and the Transformer as they are."""

    network_kwargs = {"mdief": "none"}


class nnUNetTrainerMTINet_noSpectral(nnUNetTrainerMTINet):
    """MTI-Net ablation (Table 3): MdIEF without the spectral (FFT high-pass) input to its second branch."""

    network_kwargs = {"mdief": "no_spectral"}


class nnUNetTrainerMTINet_noSpatial(nnUNetTrainerMTINet):
    """MTI-Net ablation (Table 3): MdIEF's spectral branch alone, without the spatial features."""

    network_kwargs = {"mdief": "no_spatial"}


class nnUNetTrainerMTINet_noTIM(nnUNetTrainerMTINet):
    """MTI-Net ablation (Table 3): no task interaction module (no L_1seg)."""

    loss_weights = {**nnUNetTrainerMTINet.loss_weights, "tim": 0.0}


class nnUNetTrainerMTINet_noTDD(nnUNetTrainerMTINet):
    """MTI-Net ablation (Table 3): no task-driven discriminator (no L_adv, no discriminator built)."""

    loss_weights = {**nnUNetTrainerMTINet.loss_weights, "adv": 0.0}


class nnUNetTrainerMTINet_segOnly(nnUNetTrainerMTINet):
    """MTI-Net synergy ablation (Table 4): segmentation only (no heads, TIM or discriminator)."""

    loss_weights = {**nnUNetTrainerMTINet.loss_weights, "curve": 0.0, "cls": 0.0, "tim": 0.0, "adv": 0.0}
    case_heads = ()
    dataset_keys_required = ()
    dataset_keys_used = ("phases",)


class nnUNetTrainerMTINet_segReg(nnUNetTrainerMTINet):
    """MTI-Net synergy ablation (Table 4): segmentation + enhancement regression (with TIM), no class head."""

    loss_weights = {**nnUNetTrainerMTINet.loss_weights, "cls": 0.0, "adv": 0.0}
    case_heads = ("curve",)
    dataset_keys_required = ("enhancement",)
    dataset_keys_used = ("phases", "enhancement")


class nnUNetTrainerMTINet_segCls(nnUNetTrainerMTINet):
    """MTI-Net synergy ablation (Table 4): segmentation + classification, no curve head, TIM or discriminator."""

    loss_weights = {**nnUNetTrainerMTINet.loss_weights, "curve": 0.0, "tim": 0.0, "adv": 0.0}
    case_heads = ("cls",)
    dataset_keys_required = ("characterization",)
    dataset_keys_used = ("phases", "characterization")


class nnUNetTrainerMTINet_noWeightSharing(nnUNetTrainerMTINet):
    """MTI-Net with one encoder per phase (the paper leaves the weight sharing open)."""

    network_kwargs = {"share_encoder": False}


# nnUNetTrainerMTINet_tiny, ..._demo, nnUNetTrainerMTINet_noTDD_short, ...: every trainer above on every
# schedule of training.schedules.SCHEDULES
register_schedule_variants(globals())
