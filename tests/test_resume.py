"""``nnUNetv2_train ... --c`` restores everything a trainer of this package trains with.

For every trainer of the package (the catalogue's list, so a method added later is covered without
editing this test), with the real trainer objects and the real ``save_checkpoint`` /
``load_checkpoint`` (a file on disk), the way ``nnUNetTrainer.run_training`` drives them:

- run A trains epoch 0 (K steps), writes its checkpoint as nnU-Net's ``on_epoch_end`` does, then
  trains epoch 1 (K more steps);
- run B is a fresh trainer (``continue_training=True``, as ``nnUNetv2_train --c`` builds it) with its
  random number generators scrambled; it loads A's epoch-0 checkpoint and trains epoch 1 on the same
  batches.

B must match A: every step's loss terms, every tensor of the network's state dict (parameters and
buffers: heads, MTI-Net's discriminator, the Mamba codebook's codes, ``initialized`` flag and usage
EMA), every optimizer's state (both halves of the hybrid SGD/AdamW scheme, MTI-Net's discriminator
Adam), the learning rates the schedulers set, and the epoch counter.

Tolerance: absolute 1e-6, relative 0, on fp32 CPU tensors with one thread. The two runs execute the
same operations in the same order on the same machine, so the measured differences are exactly 0;
the tolerance only leaves room for a platform whose kernels are not bitwise reproducible.

The dropout masks of the Transformers and the codebook's dead-code restarts draw from torch's random
number generator, so the match needs the generator state the checkpoint now carries
(``LiverMultiTaskTrainer.save_checkpoint``); ``test_resume_without_the_saved_random_state_diverges``
shows that the comparison notices when it is missing, and
``test_resume_without_the_optimizer_state_diverges`` that it notices a lost optimizer state.

The grad scaler (CUDA fp16 only) is nnU-Net's own ``grad_scaler_state`` and is not exercised on the CPU.
"""
import copy
import random

import numpy as np
import pytest
import torch

from nnunet_liver_ext.catalogue import load_catalogue
from nnunet_liver_ext.training.multitask_trainer import RESUME_STATE_KEY, LiverMultiTaskTrainer

from test_mti_net_trainer import DATASET_JSON, make_batch, make_trainer, nnunet_folders  # noqa: F401

torch.set_num_threads(1)

#: train steps per epoch
K = 2
ATOL = 1e-6


def _our_trainers():
    catalogue = load_catalogue()
    assert not catalogue.errors, catalogue.errors
    return [e.name for e in catalogue.bases()]


def _skip_if_refused(name: str, dataset_json: dict) -> None:
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    trainer_class = recursive_find_trainer_class_by_name(name)
    if issubclass(trainer_class, LiverMultiTaskTrainer):
        missing = [key for key in trainer_class.dataset_keys_required if key not in dataset_json]
        if missing:
            pytest.skip(f"{name} refuses a dataset without {missing}")


def _batches(trainer, n: int) -> list:
    """n different batches in nnU-Net's layout (made before either run, so they are the same for both)."""
    base = make_batch(trainer)
    generator = torch.Generator().manual_seed(5)
    return [dict(base, data=base["data"] + 0.3 * torch.randn(base["data"].shape, generator=generator))
            for _ in range(n)]


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _train_epoch(trainer, batches) -> list:
    """nnUNetTrainer.run_training's training half of one epoch; returns the step outputs."""
    trainer.on_train_epoch_start()
    outputs = [trainer.train_step(batch) for batch in batches]
    trainer.on_train_epoch_end(outputs)
    return outputs


def _end_epoch(trainer, path) -> None:
    """What nnUNetTrainer.on_epoch_end does for resuming: checkpoint (it records current_epoch + 1), advance."""
    trainer.save_checkpoint(str(path))
    trainer.current_epoch += 1


