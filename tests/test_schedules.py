"""Short schedules: one table (training/schedules.py), one mechanism that derives
``<Trainer>_<schedule>`` for every trainer, found by name the way nnU-Net finds trainers.

The end-to-end tests train and predict with derived variants through the real console scripts
(``nnUNetTrainerSTDNet_tiny`` in tests/test_std_net_nnunet.py, ``nnUNetTrainer_tiny`` in the
five-fold benchmark test); this module checks the whole table for every trainer module.
"""
import importlib
import pkgutil
from types import SimpleNamespace

import pytest
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

from nnunet_liver_ext.paths import TRAINERS_DIR
from nnunet_liver_ext.training.schedules import (SCHEDULE_SETTINGS, SCHEDULES, apply_schedule,
                                                 register_schedule_variants)

from test_characterization_predictor import _trainer_plans

# names users and scripts already use; they must keep working
EXISTING_NAMES = ["nnUNetTrainerSTDNet_5epochs", "nnUNetTrainerSTDNet_10epochs", "nnUNetTrainerSTDNet_short",
                  "nnUNetTrainerSTDNet_demo", "nnUNetTrainerSTDNet_tiny", "nnUNetTrainer_short", "nnUNetTrainer_demo",
                  "nnUNetTrainer_tiny"]


def _trainer_modules():
    for module in pkgutil.iter_modules([str(TRAINERS_DIR)]):
        yield importlib.import_module(f"nnunet_liver_ext.trainers.{module.name}")


def _base_trainers():
    """Every trainer class a trainer module defines by hand, plus stock nnUNetTrainer."""
    bases = {nnUNetTrainer}
    for module in _trainer_modules():
        for value in vars(module).values():
            if (isinstance(value, type) and issubclass(value, nnUNetTrainer) and value.__module__ == module.__name__
                    and getattr(value, "schedule_name", None) is None):
                bases.add(value)
    return sorted(bases, key=lambda c: c.__name__)


@pytest.fixture(autouse=True)
def ext_trainers(monkeypatch, tmp_path):
    monkeypatch.setenv("nnUNet_extTrainer", str(TRAINERS_DIR))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    # a user's nnUNet_preprocessed makes nnU-Net's __init__ read the plans' data_identifier, which these lack
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)


def test_every_trainer_has_every_schedule_and_nnunet_finds_it_by_name(capsys):
    bases = _base_trainers()
    assert len(bases) >= 9  # stock + STD-Net and its ablations, at the least
    for base in bases:
        for schedule in SCHEDULES:
            name = f"{base.__name__}_{schedule}"
            found = recursive_find_trainer_class_by_name(name)
            assert found.__name__ == name and issubclass(found, nnUNetTrainer)
            if base is not nnUNetTrainer or schedule not in ("5epochs", "10epochs"):
                assert found.schedule_name == schedule and found.schedule_base.__name__ == base.__name__
    for name in EXISTING_NAMES:
        assert recursive_find_trainer_class_by_name(name).__name__ == name
    capsys.readouterr()


@pytest.mark.parametrize("name", ["nnUNetTrainer_tiny", "nnUNetTrainerSTDNet_demo", "nnUNetTrainerSTDNet_paper_short",
                                  "nnUNetTrainerSTDNet_hybrid_10epochs"])
def test_a_derived_variant_is_its_trainer_with_the_schedule_applied(name, capsys):
    trainer_class = recursive_find_trainer_class_by_name(name)
    dataset_json = {"labels": {"background": 0, "liver": 1, "tumor": 2}, "channel_names": {"0": "CT", "1": "CT"},
                    "file_ending": ".nii.gz"}
    plans = dict(_trainer_plans(dataset_json["labels"]), continue_training=False)  # as nnUNetv2_train passes them
    trainer = trainer_class(plans, "3d_fullres", 0, dataset_json, device=torch.device("cpu"))
    epochs, iterations, val_iterations = SCHEDULES[trainer_class.schedule_name]
    assert (trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch) == \
        (epochs, iterations, val_iterations)
    base = trainer_class.schedule_base
    plain = base(dict(_trainer_plans(dataset_json["labels"]), continue_training=False), "3d_fullres", 0, dataset_json,
                 device=torch.device("cpu"))
    for attribute, value in SCHEDULE_SETTINGS.get(trainer_class.schedule_name, {}).items():
        # the schedule's own setting, not one the trainer has anyway
        assert getattr(trainer, attribute) == value != getattr(plain, attribute)
    # nnU-Net records the constructor arguments for checkpoints and DDP restarts
    assert set(trainer.my_init_kwargs) == {"plans", "configuration", "fold", "dataset_json", "device"}
    assert type(trainer).__mro__[1] is base
    if hasattr(trainer, "warmup_epochs"):  # _paper: the warm-up shrinks with the schedule and stays valid
        assert 0 <= trainer.warmup_epochs < trainer.num_epochs
        trainer.network = torch.nn.Linear(1, 1)
        trainer.configure_optimizers()
    capsys.readouterr()


@pytest.mark.parametrize("num_epochs,warmup_epochs,schedule,expected", [
    (100, 20, "short", 4),  # a fifth of the run, as in the full schedule
    (1000, 20, "demo", 0),  # under one epoch of the short run: none
    (10, 9, "tiny", 0),  # at most the schedule's epochs - 1
])
def test_a_warm_up_shrinks_in_proportion_to_the_schedule(num_epochs, warmup_epochs, schedule, expected):
    """A warm-up kept at its full length would outlast a short schedule (or take most of it)."""
    trainer = SimpleNamespace(num_epochs=num_epochs, warmup_epochs=warmup_epochs, print_to_log_file=lambda *a: None)
    apply_schedule(trainer, schedule)
    assert (trainer.warmup_epochs, trainer.num_epochs) == (expected, SCHEDULES[schedule][0])


def test_registering_leaves_existing_and_foreign_names_alone():
    class nnUNetTrainerProbe(nnUNetTrainer):
        """A probe."""

    namespace = {"__name__": nnUNetTrainerProbe.__module__, "nnUNetTrainerProbe": nnUNetTrainerProbe,
                 "nnUNetTrainerProbe_tiny": "hand-written", "nnUNetTrainer": nnUNetTrainer}
    added = register_schedule_variants(namespace, skip_names=["nnUNetTrainerProbe_short"])
    assert namespace["nnUNetTrainerProbe_tiny"] == "hand-written"
    assert "nnUNetTrainerProbe_short" not in namespace
    assert {c.__name__ for c in added} == {f"nnUNetTrainerProbe_{s}" for s in SCHEDULES} - {
        "nnUNetTrainerProbe_tiny", "nnUNetTrainerProbe_short"}
    assert "nnUNetTrainer_tiny" not in namespace  # imported trainers belong to their own module
    assert namespace["nnUNetTrainerProbe_demo"].__doc__.startswith("A probe. [demo schedule")
