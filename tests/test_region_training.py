"""nnU-Net's region-based training (``regions_class_order`` in dataset.json) with every trainer, in process.

With regions, nnU-Net's outputs are one sigmoid per foreground region (here the liver region, liver and
tumor, ``"liver": [1, 2]``, and the tumor region ``"tumor": 2``) and its targets one binary map per
region. The case heads must find the tumor in that layout: the reference tumor for the lesion-guided
pooling and for which samples count in the case-level losses, and the network's own tumor probability
(the region's sigmoid, not a softmax over overlapping regions). Before, STD-Net and MTI-Net failed with a
tensor-size error on the first step. The run through nnU-Net's commands: tests/test_region_training_nnunet.py.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

from nnunet_liver_ext.networks.blocks import lesion_probability, output_probability
from nnunet_liver_ext.training.multitask_trainer import lesion_output, tumor_label_value

from test_mti_net_trainer import (DATASET_JSON, PATCH, PLANS, catalogue_trainers, make_trainer,  # noqa: F401
                                  nnunet_folders)

torch.set_num_threads(1)

REGION_DATASET_JSON = dict(copy.deepcopy(DATASET_JSON), labels={"background": 0, "liver": [1, 2], "tumor": 2},
                           regions_class_order=[1, 2])


def test_lesion_output_is_the_tumor_region_with_a_sigmoid():
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    def output(labels, order=None):
        dataset_json = {"labels": labels, **({"regions_class_order": order} if order else {})}
        return lesion_output(LabelManager(labels, order), dataset_json), tumor_label_value(dataset_json)

    assert output({"background": 0, "liver": 1, "tumor": 2}) == ((2, "softmax"), 2)
    assert output({"background": 0, "liver": [1, 2], "tumor": 2}, [1, 2]) == ((1, "sigmoid"), 2)
    assert output({"background": 0, "tumor": [2], "liver": [1, 2]}, [2, 1]) == ((0, "sigmoid"), 2)
    # no region named tumor: the region of the highest label of regions_class_order alone
    assert output({"background": 0, "whole": [1, 2], "core": [2]}, [1, 2]) == ((1, "sigmoid"), 2)
    assert output({"background": 0, "whole": [1, 2], "core": [1]}, [2, 1]) == (None, 2)  # no tumor region


def test_output_probability_softmax_over_labels_sigmoid_per_region():
    logits = torch.randn(2, 3, 4, 5, 5)
    torch.testing.assert_close(output_probability(logits, 2), torch.softmax(logits, 1)[:, 2:3])
    torch.testing.assert_close(output_probability(logits, 1, "sigmoid"), torch.sigmoid(logits[:, 1:2]))
    logits.requires_grad_(True)
    assert output_probability(logits, 1, "sigmoid").requires_grad  # TIM trains the segmentation through it
    assert not lesion_probability(logits, 1, "sigmoid").requires_grad  # the heads only look through it
    with pytest.raises(ValueError, match="activation"):
        output_probability(logits, 1, "relu")


def make_region_trainer(name: str):
    return make_trainer(name, REGION_DATASET_JSON)


def region_batch(trainer, tumor_in=(True, True)) -> dict:
    """nnU-Net's region-based batch: targets (B, 2, *S) per deep-supervision scale, liver region then tumor."""
    torch.manual_seed(1)
    label = torch.zeros(len(tumor_in), 1, *PATCH)
    label[:, :, 2:14, 4:28, 4:28] = 1
    for b, has_tumor in enumerate(tumor_in):
        if has_tumor:
            label[b, :, 5:11, 10:20, 10:20] = 2
    regions = torch.cat(((label >= 1).float(), (label == 2).float()), 1)
    data = torch.randn(len(tumor_in), 4, *PATCH) + label * torch.tensor([0.5, 2.0, 1.5, 1.0]).view(1, 4, 1, 1, 1)
    targets = [F.interpolate(regions, size=[round(p * s) for p, s in zip(PATCH, scale)], mode="nearest")
               for scale in trainer._get_deep_supervision_scales()]
    return {"data": data, "target": targets, "keys": ["a", "b"][:len(tumor_in)], "label": label}


