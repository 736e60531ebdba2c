"""The characterization predictor's case aggregation (inference/characterization.py) with a network
whose outputs are known exactly, through nnU-Net's own sliding window; and the plans the trainer
writes for it.

The network below follows the contract: tumor logit +10 where the input is > 0.5 (the lesion), a
chosen faint background probability elsewhere; a patch that sees the lesion says class A, any other
patch says B. The true class of a case with a lesion is A.
"""
import json
import math

import pytest
import torch
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from torch import nn

from nnunet_liver_ext.inference.characterization import (AGGREGATION_LESION, AGGREGATION_NO_LESION, NOT_WRITTEN,
                                                         ONLY_WRITTEN, CharacterizationPredictor, argmax_is,
                                                         write_case_json, write_characterization_csv)
from nnunet_liver_ext.networks.contract import NetworkOutput
from nnunet_liver_ext.networks.std_net import STDNet
from nnunet_liver_ext.training.multitask_trainer import LiverMultiTaskTrainer

PATCH = [32, 32, 32]
VOLUME = (64, 64, 64)  # 27 tiles at step 0.5
DATASET_JSON = {"labels": {"background": 0, "liver": 1, "tumor": 2}, "channel_names": {"0": "CT"},
                "file_ending": ".nii.gz"}


def plans(block=None, patch=PATCH):
    arch = {"network_class_name": "unused", "arch_kwargs": {}, "_kw_requires_import": []}
    result = {"dataset_name": "Dataset999_Test", "plans_name": "P", "label_manager": "LabelManager",
              "configurations": {"3d_fullres": {"patch_size": patch, "architecture": arch}}}
    if block is not None:
        result["nnunet_liver_ext"] = block
    return result


class KnownOutputs(nn.Module):
    def __init__(self, p_background: float, fail_on_call: int = 0):
        super().__init__()
        self.background_logit = math.log(p_background / (1 - p_background))
        self.fail_on_call = fail_on_call
        self.calls = 0
        self.unused = nn.Parameter(torch.zeros(1))  # nnU-Net moves the network with .to()

    def forward(self, x, heads=False, lesion_mask=None):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("CUDA out of memory (simulated)")
        lesion = x[:, :1] > 0.5
        tumor = torch.where(lesion, torch.tensor(10.0), torch.tensor(self.background_logit))
        seg = torch.cat([torch.zeros_like(tumor), torch.full_like(tumor, -20.0), tumor], 1)
        if not heads:
            return seg
        sees = lesion.flatten(1).any(1)
        cls = torch.stack([torch.where(sees, 3.0, 0.0), torch.where(sees, 0.0, 3.0)], 1)
        return NetworkOutput(seg=seg, cls_logits=cls)


def predictor(network, plans_dict, on_device=False):
    manager = PlansManager(plans_dict)
    result = CharacterizationPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                       perform_everything_on_device=False, device=torch.device("cpu"),
                                       allow_tqdm=False)
    result.manual_initialization(network, manager, manager.get_configuration("3d_fullres"), None, DATASET_JSON,
                                 "nnUNetTrainerTest", (0, 1, 2))
    # as on a CUDA device: nnU-Net then retries a failed pass with its results on the CPU
    result.perform_everything_on_device = on_device
    return result


BLOCK = {"case_classes": ["A", "B"], "phases": None}


def volume(with_lesion=True):
    x = torch.zeros(1, *VOLUME)
    if with_lesion:
        x[0, 20:24, 20:24, 20:24] = 1.0  # 64 voxels, against 262,080 background voxels
    return x


@pytest.mark.parametrize("p_background", [1e-9, 1e-6, 1e-4, 1e-3])
def test_case_class_does_not_depend_on_faint_background_probability(p_background):
    """Soft lesion mass weighting flipped the class at p_bg = 1e-3 (262 voxels' worth of background
    probability against a 64-voxel lesion); counting the voxels the segmentation calls lesion does not."""
    torch.set_num_threads(1)
    result = predictor(KnownOutputs(p_background), plans(BLOCK)).characterize_preprocessed(volume())
    assert result["lesion_detected"] and result["aggregation"] == AGGREGATION_LESION
    assert result["probabilities"][0] > 0.9


def test_no_lesion_is_said_plainly_in_case_json_and_csv(tmp_path):
    pr = predictor(KnownOutputs(1e-6), plans(BLOCK))
    heads = pr.characterize_preprocessed(volume(with_lesion=False))
    assert not heads["lesion_detected"] and heads["aggregation"] == AGGREGATION_NO_LESION
    result = pr.case_result("case_0", heads, lesion_voxels=0)
    write_case_json(str(tmp_path / "case_0.json"), result)
    written = json.loads((tmp_path / "case_0.json").read_text())
    assert written["lesion_detected"] is False and written["aggregation"] == AGGREGATION_NO_LESION
    assert "no lesion was segmented" in written["note"]
    write_characterization_csv(str(tmp_path / "characterization.csv"), [result])
    header, row = (tmp_path / "characterization.csv").read_text().strip().splitlines()
    columns = dict(zip(header.split(","), row.split(",")))
    assert columns["lesion_detected"] == "False" and columns["aggregation"] == AGGREGATION_NO_LESION


