"""nnU-Net's ignore label (sparse annotation: ``"ignore": 3`` in dataset.json's labels) with every trainer and in
the evaluation, in process.

nnU-Net trains on partly annotated cases by leaving the voxels under the ignore label out of its loss, and its
evaluation leaves them out of every metric. Found before this module: ``nnUNetTrainerDynTransNet_paper`` (Dice only,
nnU-Net's own ``nnUNetTrainerDiceLoss`` loss) failed on the first step with labels (an index error) and, with regions,
scored the ignore channel as a third region; the tumor label's fallback (the highest label) picked the ignore label;
the benchmark scored a prediction in unannotated voxels as wrong and made an "ignore" region of its own.
The run through nnU-Net's commands: tests/test_ignore_label_nnunet.py.
"""
import copy
import csv

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from nnunet_liver_ext.dataset_json import ignore_label
from nnunet_liver_ext.training.multitask_trainer import lesion_output, tumor_label_value

from test_mti_net_trainer import DATASET_JSON, PATCH, catalogue_trainers, make_trainer, nnunet_folders  # noqa: F401

torch.set_num_threads(1)

IGNORE = 3
LABELS = {"background": 0, "liver": 1, "tumor": 2, "ignore": IGNORE}
LAYOUTS = {
    "labels": dict(copy.deepcopy(DATASET_JSON), labels=LABELS),
    "regions": dict(copy.deepcopy(DATASET_JSON), regions_class_order=[1, 2],
                    labels={"background": 0, "liver": [1, 2], "tumor": 2, "ignore": IGNORE}),
}


def test_the_tumor_label_is_never_the_ignore_label():
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    labels = {"background": 0, "liver": 1, "core": 2, "ignore": 3}  # no tumor name: the highest class label
    assert tumor_label_value({"labels": labels}) == 2
    assert lesion_output(LabelManager(labels, None), {"labels": labels}) == (2, "softmax")
    assert ignore_label(labels) == 3 and ignore_label({"background": 0}) is None
    with pytest.raises(ValueError, match="'ignore' must be one integer label value"):
        ignore_label({"background": 0, "ignore": [3]})


def sparse_batch(trainer, layout: str) -> dict:
    """A batch whose top slices (z >= 12) are unannotated: the ignore label there, over liver and background; the
    tumor (z 5-10) annotated. Targets as nnU-Net's loader gives them: label maps, or one binary map per region then
    the ignore mask as the last channel."""
    torch.manual_seed(1)
    label = torch.zeros(2, 1, *PATCH)
    label[:, :, 2:14, 4:28, 4:28] = 1
    label[:, :, 5:11, 10:20, 10:20] = 2
    label[:, :, 12:] = IGNORE
    if layout == "regions":
        target = torch.cat(((label == 1) | (label == 2), label == 2, label == IGNORE), 1).float()
    else:
        target = label
    data = torch.randn(2, 4, *PATCH) + label.clamp(max=2) * torch.tensor([0.5, 2.0, 1.5, 1.0]).view(1, 4, 1, 1, 1)
    targets = [F.interpolate(target, size=[round(p * s) for p, s in zip(PATCH, scale)], mode="nearest")
               for scale in trainer._get_deep_supervision_scales()]
    return {"data": data, "target": targets, "keys": ["a", "b"], "label": label}


def unannotated(target: torch.Tensor, layout: str) -> torch.Tensor:
    return (target[:, -1:] > 0.5) if layout == "regions" else (target == IGNORE)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("name", catalogue_trainers())
def test_every_trainer_leaves_unannotated_voxels_out_of_its_segmentation_loss(nnunet_folders,  # noqa: F811
                                                                              name, layout):
    trainer = make_trainer(name, LAYOUTS[layout])
    assert trainer.label_manager.has_ignore_label
    batch = sparse_batch(trainer, layout)
    label = batch.pop("label")

    # the segmentation loss the trainer built, on free logits: no gradient reaches an unannotated voxel
    heads = trainer.label_manager.num_segmentation_heads
    logits = [torch.randn(2, heads, *t.shape[2:], requires_grad=True) for t in batch["target"]]
    loss = trainer.loss(logits, batch["target"])
    assert torch.isfinite(loss)
    loss.backward()
    for scale, (logit, target) in enumerate(zip(logits, batch["target"])):
        if logit.grad is None:  # a deep-supervision output weighted 0
            continue
        mask = unannotated(target, layout).expand_as(logit)
        assert mask.any() and logit.grad[mask].abs().max() == 0, f"scale {scale}: gradient on unannotated voxels"
        assert logit.grad[~mask].abs().max() > 0, f"scale {scale}: no gradient on annotated voxels"

    result = trainer.train_step(batch)
    assert all(np.isfinite(float(v)) for v in result.values()), result
    if hasattr(trainer, "reference_tumor"):
        assert torch.equal(trainer.reference_tumor(batch["target"]), label == 2)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_mti_net_tim_reads_only_annotated_voxels(nnunet_folders, layout):  # noqa: F811
    """MTI-Net's TIM compares the curve under the predicted tumor with the curve under the reference tumor: a
    tumor predicted where nothing is annotated cannot be in the reference, so it is neither pulled in nor pushed
    out (no gradient there), while the annotated voxels still train."""
    from nnunet_liver_ext.networks.contract import NetworkOutput

    trainer = make_trainer("nnUNetTrainerMTINet", LAYOUTS[layout])
    batch = sparse_batch(trainer, layout)
    label = batch.pop("label")
    annotated = trainer.annotated_voxels(batch["target"])
    assert torch.equal(annotated, label != IGNORE)
    heads = trainer.label_manager.num_segmentation_heads
    logits = torch.randn(2, heads, *PATCH, requires_grad=True)
    tumor = trainer.reference_tumor(batch["target"])
    trainer.tim_loss(batch["data"], NetworkOutput(seg=[logits]), tumor, annotated).backward()
    grad = logits.grad.abs().amax(1, keepdim=True)
    assert grad[~annotated].max() == 0 and grad[annotated].max() > 0