def _differences(a, b, where="") -> list:
    """Paths at which two nested state structures (dicts, lists, tensors, numbers) differ beyond ATOL."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        a, b = torch.as_tensor(a), torch.as_tensor(b)
        if a.shape != b.shape or a.dtype != b.dtype:
            return [f"{where}: {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}"]
        if a.is_floating_point():
            gap = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
            return [f"{where}: max |diff| {gap:.3g}"] if not gap <= ATOL else []
        return [] if torch.equal(a, b) else [f"{where}: differs"]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where}: keys {sorted(map(str, a.keys() ^ b.keys()))} in one only"]
        return [d for k in a for d in _differences(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: length {len(a)} vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{where}[{i}]")]
    if isinstance(a, (float, np.floating, np.ndarray)) or isinstance(b, (float, np.floating, np.ndarray)):
        return [] if np.allclose(a, b, rtol=0, atol=ATOL) else [f"{where}: {a} vs {b}"]
    return [] if a == b else [f"{where}: {a!r} vs {b!r}"]


def _state(trainer) -> dict:
    from nnunet_liver_ext.networks.contract import unwrap_network

    return {"network": unwrap_network(trainer.network).state_dict(),
            "optimizer": trainer.optimizer.state_dict(),
            "lrs": [group["lr"] for group in trainer.optimizer.param_groups],
            "epoch": trainer.current_epoch}


def _run_a(name, batches, checkpoint, configure=None):
    """Uninterrupted: epoch 0, checkpoint, epoch 1. Returns (trainer, epoch-1 step outputs)."""
    trainer = make_trainer(name)
    if configure is not None:
        configure(trainer)
    _seed_everything(7)
    _train_epoch(trainer, batches[:K])
    _end_epoch(trainer, checkpoint)
    outputs = _train_epoch(trainer, batches[K:])
    return trainer, outputs


def _run_b(name, batches, checkpoint, before_load=None, configure=None):
    """Resumed: a fresh trainer as ``--c`` builds it, other random states, load, epoch 1."""
    trainer = make_trainer(name, continue_training=True)
    if configure is not None:
        configure(trainer)
    _seed_everything(12345)
    if before_load is not None:
        before_load(trainer)
    trainer.load_checkpoint(str(checkpoint))
    assert trainer.current_epoch == 1
    return trainer, _train_epoch(trainer, batches[K:])


@pytest.mark.parametrize("name", _our_trainers())
def test_resume_matches_an_uninterrupted_run(nnunet_folders, tmp_path, name):  # noqa: F811
    _skip_if_refused(name, DATASET_JSON)
    checkpoint = tmp_path / "checkpoint_latest.pth"
    probe = make_trainer(name)
    batches = _batches(probe, 2 * K)
    del probe

    a, outputs_a = _run_a(name, batches, checkpoint)
    b, outputs_b = _run_b(name, batches, checkpoint)

    assert RESUME_STATE_KEY in torch.load(checkpoint, map_location="cpu", weights_only=False)
    differences = _differences(outputs_a, outputs_b, "step outputs") + _differences(_state(a), _state(b), "state")
    assert not differences, f"{name}: resumed run differs from the uninterrupted one:\n" + "\n".join(differences[:20])
    # the comparison covered what the method trains, not an empty state
    optimizer_state = _state(a)["optimizer"]
    inner = optimizer_state["hybrid"] if "hybrid" in optimizer_state else [optimizer_state]
    assert all(len(o["state"]) > 0 for o in inner), f"{name}: an optimizer without state after {2 * K} steps"


def test_every_method_state_the_resume_test_must_see_is_in_the_checkpoint(nnunet_folders, tmp_path):  # noqa: F811
    """What the parametrised test compares includes the pieces named in the issue: MTI-Net's discriminator and
    its Adam (the last optimizer of the hybrid scheme), the Mamba codebook's buffers, SGD + AdamW."""
    mti = make_trainer("nnUNetTrainerMTINet")
    assert [type(o).__name__ for o in mti.optimizer.optimizers] == ["SGD", "AdamW", "Adam"]
    assert mti.discriminator_optimizer is mti.optimizer.optimizers[-1]
    assert any(k.startswith("discriminator.") for k in mti.network.state_dict())
    mamba = make_trainer("nnUNetTrainerMambaCodebook")
    assert {"codebook.codes", "codebook.initialized", "codebook.usage_ema"} <= set(mamba.network.state_dict())


def _diverges(name, tmp_path, before_load=None, edit_checkpoint=None) -> list:
    checkpoint = tmp_path / "checkpoint_latest.pth"
    probe = make_trainer(name)
    batches = _batches(probe, 2 * K)
    a, outputs_a = _run_a(name, batches, checkpoint)
    if edit_checkpoint is not None:
        saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
        edit_checkpoint(saved)
        torch.save(saved, checkpoint)
    b, outputs_b = _run_b(name, batches, checkpoint, before_load)
    return _differences(outputs_a, outputs_b, "step outputs") + _differences(_state(a), _state(b), "state")


def test_resume_without_the_saved_random_state_diverges(nnunet_folders, tmp_path):  # noqa: F811
    """STD-Net's Transformer has dropout: without the generator state the resumed run draws other masks."""
    differences = _diverges("nnUNetTrainerSTDNet", tmp_path, edit_checkpoint=lambda c: c.pop(RESUME_STATE_KEY))
    assert any(d.startswith("state.network.temporal.") for d in differences), differences[:5]


