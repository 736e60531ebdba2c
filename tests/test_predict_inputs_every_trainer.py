"""Bad input at inference for every trainer of the package (the catalogue's list, so a method added
later is covered without editing this test).

Each trainer's network is built the way nnU-Net's predictor builds it (the trainer class's
``build_network_architecture`` on plans carrying the trainer's own block, deep supervision off) and
run by ``CharacterizationPredictor`` through ``predict_cases``, the path of ``nnunet-liver predict``,
on a folder where a good case sits next to a case with a missing phase file, one with a NaN-filled
phase and one with a phase on another grid. Per trainer: the bad cases are named with their file
and get no output; the good case is segmented on its input's grid; ``CASE.json`` is there exactly
when the network has case-level heads, with the curve and the class probabilities it promises.
The weights are untrained: what is checked is the handling of the files, not the accuracy.
"""
import copy
import importlib
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_liver_ext.catalogue import load_catalogue
from nnunet_liver_ext.inference.batch import predict_cases
from nnunet_liver_ext.inference.characterization import CharacterizationPredictor
from nnunet_liver_ext.inference.inputs import check_input_folder
from nnunet_liver_ext.training.multitask_trainer import LiverMultiTaskTrainer

from test_mti_net_trainer import DATASET_JSON, PATCH, PLANS

SPACING_XYZ = (1.0, 1.0, 2.0)  # the plans' spacing [2, 1, 1] (z, y, x): no resampling
BAD = {"missing_phase": ("missing_phase_0003.nii.gz", "is missing"),
       "nan_phase": ("nan_phase_0002.nii.gz", "NaN voxels"),
       "other_grid": ("other_grid_0001.nii.gz", "spacing")}


def _trainers():
    catalogue = load_catalogue()
    assert not catalogue.errors, catalogue.errors
    return catalogue.bases()


def _write(folder, case, arrays, spacings=None):
    for k, array in enumerate(arrays):
        if array is None:
            continue
        image = sitk.GetImageFromArray(array.astype(np.float32))
        image.SetSpacing((spacings or {}).get(k, SPACING_XYZ))
        sitk.WriteImage(image, str(folder / f"{case}_{k:04d}.nii.gz"), True)


@pytest.fixture(scope="module")
def input_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("every_trainer_inputs")
    rng = np.random.default_rng(0)
    phases = [rng.normal(0, 1, PATCH) for _ in range(4)]
    for k, image in enumerate(phases):  # a brighter blob that enhances over the phases
        image[5:11, 10:20, 10:20] += 0.5 * (k + 1)
    _write(folder, "good", phases)
    _write(folder, "missing_phase", phases[:3] + [None])
    _write(folder, "nan_phase", phases[:2] + [np.full(PATCH, np.nan)] + phases[3:])
    _write(folder, "other_grid", phases, spacings={1: (1.0, 1.0, 2.5)})
    return folder


@pytest.mark.parametrize("entry", _trainers(), ids=lambda e: e.name)
def test_bad_inputs_are_refused_and_the_good_case_predicted(entry, input_folder, tmp_path):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    trainer_class = getattr(importlib.import_module(f"nnunet_liver_ext.trainers.{entry.module}"), entry.name)
    dataset_json = copy.deepcopy(DATASET_JSON)
    plans = copy.deepcopy(PLANS)
    if issubclass(trainer_class, LiverMultiTaskTrainer):  # what the trainer writes into the plans it saves
        plans = trainer_class.plans_with_liver_block(plans, dataset_json)
    manager = PlansManager(plans)
    configuration = manager.get_configuration("3d_fullres")
    network = trainer_class.build_network_architecture(manager, configuration, 4, 3, enable_deep_supervision=False)
    predictor = CharacterizationPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                          perform_everything_on_device=False, device=torch.device("cpu"),
                                          allow_tqdm=False)
    # one fold, as initialize_from_trained_model_folder passes the checkpoints' weights
    predictor.manual_initialization(network.eval(), manager, configuration, [copy.deepcopy(network.state_dict())],
                                    dataset_json, entry.name, (0, 1, 2))

    check = check_input_folder(str(input_folder), dataset_json)
    assert [c.case for c in check.good] == ["good"]
    for case in check.bad:
        file_name, words = BAD[case.case]
        assert [(os.path.basename(p.path), words in p.message) for p in case.problems] == [(file_name, True)], \
            [str(p) for p in case.problems]

    out = tmp_path / "pred"
    result = predict_cases(predictor, check.good, str(out), parallel=False)
    assert result.predicted == ["good"] and not result.failed, result.failed
    assert sorted(os.listdir(out)) == sorted(["good.nii.gz", *(["good.json"] if predictor.case_heads else []),
                                              "dataset.json", "plans.json", "predict_from_raw_data_args.json"])
    # nnU-Net's record of the run names where the case is, not the staging folder it was written to
    recorded = json.loads((out / "predict_from_raw_data_args.json").read_text())
    assert recorded["output_folder_or_list_of_truncated_output_files"] == [str(out / "good")], recorded
    segmentation = sitk.ReadImage(str(out / "good.nii.gz"))
    assert segmentation.GetSize() == tuple(reversed(PATCH)) and segmentation.GetSpacing() == SPACING_XYZ
    assert set(np.unique(sitk.GetArrayFromImage(segmentation))) <= {0, 1, 2}
    heads = list(getattr(trainer_class, "case_heads", ()))
    assert list(predictor.case_heads) == heads
    if heads:
        written = json.loads((out / "good.json").read_text())
        assert written["case"] == "good"
        assert (written["enhancement_curve"] is not None) == ("curve" in heads)
        if "curve" in heads:
            assert len(written["enhancement_curve"]) == 4
        if "cls" in heads:
            assert written["classes"] == ["HCC", "hemangioma"] and abs(sum(written["probabilities"]) - 1) < 1e-5