def test_the_paper_dice_loss_is_nnunets_dice_on_the_annotated_voxels(nnunet_folders):  # noqa: F811
    """DynTransNet's _paper variant (Dice only): with an ignore label, its loss is the Dice of nnU-Net's
    Dice-loss trainer computed over the annotated voxels, not a different loss."""
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    from nnunetv2.utilities.helpers import softmax_helper_dim1

    trainer = make_trainer("nnUNetTrainerDynTransNet_paper", LAYOUTS["labels"])
    target = sparse_batch(trainer, "labels")["target"][0]
    logits = torch.randn(2, 3, *PATCH)
    mask = target != IGNORE
    expected = MemoryEfficientSoftDiceLoss(softmax_helper_dim1, batch_dice=False, do_bg=False, smooth=1e-5)(
        logits, torch.where(mask, target, 0), loss_mask=mask)
    torch.testing.assert_close(trainer.loss.loss(logits, target), expected)


# --- evaluation ----------------------------------------------------------------------------------------------

def _write(array: np.ndarray, path) -> None:
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing((0.8, 0.8, 2.0))
    sitk.WriteImage(image, str(path))


def test_evaluation_leaves_unannotated_voxels_out_as_nnunet_does(tmp_path):
    """``nnunet-liver evaluate`` on a sparsely annotated reference: the same Dice as nnU-Net's own
    compute_metrics with the ignore label, no "ignore" region, and a tumor predicted where nothing is annotated
    is no false-positive lesion."""
    import json

    from nnunetv2.evaluation.evaluate_predictions import compute_metrics
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from nnunet_liver_ext.cli import main

    ref = np.zeros((16, 32, 32), np.uint8)
    ref[2:14, 4:28, 4:28] = 1
    ref[5:9, 10:16, 10:16] = 2
    pred = ref.copy()
    pred[3:5, 4:10, 4:10] = 0        # missed liver, annotated
    ref[11:] = IGNORE                # the top slices unannotated...
    pred[12:15, 20:26, 20:26] = 2    # ...where the prediction finds a tumor: neither right nor wrong
    pred[13:, :4, :4] = 1            # and liver outside the liver
    (tmp_path / "pred").mkdir()
    (tmp_path / "gt").mkdir()
    _write(pred, tmp_path / "pred" / "case_0.nii.gz")
    _write(ref, tmp_path / "gt" / "case_0.nii.gz")
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": LABELS, "file_ending": ".nii.gz"}))

    out = tmp_path / "eval"
    assert main(["evaluate", str(tmp_path / "pred"), str(tmp_path / "gt"), "-o", str(out), "--dataset-json",
                 str(tmp_path / "dataset.json"), "-np", "1", "--quiet", "--no-plots"]) == 0
    row = next(csv.DictReader(open(out / "per_case_metrics.csv", newline="")))
    assert not any(key.startswith("ignore") for key in row)
    assert "nnU-Net's ignore label 3 in the reference) count for no metric" in (out / "report.md").read_text()
    theirs = compute_metrics(str(tmp_path / "gt" / "case_0.nii.gz"), str(tmp_path / "pred" / "case_0.nii.gz"),
                             SimpleITKIO(), [1, (1, 2), 2], ignore_label=IGNORE)["metrics"]
    assert float(row["liver_label1_dice"]) == pytest.approx(theirs[1]["Dice"])
    assert float(row["liver_region_dice"]) == pytest.approx(theirs[(1, 2)]["Dice"])
    assert float(row["tumor_dice"]) == pytest.approx(theirs[2]["Dice"]) == pytest.approx(1.0)
    assert (row["lesion_tp"], row["lesion_fp"], row["lesion_fn"]) == ("1", "0", "0")
    assert float(row["liver_region_dice"]) < 1.0  # the annotated miss still counts

    # surfaces: where the annotation stops (z = 10) is no surface of either mask
    from nnunet_liver_ext.evaluation.metrics import surface_metrics

    unannotated, liver = ref == IGNORE, (1, 2)
    observable = surface_metrics(np.isin(pred, liver), np.isin(ref, liver), (2.0, 0.8, 0.8), (2.0,), unannotated)
    cut = surface_metrics(np.isin(pred, liver) & ~unannotated, np.isin(ref, liver), (2.0, 0.8, 0.8), (2.0,))
    for metric in ("assd_mm", "hd95_mm", "nsd_2mm"):
        assert float(row[f"liver_region_{metric}"]) == pytest.approx(observable[metric])
    assert observable["nsd_2mm"] < cut["nsd_2mm"]