def test_resume_without_the_optimizer_state_diverges(nnunet_folders, tmp_path):  # noqa: F811
    """MTI-Net with its optimizers' state (momenta, Adam moments, the discriminator's Adam) reset after loading."""
    def keep_fresh_optimizers(trainer):
        fresh = copy.deepcopy(trainer.optimizer.state_dict())
        original = trainer.load_checkpoint

        def load_then_forget(path):
            original(path)
            trainer.optimizer.load_state_dict(fresh)
        trainer.load_checkpoint = load_then_forget

    differences = _diverges("nnUNetTrainerMTINet", tmp_path, before_load=keep_fresh_optimizers)
    assert any(d.startswith("state.optimizer.hybrid[2]") for d in differences), differences[:5]
    assert any(d.startswith("state.network.discriminator.") for d in differences), differences[:5]


def test_resume_reproduces_the_codebook_restarts(nnunet_folders, tmp_path):  # noqa: F811
    """The Mamba codebook's dead-code restarts (codes moved onto random features of the batch) happen in the
    resumed epoch and draw the same features: a usage EMA that decays fast makes codes die within two steps."""
    restarts = {}

    def fast_dying_codes(run):
        def configure(trainer):
            codebook = trainer.network.codebook
            codebook.usage_decay, codebook.restart_threshold = 0.3, 0.9
            usage_stats = codebook.usage_stats

            def recorded(reset=True):
                stats = usage_stats(reset)
                restarts.setdefault(run, []).append(stats["restarted"])
                return stats
            codebook.usage_stats = recorded
        return configure

    checkpoint = tmp_path / "checkpoint_latest.pth"
    name = "nnUNetTrainerMambaCodebook"
    batches = _batches(make_trainer(name), 2 * K)
    a, outputs_a = _run_a(name, batches, checkpoint, configure=fast_dying_codes("a"))
    b, outputs_b = _run_b(name, batches, checkpoint, configure=fast_dying_codes("b"))
    assert restarts["a"][1] > 0, restarts  # epoch 1 of the uninterrupted run restarted codes
    assert restarts["b"] == restarts["a"][1:], restarts
    differences = _differences(outputs_a, outputs_b, "step outputs") + _differences(_state(a), _state(b), "state")
    assert not differences, differences[:20]


def test_checkpoint_holds_what_nnunets_own_save_checkpoint_writes(nnunet_folders, tmp_path):  # noqa: F811
    """``training.resume.nnunet_checkpoint`` writes nnU-Net's checkpoint out again (nnU-Net has no hook to add an
    entry): every key and value of nnU-Net's own ``save_checkpoint`` must be in ours, unchanged."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    for name in ("nnUNetTrainerMTINet", "nnUNetTrainerMambaCodebook"):
        trainer = make_trainer(name)
        _train_epoch(trainer, _batches(trainer, 1))
        nnUNetTrainer.save_checkpoint(trainer, str(tmp_path / "nnunet.pth"))
        trainer.save_checkpoint(str(tmp_path / "ours.pth"))
        theirs = torch.load(tmp_path / "nnunet.pth", map_location="cpu", weights_only=False)
        ours = torch.load(tmp_path / "ours.pth", map_location="cpu", weights_only=False)
        assert set(ours) == set(theirs) | {RESUME_STATE_KEY}
        assert not _differences({k: ours[k] for k in theirs}, theirs, name)


def test_a_checkpoint_of_another_network_is_refused_naming_the_file(nnunet_folders, tmp_path):  # noqa: F811
    from nnunet_liver_ext.errors import UserError

    path = tmp_path / "checkpoint_latest.pth"
    make_trainer("nnUNetTrainerSTDNet").save_checkpoint(str(path))
    other = make_trainer("nnUNetTrainerSTDNet_noTemporal", continue_training=True)
    with pytest.raises(UserError, match=f"{path}.*nnUNetTrainerSTDNet_noTemporal"):
        other.load_checkpoint(str(path))
    path.write_text("not a checkpoint")
    with pytest.raises(UserError, match=str(path)):
        make_trainer("nnUNetTrainerSTDNet", continue_training=True).load_checkpoint(str(path))


def test_a_truncated_checkpoint_is_called_unreadable_not_a_misfit(nnunet_folders, tmp_path):  # noqa: F811
    """A job killed while nnU-Net wrote checkpoint_latest.pth: the advice is the fold's next checkpoint, not
    another trainer or a fresh start."""
    from nnunet_liver_ext.errors import UserError

    path = tmp_path / "checkpoint_latest.pth"
    make_trainer("nnUNetTrainerSTDNet").save_checkpoint(str(path))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UserError, match=f"{path} cannot be read .*truncated or corrupt") as error:
        make_trainer("nnUNetTrainerSTDNet", continue_training=True).load_checkpoint(str(path))
    assert "move it aside and rerun with --c" in error.value.fix


def test_random_state_round_trips_all_three_generators():
    """Dropout and sampling draw from torch's, numpy's and Python's generators; one not put back draws other
    patches or masks than the run it continues."""
    from nnunet_liver_ext.training.resume import capture_random_state, restore_random_state

    state = capture_random_state(torch.device("cpu"))
    first = (np.random.rand(4), random.random(), torch.rand(4))
    restore_random_state(state, torch.device("cpu"))
    again = (np.random.rand(4), random.random(), torch.rand(4))
    np.testing.assert_array_equal(again[0], first[0])
    assert again[1] == first[1] and torch.equal(again[2], first[2])


def test_on_train_start_puts_the_generators_back_after_nnunets_warm_up_draws(nnunet_folders, tmp_path,  # noqa: F811
                                                                             monkeypatch):
    """nnU-Net's on_train_start draws a warm-up batch from each data loader after load_checkpoint; the resumed
    run must then draw what the uninterrupted run drew after its checkpoint."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    path = tmp_path / "checkpoint_latest.pth"
    _seed_everything(3)
    make_trainer("nnUNetTrainerDynTransNet").save_checkpoint(str(path))
    expected = (np.random.rand(3), random.random(), torch.rand(3))  # the uninterrupted run's next draws
    resumed = make_trainer("nnUNetTrainerDynTransNet", continue_training=True)
    resumed.load_checkpoint(str(path))
    # nnU-Net's on_train_start without a data set: only its loaders' warm-up draws
    monkeypatch.setattr(nnUNetTrainer, "on_train_start",
                        lambda self: (np.random.rand(5), random.random(), torch.rand(5)))
    resumed.on_train_start()
    drawn = (np.random.rand(3), random.random(), torch.rand(3))
    np.testing.assert_array_equal(drawn[0], expected[0])
    assert drawn[1] == expected[1] and torch.equal(drawn[2], expected[2])