@pytest.mark.parametrize("name", catalogue_trainers())
def test_every_trainer_trains_on_regions_and_its_heads_see_the_tumor_region(nnunet_folders, name):  # noqa: F811
    trainer = make_region_trainer(name)
    assert trainer.label_manager.has_regions
    batch = region_batch(trainer, tumor_in=(True, False))
    label = batch.pop("label")
    result = trainer.train_step(batch)
    assert all(torch.isfinite(torch.as_tensor(v)) for v in result.values()), result
    if not hasattr(trainer, "reference_tumor"):
        return  # stock nnU-Net's trainers
    assert torch.equal(trainer.reference_tumor(batch["target"]), label == 2)
    network = trainer.network
    if getattr(network, "lesion_channel", None) is not None:
        assert (network.lesion_channel, network.lesion_activation) == (1, "sigmoid")
    if getattr(network, "cls_head", None) is not None:
        # sample "a" has tumor in its patch and a class: the classification term is a real loss, not the zero
        # of a batch without qualifying samples
        assert result["cls_loss"] > 0


def test_mti_net_tim_uses_the_tumor_regions_sigmoid(nnunet_folders):  # noqa: F811
    from nnunet_liver_ext.losses.case_losses import masked_l1
    from nnunet_liver_ext.networks.mti_net import masked_phase_means

    trainer = make_region_trainer("nnUNetTrainerMTINet")
    batch = region_batch(trainer)
    tumor = batch.pop("label") == 2
    trainer.network.eval()
    with torch.no_grad():
        output = trainer.network(batch["data"], heads=True)
        loss = trainer.tim_loss(batch["data"], output, tumor)
    probability = torch.sigmoid(output.seg_highres.float()[:, 1:2])
    expected = masked_l1(masked_phase_means(batch["data"], probability),
                         masked_phase_means(batch["data"], tumor.float()), tumor.flatten(1).any(1))
    torch.testing.assert_close(loss, expected)


def test_mamba_codebook_inclusion_loss_is_on_for_liver_and_tumor_regions(nnunet_folders):  # noqa: F811
    trainer = make_region_trainer("nnUNetTrainerMambaCodebook")
    assert trainer.inclusion_channels == (0, 1, "sigmoid")
    batch = region_batch(trainer)
    batch.pop("label")
    assert "inc_loss" in trainer.train_step(batch)
    with open(trainer.log_file) as f:
        assert "Inclusion loss: on, weight 0.6, liver / tumor region output channels (0, 1)" in f.read()


def test_regions_without_a_tumor_region_refuse_case_heads_and_train_segmentation_methods(nnunet_folders):  # noqa: F811
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    no_tumor = dict(copy.deepcopy(REGION_DATASET_JSON), labels={"background": 0, "whole": [1, 2], "core": [1]},
                    regions_class_order=[2, 1])
    plans = dict(copy.deepcopy(PLANS), continue_training=False)
    with pytest.raises(ValueError, match="case-level heads look at the tumor, but the regions of dataset.json"):
        recursive_find_trainer_class_by_name("nnUNetTrainerSTDNet")(copy.deepcopy(plans), "3d_fullres", 0,
                                                                   copy.deepcopy(no_tumor), torch.device("cpu"))
    trainer = recursive_find_trainer_class_by_name("nnUNetTrainerDynTransNet")(plans, "3d_fullres", 0, no_tumor,
                                                                               torch.device("cpu"))
    trainer.initialize()
    batch = region_batch(trainer)
    batch.pop("label")
    assert not trainer.reference_tumor(batch["target"]).any()
    assert torch.isfinite(torch.as_tensor(trainer.train_step(batch)["loss"]))
