"""Every trainer of the package trains under DDP without unused-parameter errors, on a dataset with
case labels and on one without (LiTS, MSD: the common case).

nnU-Net wraps the network in DDP without ``find_unused_parameters``: a parameter that gets no gradient
in one step fails the next step with "Expected to have finished reduction in the prior iteration".
A one-process gloo group is enough to see it. The list of trainers is the catalogue's (every method
and variant of every trainer module), so a method added later is covered without editing this test.
Trainers are built as ``nnUNetv2_train`` builds them (``get_trainer_from_args`` then ``initialize``,
with the deep-supervision weights nnU-Net uses under DDP) and take three real train steps.
"""
import copy

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from nnunet_liver_ext.catalogue import load_catalogue
from nnunet_liver_ext.training.multitask_trainer import LiverMultiTaskTrainer

from test_mti_net_trainer import DATASET_JSON, GlooGroup, make_batch, make_trainer, nnunet_folders  # noqa: F401

torch.set_num_threads(1)

WITHOUT_CASE_LABELS = {k: v for k, v in DATASET_JSON.items() if k not in ("characterization", "enhancement")}


def _our_trainers():
    catalogue = load_catalogue()
    assert not catalogue.errors, catalogue.errors
    return [e.name for e in catalogue.bases()]


@pytest.mark.parametrize("labelled", [True, False], ids=["with_case_labels", "without_case_labels"])
@pytest.mark.parametrize("name", _our_trainers())
def test_every_trainer_trains_under_ddp(nnunet_folders, name, labelled):  # noqa: F811
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    trainer_class = recursive_find_trainer_class_by_name(name)
    dataset_json = DATASET_JSON if labelled else WITHOUT_CASE_LABELS
    if issubclass(trainer_class, LiverMultiTaskTrainer):
        if any(key not in dataset_json for key in trainer_class.dataset_keys_required):
            pytest.skip(f"{name} refuses a dataset without {trainer_class.dataset_keys_required}")
        if "phases" in trainer_class.dataset_keys_required and "phases" not in dataset_json:
            pytest.skip(f"{name} needs phases")
    trainer = make_trainer(name, copy.deepcopy(dataset_json))
    group = GlooGroup()
    try:
        # as nnUNetTrainer.initialize does under DDP: the coarsest deep-supervision output keeps weight 1e-6
        trainer.is_ddp = True
        trainer.loss = trainer._build_loss()
        network = trainer.network
        trainer.network = DDP(network)
        for _ in range(3):
            result = trainer.train_step(make_batch(trainer))
        assert torch.isfinite(torch.as_tensor(result["loss"]))
        if labelled is False and hasattr(network, "cls_head"):
            assert network.cls_head is None
    finally:
        group.close()