class BorderGuesses(nn.Module):
    """Tumor where the input is > 0.5 (the lesion), anywhere in the patch; and a guess of tumor where it
    is 0.3 (a lesion-like slab) within ``BORDER`` voxels of the patch's first axis ends only, which
    nnU-Net's Gaussian weighting overrules wherever a neighbouring patch's centre sees the same voxels.
    A patch that sees the lesion says class A, any other patch says B."""

    BORDER = 3

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, x, heads=False, lesion_mask=None):
        image = x[:, :1]
        near_border = torch.zeros_like(image, dtype=torch.bool)
        near_border[:, :, :self.BORDER] = near_border[:, :, -self.BORDER:] = True
        tumor = (image > 0.5) | (near_border & (image - 0.3).abs().lt(0.01))
        tumor_logit = torch.where(tumor, torch.tensor(10.0), torch.tensor(-10.0))
        seg = torch.cat([torch.zeros_like(tumor_logit), torch.full_like(tumor_logit, -20.0), tumor_logit], 1)
        if not heads:
            return seg
        sees = (image > 0.5).flatten(1).any(1)
        return NetworkOutput(seg=seg, cls_logits=torch.stack([torch.where(sees, 3.0, 0.0),
                                                              torch.where(sees, 0.0, 3.0)], 1))


def border_guess_volume(with_lesion: bool):
    """A slab at first-axis 14..17, at the border of the tiles that start at 16 and the centre of those
    that start at 0; the lesion (64 voxels) at 40..43, inside every tile that holds it."""
    x = torch.zeros(1, *VOLUME)
    x[0, 14:18] = 0.3
    if with_lesion:
        x[0, 40:44, 20:24, 20:24] = 1.0
    return x


def test_patches_are_weighted_by_the_combined_segmentation_not_their_own_border_guesses():
    """Each tile starting at 16 calls 2 x 32 x 32 slab voxels tumor at its border, and says B: weighted by
    the patches' own segmentations, 18,432 such voxels outvoted the 64-voxel lesion's class A. nnU-Net's
    combined segmentation has no tumor in the slab, so only the lesion counts."""
    pr = predictor(BorderGuesses(), plans(BLOCK))
    result = pr.characterize_preprocessed(border_guess_volume(with_lesion=True))
    assert result["lesion_detected"] and result["aggregation"] == AGGREGATION_LESION
    assert result["probabilities"][0] > 0.9
    logits = pr.predict_sliding_window_return_logits(border_guess_volume(with_lesion=True))
    assert (logits.argmax(0) == 2).sum() == 64  # the lesion, and no slab voxel


def test_border_guesses_alone_are_no_lesion():
    result = predictor(BorderGuesses(), plans(BLOCK)).characterize_preprocessed(border_guess_volume(False))
    assert not result["lesion_detected"] and result["aggregation"] == AGGREGATION_NO_LESION


def test_padded_image_counts_only_the_image():
    """A case shorter than the patch on an axis is padded (with 0) before the pass, and the patches' slicers
    are the padded image's: on the unpadded segmentation they still find the lesion, once per tile."""
    x = torch.zeros(1, 20, 64, 64)
    x[0, 8:12, 20:24, 20:24] = 1.0
    pr = predictor(KnownOutputs(1e-9), plans(BLOCK))
    logits = pr.predict_sliding_window_return_logits(x)
    assert logits.shape[1:] == x.shape[1:]
    voxels = pr._patch_lesion_voxels(logits)
    assert len(voxels) == len(pr._patch_slicers) == 9  # one tile on the padded axis, 3 x 3 in-plane
    assert sorted(voxels.tolist()) == [0.0] * 5 + [64.0] * 4


def test_a_lesion_missing_from_the_written_segmentation_is_not_reported_as_detected(tmp_path):
    """The folds' mean or the resampling to the image's spacing can remove a lesion the folds found."""
    pr = predictor(KnownOutputs(1e-9), plans(BLOCK))
    heads = pr.characterize_preprocessed(volume())
    assert heads["lesion_detected"]
    result = pr.case_result("case_0", heads, lesion_voxels=0)
    assert not result.lesion_detected and result.aggregation == AGGREGATION_LESION + NOT_WRITTEN
    assert result.probabilities[0] > 0.9  # still the lesion's class
    write_case_json(str(tmp_path / "case_0.json"), result)
    written = json.loads((tmp_path / "case_0.json").read_text())
    assert written["lesion_detected"] is False and "written segmentation has no lesion" in written["note"]
    assert pr.case_result("case_0", heads, lesion_voxels=5).lesion_detected