def _finish_epoch_as_nnunet_does(trainer, mean_fg_dice: float) -> None:
    """nnU-Net's own on_epoch_end after an epoch whose validation gave ``mean_fg_dice`` (the EMA follows)."""
    epoch = trainer.current_epoch
    for key, value in (("epoch_start_timestamps", 0.0), ("lrs", 0.01), ("train_losses", -0.5), ("val_losses", -0.5),
                       ("dice_per_class_or_region", [mean_fg_dice]), ("mean_fg_dice", mean_fg_dice)):
        trainer.logger.log(key, value, epoch)
    trainer.on_epoch_end()


def test_a_continued_run_keeps_the_best_checkpoint_of_the_epochs_before(nnunet_folders, tmp_path):  # noqa: F811
    """nnU-Net writes checkpoint_latest.pth before it compares the epoch's EMA pseudo Dice with the best, so the
    checkpoint held the best of the epochs before that one (None after epoch 0): continued with --c, the next
    epoch, though worse, was 'Yayy! New best' and replaced checkpoint_best.pth."""
    import os

    trainer = make_trainer("nnUNetTrainerSTDNet")
    trainer.save_every = 1
    _finish_epoch_as_nnunet_does(trainer, 0.6)  # the best epoch
    best = os.path.join(trainer.output_folder, "checkpoint_best.pth")
    latest = os.path.join(trainer.output_folder, "checkpoint_latest.pth")
    assert torch.load(best, map_location="cpu", weights_only=False)["current_epoch"] == 1
    assert torch.load(latest, map_location="cpu", weights_only=False)["_best_ema"] == pytest.approx(0.6)

    resumed = make_trainer("nnUNetTrainerSTDNet", continue_training=True)
    resumed.save_every = 1
    resumed.load_checkpoint(latest)
    assert resumed.current_epoch == 1 and resumed._best_ema == pytest.approx(0.6)
    _finish_epoch_as_nnunet_does(resumed, 0.3)  # EMA 0.57: worse
    assert torch.load(best, map_location="cpu", weights_only=False)["current_epoch"] == 1
    assert torch.load(latest, map_location="cpu", weights_only=False)["_best_ema"] == pytest.approx(0.6)


def test_continuing_another_trainers_checkpoint_is_logged(nnunet_folders, tmp_path, capsys):  # noqa: F811
    """nnU-Net loads any checkpoint whose weights fit: DynTransNet's AdamW state continued as _paper turns its
    Adam into AdamW at the main trainer's rates without a word."""
    path = tmp_path / "checkpoint_latest.pth"
    make_trainer("nnUNetTrainerDynTransNet").save_checkpoint(str(path))
    other = make_trainer("nnUNetTrainerDynTransNet_paper", continue_training=True)
    other.load_checkpoint(str(path))
    out = capsys.readouterr().out
    assert "WARNING: this checkpoint was written by nnUNetTrainerDynTransNet, and continues as " \
           "nnUNetTrainerDynTransNet_paper" in out and "Continue with -tr nnUNetTrainerDynTransNet" in out
    make_trainer("nnUNetTrainerDynTransNet", continue_training=True).load_checkpoint(str(path))
    assert "WARNING" not in capsys.readouterr().out
