"""Several image channels per phase: dataset.json's ``phases`` name the phases in channel order, each phase a block
of consecutive channels. Before, STD-Net read a 4-channel dataset with 2 phases as 4 phases (MTI-Net had its own
rule); now the shared trainer sets ``channels_per_phase`` for every network that reads phases, and the prediction
checks name each channel's phase. One channel per phase (what the converters write) is unchanged."""
import copy

import pytest
import torch

from nnunet_liver_ext.dataset_json import channels_per_phase
from nnunet_liver_ext.inference.inputs import channel_label

from test_mti_net_trainer import DATASET_JSON, catalogue_trainers, make_batch, make_trainer, nnunet_folders  # noqa: F401

torch.set_num_threads(1)

# the unit plans' 4 channels as 2 phases of 2 channels (say, two MRI contrasts at each time point)
TWO_BY_TWO = dict(copy.deepcopy(DATASET_JSON), phases=["arterial", "portal_venous"],
                  enhancement={"a": [300.0, 700.0], "b": [300.0, 400.0], "c": [250.0, 650.0]})


def test_channels_per_phase_splits_the_image_channels_or_says_why_not():
    assert channels_per_phase(["a", "b", "c"], 3) == 1
    assert channels_per_phase(["a", "b"], 4) == 2
    with pytest.raises(ValueError, match=r"5 image channels cannot be split into the 2 phases \['a', 'b'\]"):
        channels_per_phase(["a", "b"], 5)
    with pytest.raises(ValueError, match="cannot be split"):
        channels_per_phase(["a", "b", "c"], 2)


@pytest.mark.parametrize("name", catalogue_trainers())
def test_every_trainer_reads_two_channels_per_phase_as_one_phase(nnunet_folders, name):  # noqa: F811
    trainer = make_trainer(name, TWO_BY_TWO)
    network = trainer.network
    if hasattr(network, "num_phases"):  # the networks that read the channel axis as time
        assert (network.num_phases, network.channels_per_phase) == (2, 2)
    result = trainer.train_step(make_batch(trainer))
    assert all(torch.isfinite(torch.as_tensor(v)) for v in result.values()), result


@pytest.mark.parametrize("name", ["nnUNetTrainerSTDNet", "nnUNetTrainerMTINet"])
def test_channels_that_do_not_split_into_the_phases_are_refused_at_construction(nnunet_folders, name):  # noqa: F811
    three_phases = dict(copy.deepcopy(DATASET_JSON), phases=["pre", "arterial", "portal_venous"],
                        enhancement={k: v[:3] for k, v in DATASET_JSON["enhancement"].items()})
    with pytest.raises(ValueError, match=r"4 image channels cannot be split into the 3 phases"):
        make_trainer(name, three_phases)


def test_prediction_checks_name_each_channels_phase():
    dataset_json = {"channel_names": {str(c): "T1" for c in range(4)}, "phases": ["arterial", "portal_venous"]}
    assert [channel_label(dataset_json, k) for k in range(4)] == [
        "channel 0, phase 'arterial'", "channel 1, phase 'arterial'", "channel 2, phase 'portal_venous'",
        "channel 3, phase 'portal_venous'"]
    one_each = {"channel_names": {"0": "CT", "1": "CT"}, "phases": ["arterial", "portal_venous"]}
    assert channel_label(one_each, 1) == "channel 1, phase 'portal_venous'"
    assert channel_label({"channel_names": {"0": "CT"}}, 0) == "channel 0, 'CT'"