def test_a_lesion_only_in_the_written_segmentation_is_reported_as_detected(tmp_path):
    """Two folds that each call a voxel liver (logits [2, 0, 1.5] and [0, 2, 1.5]) average to tumor."""
    pr = predictor(KnownOutputs(1e-9), plans(BLOCK))
    heads = pr.characterize_preprocessed(volume(with_lesion=False))
    result = pr.case_result("case_0", heads, lesion_voxels=12)
    assert result.lesion_detected and result.aggregation == AGGREGATION_NO_LESION + ONLY_WRITTEN
    write_case_json(str(tmp_path / "case_0.json"), result)
    assert "do not describe it" in json.loads((tmp_path / "case_0.json").read_text())["note"]


@pytest.mark.parametrize("index", [0, 1, 2, -1])
def test_argmax_is_equals_argmax_including_ties(index):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 3, (3, 6, 7, 8), generator=generator).half()  # many ties
    assert torch.equal(argmax_is(logits, index), logits.argmax(0) == index % 3)


@pytest.mark.parametrize("labels, regions_class_order, expected", [
    ({"background": 0, "liver": 1, "tumor": 2}, None, 3),
    ({"background": 0, "liver": [1, 2, 3], "tumor": [2, 3], "necrosis": 3}, [1, 2, 3], 3 + 2),
])
def test_written_lesion_voxels_count_every_label_of_a_tumor_region(tmp_path, labels, regions_class_order, expected):
    """nnU-Net writes a necrotic core (region [3], label 3) over the tumor region [2, 3]'s value 2: it is tumor."""
    import numpy as np
    import SimpleITK as sitk

    array = np.zeros((4, 4, 4), np.uint8)
    array[0, 0, :3] = 2
    array[1, 1, :2] = 3
    array[2] = 1
    sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / "case.nii.gz"))
    pr = predictor(KnownOutputs(1e-9), dict(plans(BLOCK), image_reader_writer="SimpleITKIO"))
    pr.dataset_json = dict(DATASET_JSON, labels=labels, **({"regions_class_order": regions_class_order}
                                                            if regions_class_order else {}))
    assert pr.written_lesion_voxels(str(tmp_path / "case.nii.gz")) == expected


def test_a_retried_sliding_window_pass_counts_each_tile_once():
    """nnU-Net retries the whole pass on the CPU after a RuntimeError (out of memory)."""
    pr = predictor(KnownOutputs(1e-9, fail_on_call=4), plans(BLOCK), on_device=True)
    pr.characterize_preprocessed(volume())
    assert pr.network.calls == 27 + 4 and len(pr._patch_records) == 27


def test_folds_without_a_lesion_do_not_dilute_the_folds_that_found_it():
    pr = predictor(KnownOutputs(1e-9), plans(BLOCK))
    found = {"cls_logits": torch.tensor([3.0, 0.0], dtype=torch.float64), "curve": None, "lesion_detected": True}
    missed = {"cls_logits": torch.tensor([0.0, 3.0], dtype=torch.float64), "curve": None, "lesion_detected": False}
    pr._fold_records = [found, missed, missed]
    combined = pr._combine_folds()
    assert combined["probabilities"][0] > 0.9 and "1 of 3 folds" in combined["aggregation"]


def test_the_no_head_message_gives_the_true_reason():
    stock = predictor(KnownOutputs(1e-9), plans(None))
    assert "not one of this package's multi-task trainers" in stock.no_heads_reason()
    unlabelled = predictor(KnownOutputs(1e-9), plans({"case_classes": [], "method_case_heads": ["cls"],
                                                      "case_heads": []}))
    assert "has no 'characterization' labels" in unlabelled.no_heads_reason()
    segmentation_only = predictor(KnownOutputs(1e-9), plans({"case_classes": ["A", "B"], "method_case_heads": [],
                                                             "case_heads": []}))
    assert "segmentation-only method" in segmentation_only.no_heads_reason()


