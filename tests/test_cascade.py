"""nnU-Net's cascade (3d_lowres -> 3d_cascade_fullres) with every trainer, in process and fast.

In a configuration with a ``previous_stage`` nnU-Net appends the previous stage's one-hot segmentation
(one channel per foreground label) after the image channels. STD-Net and MTI-Net read the image channels
as phases: they must not take those channels for more phases, but encode every phase image together with
them; the other networks read them as more input channels. Before this was handled, a 3-phase dataset
gave STD-Net five "phases" and MTI-Net's trainer refused the dataset.

The end-to-end run through nnU-Net's commands (plans with a cascade, five 3d_lowres folds, the cascade,
prediction of both stages) is tests/test_cascade_nnunet.py (slow).
"""
import copy

import pytest
import torch
from torch import nn

from nnunet_liver_ext.networks.blocks import build_phase_encoders, encode_phases, split_phase_channels
from nnunet_liver_ext.training.multitask_trainer import cascade_input_channels

from test_mti_net_trainer import (PHASES, PLANS, catalogue_trainers, make_batch, make_trainer,  # noqa: F401
                                  nnunet_folders)

torch.set_num_threads(1)

FOREGROUND_LABELS = 2  # liver, tumor: the previous stage's one-hot channels
CASCADE_PLANS = copy.deepcopy(PLANS)
CASCADE_PLANS["configurations"].update({
    "3d_lowres": {"inherits_from": "3d_fullres", "next_stage": "3d_cascade_fullres"},
    "3d_cascade_fullres": {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"},
})
ARCH = {"n_stages": 3, "features_per_stage": [4, 8, 16], "conv_op": nn.Conv3d, "kernel_sizes": [[3, 3, 3]] * 3,
        "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]], "n_conv_per_stage": [1, 1, 1], "conv_bias": True,
        "norm_op": nn.InstanceNorm3d, "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "nonlin": nn.LeakyReLU,
        "nonlin_kwargs": {"inplace": True}}


@pytest.mark.parametrize("share", [True, False], ids=["shared_encoder", "one_encoder_per_phase"])
def test_every_phase_is_encoded_with_the_previous_stage_segmentation(share):
    torch.manual_seed(0)
    phases, per_phase, previous = 3, 2, 2
    encoder, encoders = build_phase_encoders(phases, per_phase, ARCH, share, previous)
    x = torch.randn(2, phases * per_phase + previous, 8, 16, 16)
    skips = encode_phases(x, encoder, encoders, phases, per_phase, previous)
    for n in range(phases):
        own = encoder if encoders is None else encoders[n]
        expected = own(torch.cat((x[:, n * per_phase:(n + 1) * per_phase], x[:, phases * per_phase:]), 1))
        for skip, stage in zip(skips, expected):
            torch.testing.assert_close(skip.unflatten(0, (2, phases))[:, n], stage)


def test_without_previous_stage_the_phases_are_encoded_as_before():
    torch.manual_seed(0)
    encoder, _ = build_phase_encoders(3, 1, ARCH, True)
    x = torch.randn(2, 3, 8, 16, 16)
    for skip, stage in zip(encode_phases(x, encoder, None, 3, 1), encoder(x.reshape(6, 1, 8, 16, 16))):
        torch.testing.assert_close(skip, stage)
    with pytest.raises(ValueError, match=r"expected 5 input channels \(3 phases x 1 \+ 2 of the previous stage\)"):
        encode_phases(x, encoder, None, 3, 1, 2)


def test_phase_count_is_read_from_the_image_channels():
    assert split_phase_channels(5, 1, 2) == 3
    assert split_phase_channels(8, 2, 2) == 3
    assert split_phase_channels(4, 1) == 4
    for channels, per_phase, previous in ((5, 2, 2), (2, 1, 2), (4, 0, 0), (4, 1, -1)):
        with pytest.raises(ValueError, match="channels_per_phase"):
            split_phase_channels(channels, per_phase, previous)


def test_cascade_input_channels_are_those_beyond_the_image_channels():
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    manager = PlansManager(copy.deepcopy(CASCADE_PLANS))
    assert cascade_input_channels(manager.get_configuration("3d_fullres"), 4) == 0
    assert cascade_input_channels(manager.get_configuration("3d_lowres"), 4) == 0
    assert cascade_input_channels(manager.get_configuration("3d_cascade_fullres"), 6) == 2
    with pytest.raises(ValueError, match="leave none for the previous stage"):
        cascade_input_channels(manager.get_configuration("3d_cascade_fullres"), 4)


def make_cascade_trainer(name: str):
    """As nnUNetv2_train DATASET 3d_cascade_fullres 0 -tr NAME builds it, then initialize()."""
    return make_trainer(name, plans=CASCADE_PLANS, configuration="3d_cascade_fullres")


def cascade_batch(trainer) -> dict:
    """nnU-Net's cascade batch: the four phase images, then the previous stage's one-hot liver and tumor (here
    the reference, dilated by a voxel in x as a previous stage's imperfect segmentation would be)."""
    batch = make_batch(trainer)
    label = batch["target"][0]
    previous = torch.cat([(torch.roll(label, 1, -1) == value).float() for value in (1, 2)], 1)
    batch["data"] = torch.cat((batch["data"], previous), 1)
    return batch


@pytest.mark.parametrize("name", catalogue_trainers())
def test_every_trainer_trains_in_the_cascade_and_reads_the_previous_stage(nnunet_folders, name):  # noqa: F811
    trainer = make_cascade_trainer(name)
    assert trainer.is_cascaded and trainer.num_input_channels == len(PHASES) + FOREGROUND_LABELS
    network = trainer.network
    if hasattr(network, "num_phases"):  # a network that reads the channels as phases
        assert (network.num_phases, network.previous_stage_channels) == (len(PHASES), FOREGROUND_LABELS)
        fusion = getattr(network, "phase_fusions", [None])[0]
        if hasattr(fusion, "phase_bias") and network.fusion != "early":
            assert len(fusion.phase_bias) == len(PHASES)
    batch = cascade_batch(trainer)
    result = trainer.train_step(batch)
    assert torch.isfinite(torch.as_tensor(result["loss"]))

    network.eval()
    with torch.no_grad():
        data = batch["data"]
        other = data.clone()
        other[:, len(PHASES):] = 0  # the previous stage found nothing
        seg = network(data)
        seg = seg[0] if isinstance(seg, (list, tuple)) else seg
        seg_other = network(other)
        seg_other = seg_other[0] if isinstance(seg_other, (list, tuple)) else seg_other
    assert not torch.allclose(seg, seg_other), "the previous stage's segmentation does not reach the output"


def test_cascade_is_logged(nnunet_folders):  # noqa: F811
    trainer = make_cascade_trainer("nnUNetTrainerSTDNet")
    with open(trainer.log_file) as f:
        log = f.read()
    assert "Cascade: the 3d_lowres stage's segmentation (2 one-hot channels after the images) is encoded " \
           "together with every phase image" in log


def test_mti_net_tim_reads_the_phase_images_not_the_previous_stage(nnunet_folders):  # noqa: F811
    from nnunet_liver_ext.losses.case_losses import masked_l1
    from nnunet_liver_ext.networks.mti_net import masked_phase_means

    trainer = make_cascade_trainer("nnUNetTrainerMTINet")
    batch = cascade_batch(trainer)
    data = batch["data"]
    tumor = batch["target"][0] == 2
    trainer.network.eval()
    with torch.no_grad():
        output = trainer.network(data, heads=True)
        loss = trainer.tim_loss(data, output, tumor)
    probability = torch.softmax(output.seg_highres.float(), 1)[:, 2:3]
    images = data[:, :len(PHASES)]
    curve = masked_phase_means(images, probability)
    assert curve.shape == (2, len(PHASES))
    expected = masked_l1(curve, masked_phase_means(images, tumor.float()), tumor.flatten(1).any(1))
    torch.testing.assert_close(loss, expected)


def test_a_trainer_of_a_network_without_phases_passes_every_channel_on(nnunet_folders):  # noqa: F811
    trainer = make_cascade_trainer("nnUNetTrainerMambaCodebook")
    first_conv = next(m for m in trainer.network.modules() if isinstance(m, nn.Conv3d))
    assert first_conv.in_channels == len(PHASES) + FOREGROUND_LABELS
    with open(trainer.log_file) as f:
        assert "(2 one-hot channels after the images) is more input channels of the network" in f.read()


@pytest.mark.parametrize("name", catalogue_trainers())
def test_pretrained_weights_into_a_cascade_stage_leave_the_previous_stage_channels_at_zero(
        nnunet_folders, tmp_path, name):  # noqa: F811
    """``nnUNetv2_train DATASET 3d_cascade_fullres FOLD -tr NAME -pretrained_weights`` with the same trainer's
    3d_fullres model: every encoder's first convolution takes the source's kernel for its image channels and
    zeros for the previous stage's segmentation, so the stage starts answering as the source did. Before, a
    one-channel-per-phase source was tiled over the image and the two segmentation channels as if they were
    three phases (STD-Net, MTI-Net), or the first layer was skipped (Mamba-codebook)."""
    from nnunetv2.run.run_training import maybe_load_checkpoint

    from nnunet_liver_ext.networks.transfer import first_layer_keys

    source_trainer = make_trainer(name)
    if not hasattr(source_trainer.network, "load_pretrained_state"):
        pytest.skip(f"{name}'s network takes nnU-Net's loader, which wants the same shapes (nnU-Net's rule)")
    with torch.no_grad():
        for p in source_trainer.network.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    source_trainer.save_checkpoint(str(tmp_path / "fullres.pth"))
    source = source_trainer.network.state_dict()

    trainer = make_cascade_trainer(name)
    maybe_load_checkpoint(trainer, continue_training=False, validation_only=False,
                          pretrained_weights_file=str(tmp_path / "fullres.pth"))
    network = trainer.network
    first = first_layer_keys(network)
    assert first
    for key in first:
        weight = network.state_dict()[key]
        source_key = key if key in source else "encoder." + key.split(".", 2)[2]
        images = source[source_key].shape[1]
        assert weight.shape[1] == images + FOREGROUND_LABELS, key
        torch.testing.assert_close(weight[:, :images], source[source_key], msg=key)
        assert not weight[:, images:].any(), f"{key}: the previous stage's channels should start at zero"

    # the encoder answers an image with any previous-stage segmentation as the source encoder answered the image
    encoder = network.encoder if getattr(network, "encoder", None) is not None else network.encoders[0]
    source_encoder = source_trainer.network.encoder if getattr(source_trainer.network, "encoder", None) is not None \
        else source_trainer.network.encoders[0]
    encoder.eval()
    source_encoder.eval()
    images = next(m for m in source_encoder.modules() if isinstance(m, nn.Conv3d)).in_channels
    x = torch.randn(1, images, *PLANS["configurations"]["3d_fullres"]["patch_size"])
    segmentation = (torch.rand(1, FOREGROUND_LABELS, *x.shape[2:]) > 0.5).float()
    with torch.no_grad():
        ours, theirs = encoder(torch.cat((x, segmentation), 1)), source_encoder(x)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


def _perturbed_checkpoint(trainer, path) -> dict:
    with torch.no_grad():
        for p in trainer.network.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    trainer.save_checkpoint(str(path))
    return trainer.network.state_dict()


def _source_key(key: str, source: dict) -> str:
    return key if key in source else "encoder." + key.split(".", 2)[2]


@pytest.mark.parametrize("name", catalogue_trainers())
def test_pretrained_weights_from_a_cascade_stage(nnunet_folders, tmp_path, name):  # noqa: F811
    """``-pretrained_weights`` from a 3d_cascade_fullres model: into 3d_fullres, every first layer takes the
    source's image channels and drops its previous-stage segmentation channels (never read as phases); into
    another cascade stage of the same labels, the whole kernel is copied. The checkpoint says which channels are
    the segmentation (its plans, configuration and dataset.json)."""
    from nnunetv2.run.run_training import maybe_load_checkpoint

    from nnunet_liver_ext.networks.transfer import first_layer_keys
    from nnunet_liver_ext.training.pretrained import read_pretrained

    source_trainer = make_cascade_trainer(name)
    if not hasattr(source_trainer.network, "load_pretrained_state"):
        pytest.skip(f"{name}'s network takes nnU-Net's loader, which wants the same shapes (nnU-Net's rule)")
    source = _perturbed_checkpoint(source_trainer, tmp_path / "cascade.pth")
    assert read_pretrained(str(tmp_path / "cascade.pth"))[1] == FOREGROUND_LABELS

    for target, images_only in ((make_trainer(name), True), (make_cascade_trainer(name), False)):
        maybe_load_checkpoint(target, continue_training=False, validation_only=False,
                              pretrained_weights_file=str(tmp_path / "cascade.pth"))
        state = target.network.state_dict()
        first = first_layer_keys(target.network)
        assert first
        for key in first:
            kernel = source[_source_key(key, source)]
            expected = kernel[:, :-FOREGROUND_LABELS] if images_only else kernel
            torch.testing.assert_close(state[key], expected, msg=key)


def test_cascade_segmentation_channels_are_never_read_as_phases():
    """adapt_first_layer with the source's cascade channels: a one-phase stage with two segmentation channels
    has as many input channels as three phases, yet only its image channel is tiled over them; into a stage of
    other labels its segmentation channels start at zero."""
    from nnunet_liver_ext.networks.transfer import adapt_first_layer

    kernel = torch.randn(4, 1 + 2, 3, 3, 3)
    three_phases, rule = adapt_first_layer(kernel, torch.Size((4, 3, 3, 3, 3)), 0, source_previous_stage_channels=2)
    torch.testing.assert_close(three_phases, kernel[:, :1].repeat(1, 3, 1, 1, 1) / 3)
    assert "previous-stage segmentation channels dropped" in rule
    other_labels, rule = adapt_first_layer(kernel, torch.Size((4, 1 + 3, 3, 3, 3)), 3, source_previous_stage_channels=2)
    torch.testing.assert_close(other_labels[:, :1], kernel[:, :1])
    assert not other_labels[:, 1:].any() and "start at 0" in rule
    same, rule = adapt_first_layer(kernel, torch.Size((4, 3 + 2, 3, 3, 3)), 2, source_previous_stage_channels=2)
    torch.testing.assert_close(same, torch.cat((kernel[:, :1].repeat(1, 3, 1, 1, 1) / 3, kernel[:, 1:]), 1))
    assert "segmentation channels copied" in rule


def test_a_model_with_as_many_channels_as_a_stage_input_is_not_copied_into_it(nnunet_folders):  # noqa: F811
    """A stock model on three phases as channels has the shape of STD-Net's cascade phase encoder's first layer
    (one image channel + two segmentation channels). An nnU-Net checkpoint says it is no cascade stage: its
    kernel's channel groups are summed into the image channel and the segmentation channels start at zero. A plain
    state dict does not say, and is copied where the shapes agree (the only reading left)."""
    from nnunet_liver_ext.networks.transfer import first_layer_keys, plan_transfer

    network = make_cascade_trainer("nnUNetTrainerSTDNet").network
    first = sorted(first_layer_keys(network))
    state = network.state_dict()
    assert state[first[0]].shape[1] == 1 + FOREGROUND_LABELS
    kernel = torch.randn_like(state[first[0]])
    source = dict(state, **{key: kernel for key in first})
    new_state, report = plan_transfer(network, source, source_previous_stage_channels=0)
    expected = torch.cat((kernel.sum(1, keepdim=True), torch.zeros_like(kernel[:, :FOREGROUND_LABELS])), 1)
    for key in first:
        torch.testing.assert_close(new_state[key], expected, msg=key)
        assert "sum of the kernel's 3 channel groups" in report.adapted[key]
    unknown, _ = plan_transfer(network, source)
    for key in first:
        torch.testing.assert_close(unknown[key], kernel, msg=key)