def _trainer_plans(labels: dict) -> dict:
    """nnU-Net plans of a tiny 3d_fullres STD-Net configuration, import strings as nnU-Net writes them."""
    arch_kwargs = {"n_stages": 3, "features_per_stage": [8, 16, 32], "conv_op": "torch.nn.modules.conv.Conv3d",
                   "kernel_sizes": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
                   "n_conv_per_stage": [1, 1, 1], "n_conv_per_stage_decoder": [1, 1], "conv_bias": True,
                   "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                   "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
                   "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}
    configuration = {"patch_size": [16, 32, 32], "batch_size": 2, "spacing": [2.0, 1.0, 1.0], "batch_dice": False,
                     "architecture": {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": arch_kwargs, "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}}
    return {"dataset_name": "Dataset999_Test", "plans_name": "P", "label_manager": "LabelManager",
            "configurations": {"3d_fullres": configuration}}


@pytest.mark.parametrize("labels,channel", [({"background": 0, "liver": 1, "tumor": 2}, 2),
                                            ({"background": 0, "tumor": 1, "liver": 2}, 1),
                                            ({"background": 0, "liver": 1, "tumor": 2, "vessel": 3}, 2)])
def test_the_heads_look_at_the_tumor_label_whatever_its_position(labels, channel):
    """The lesion channel of the network follows dataset.json's labels through the plans, the way the
    predictor rebuilds the network (it sees the plans, not dataset.json)."""
    from nnunet_liver_ext.trainers.nnUNetTrainerSTDNet import nnUNetTrainerSTDNet

    dataset_json = {"labels": labels, "channel_names": {"0": "CT", "1": "CT"},
                    "characterization": {"classes": ["A", "B"], "cases": {"c": 0}}}
    plans_dict = nnUNetTrainerSTDNet.plans_with_liver_block(_trainer_plans(labels), dataset_json)
    assert plans_dict["nnunet_liver_ext"]["lesion_channel"] == channel
    manager = PlansManager(json.loads(json.dumps(plans_dict)))  # as read back from plans.json
    network = nnUNetTrainerSTDNet.build_network_architecture(manager, manager.get_configuration("3d_fullres"), 2,
                                                             len(labels), enable_deep_supervision=False)
    assert isinstance(network, STDNet) and network.lesion_channel == channel and network.cls_head is not None


def test_a_segmentation_only_method_builds_no_head_even_with_labelled_cases():
    class SegmentationOnly(LiverMultiTaskTrainer):
        network_class = STDNet
        case_heads = ()

    dataset_json = {"labels": {"background": 0, "liver": 1, "tumor": 2}, "channel_names": {"0": "CT"},
                    "characterization": {"classes": ["A", "B"], "cases": {"c": 0}}}
    block = SegmentationOnly.plans_with_liver_block(_trainer_plans(dataset_json["labels"]),
                                                    dataset_json)["nnunet_liver_ext"]
    assert block["case_heads"] == [] and block["method_case_heads"] == []


def test_folds_are_combined_as_the_softmax_of_their_mean_logits():
    """As nnU-Net combines the folds' segmentations (mean of logits): a mean of the folds' probabilities would
    let one confident fold outweigh the others' logits."""
    pr = predictor(KnownOutputs(1e-9), plans(BLOCK))
    pr._fold_records = [{"cls_logits": torch.tensor(logits, dtype=torch.float64), "curve": None,
                         "lesion_detected": True} for logits in ([4.0, 0.0], [-1.0, 1.0])]
    # mean logits [1.5, 0.5]: p(A) = 1 / (1 + e^-1)
    assert pr._combine_folds()["probabilities"][0] == pytest.approx(1 / (1 + math.exp(-1)))


def test_lesion_voxels_are_those_the_written_segmentation_calls_tumor():
    """A tumor logit above 0 is no lesion where the background's is higher: nnU-Net writes the argmax."""
    pr = predictor(KnownOutputs(1e-9), plans(BLOCK))
    logits = torch.tensor([5.0, -20.0, 1.0]).view(3, 1, 1, 1).expand(3, 4, 4, 4).clone()
    pr._patch_slicers = [(slice(None), slice(0, 4), slice(0, 4), slice(0, 4))]
    assert pr._patch_lesion_voxels(logits).tolist() == [0.0]
    logits[2, :2] = 6.0
    assert pr._patch_lesion_voxels(logits).tolist() == [32.0]


class ConstantHeads(nn.Module):
    """Class logits [2, 0] whatever the input (so in every mirrored pass too); no lesion."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))
        self.calls = 0

    def forward(self, x, heads=False, lesion_mask=None):
        self.calls += 1
        seg = torch.cat([torch.zeros_like(x[:, :1]), torch.full_like(x[:, :1], -20.0),
                         torch.full_like(x[:, :1], -20.0)], 1)
        if not heads:
            return seg
        return NetworkOutput(seg=seg, cls_logits=torch.tensor([[2.0, 0.0]]).expand(x.shape[0], 2))


def test_mirrored_passes_average_the_class_logits_too():
    """With test-time mirroring (nnU-Net's default) every flipped pass's class logits count, as its segmentation
    does; dropped, the logits would be divided by the 8 passes all the same and the class output flattened."""
    pr = predictor(ConstantHeads(), plans(BLOCK))
    pr.use_mirroring = True
    heads = pr.characterize_preprocessed(torch.zeros(1, *PATCH))  # one tile, 8 passes
    assert pr.network.calls == 8
    assert heads["probabilities"] == pytest.approx(torch.softmax(torch.tensor([2.0, 0.0]), 0).tolist())

