"""``nnUNetv2_train -pretrained_weights`` from a single-phase model into this package's networks
(``networks.transfer`` has the rule, ``training.pretrained`` the routing).

The weights come from real checkpoints: a stock ``nnUNetTrainer`` (PlainConvUNet) built from the same
plans on a one-channel dataset and saved with its own ``save_checkpoint``. They are loaded through
``nnunetv2.run.run_training.maybe_load_checkpoint``, the function ``nnUNetv2_train`` calls for
``-pretrained_weights``, so the rebinding is exercised as the console command uses it.

- every trainer of the package (the catalogue's list): networks with ``load_pretrained_state``
  take the single-phase encoder (or refuse, naming the file, when their encoder does not match the
  plans' one: the Mamba-codebook ``_paper`` widths); the others get nnU-Net's own loader, which refuses
  a model of another architecture as it always has; and a checkpoint of the same trainer transfers
  everything but segmentation layers and heads;
- the rule itself on STD-Net and MTI-Net: shared and per-phase encoders, the first-layer channel rule
  (tiling for early fusion, summing for a model trained on the phases as channels: the same response
  to an input whose phases are equal), heads and discriminator untouched, aliases consistent;
- bad files give a UserError naming the file.
"""
import pytest
import torch

from nnunet_liver_ext.catalogue import load_catalogue
from nnunet_liver_ext.errors import UserError
from nnunet_liver_ext.networks.transfer import HEAD, MISSING, first_layer_keys
from nnunet_liver_ext.training.multitask_trainer import LiverMultiTaskTrainer

from test_mti_net_trainer import DATASET_JSON, make_trainer, nnunet_folders  # noqa: F401

torch.set_num_threads(1)

SINGLE_PHASE = {"name": "SinglePhaseUnit", "channel_names": {"0": "CT"},
                "labels": {"background": 0, "liver": 1, "tumor": 2}, "numTraining": 3, "file_ending": ".nii.gz"}


def _our_trainers():
    catalogue = load_catalogue()
    assert not catalogue.errors, catalogue.errors
    return [e.name for e in catalogue.bases()]


def _stock_checkpoint(path, dataset_json=SINGLE_PHASE):
    """A stock nnUNetTrainer (PlainConvUNet of the test plans) saved by nnU-Net's own save_checkpoint, with
    weights moved off their initialisation so that a transfer is visible."""
    trainer = make_trainer("nnUNetTrainer", dataset_json)
    with torch.no_grad():
        for p in trainer.network.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    trainer.save_checkpoint(str(path))
    return {k: v.detach().clone() for k, v in trainer.network.state_dict().items()}


def _load_like_nnunetv2_train(trainer, path):
    """What ``nnUNetv2_train ... -pretrained_weights path`` does after building the trainer."""
    from nnunetv2.run.run_training import maybe_load_checkpoint

    maybe_load_checkpoint(trainer, continue_training=False, validation_only=False, pretrained_weights_file=str(path))


def _state(network) -> dict:
    return {k: v.detach().clone() for k, v in network.state_dict().items()}


def _skip_if_refused(name):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    cls = recursive_find_trainer_class_by_name(name)
    if issubclass(cls, LiverMultiTaskTrainer) and any(k not in DATASET_JSON for k in cls.dataset_keys_required):
        pytest.skip(f"{name} refuses the test dataset")


@pytest.mark.parametrize("name", _our_trainers())
def test_single_phase_weights_into_every_trainer(nnunet_folders, tmp_path, capsys, name):  # noqa: F811
    _skip_if_refused(name)
    source = _stock_checkpoint(tmp_path / "single_phase.pth")
    trainer = make_trainer(name)
    network = trainer.network
    before = _state(network)
    if not hasattr(network, "load_pretrained_state"):
        # nnU-Net's own loader, unchanged: it refuses a network of another architecture
        with pytest.raises(AssertionError, match="(?i)missing in the pretrained|not the same"):
            _load_like_nnunetv2_train(trainer, tmp_path / "single_phase.pth")
        return
    first = first_layer_keys(network)
    encoder = {k: v for k, v in before.items() if k.startswith(("encoder.", "encoders."))}
    # the encoder matches when every tensor but the first layer has the source's shape under its single-phase name
    single_name = {k: ("encoder." + k.split(".", 2)[2]) if k.startswith("encoders.") else k for k in encoder}
    matches = all(single_name[k] in source and source[single_name[k]].shape == v.shape
                  for k, v in encoder.items() if k not in first)
    if not matches:
        with pytest.raises(UserError, match="single_phase.pth.*none of the"):
            _load_like_nnunetv2_train(trainer, tmp_path / "single_phase.pth")
        assert not [k for k, v in _state(network).items() if not torch.equal(v, before[k])], "loaded in part"
        return
    _load_like_nnunetv2_train(trainer, tmp_path / "single_phase.pth")
    printed = capsys.readouterr().out
    after = _state(network)
    assert f"single_phase.pth -> {type(network).__name__}" in printed
    for key in encoder:
        if key in first and source[single_name[key]].shape != after[key].shape:
            assert f"  {key}: from {single_name[key]}, input channels" in printed
        else:
            assert torch.equal(after[key], source[single_name[key]]), key
    for key in after:
        if key.startswith(tuple(network.transfer_skip_prefixes)) or ".seg_layers." in key:
            assert torch.equal(after[key], before[key]), f"{key} is a head or segmentation layer"
        elif not key.startswith(("encoder.", "encoders.", "decoder.")):
            assert torch.equal(after[key], before[key]), f"{key} has no counterpart in a single-phase model"
    assert f"skipped, {MISSING}" in printed or not set(after) - set(source)


@pytest.mark.parametrize("name", _our_trainers())
def test_same_trainer_checkpoint_transfers_all_but_segmentation_layers_and_heads(
        nnunet_folders, tmp_path, name):  # noqa: F811
    """Pretraining a method on one multiphase dataset and fine-tuning it on another: for our networks and for
    nnU-Net's loader alike, everything but segmentation layers (and our case-level heads) comes across."""
    _skip_if_refused(name)
    pretrained = make_trainer(name)
    with torch.no_grad():
        for p in pretrained.network.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    pretrained.save_checkpoint(str(tmp_path / "same.pth"))
    source = _state(pretrained.network)
    trainer = make_trainer(name)
    before = _state(trainer.network)
    _load_like_nnunetv2_train(trainer, tmp_path / "same.pth")
    skip = tuple(getattr(trainer.network, "transfer_skip_prefixes", ()))
    for key, value in _state(trainer.network).items():
        kept = ".seg_layers." in key or key.startswith(skip)
        expected = before[key] if kept else source[key]
        assert torch.equal(value, expected), f"{key}: {'kept' if kept else 'transferred'} expected"


# ---------------------------------------------------------------------- the rule on STD-Net and MTI-Net
def _transfer(name, source_path, dataset_json=DATASET_JSON):
    trainer = make_trainer(name, dataset_json)
    network = trainer.network
    from nnunet_liver_ext.training.pretrained import read_pretrained

    before = _state(network)
    report = network.load_pretrained_state(read_pretrained(str(source_path))[0], source=str(source_path))
    return network, before, _state(network), report


def test_std_net_shared_encoder_and_decoder_load_heads_and_temporal_model_do_not(
        nnunet_folders, tmp_path):  # noqa: F811
    source = _stock_checkpoint(tmp_path / "stock.pth")
    network, before, after, report = _transfer("nnUNetTrainerSTDNet", tmp_path / "stock.pth")
    assert network.encoders is None and network.num_phases == 4
    for key in after:
        if key.startswith(("encoder.", "decoder.encoder.", "decoder.stages.", "decoder.transpconvs.")):
            assert torch.equal(after[key], source[key]), key
            assert key in report.loaded
        elif ".seg_layers." in key or key.startswith("cls_head."):
            assert report.skipped[key][0] == HEAD and torch.equal(after[key], before[key])
        else:
            assert report.skipped[key][0] == MISSING and torch.equal(after[key], before[key])
    assert not report.adapted  # one channel per phase here and in the source: the first layer fits as it is
    assert report.unused_source == [k for k in source if ".seg_layers." in k]
    text = report.format()
    assert "encoder: " in text and f"skipped, {MISSING}" in text and "temporal.layers.0.linear1.weight" in text


def test_std_net_one_encoder_per_phase_each_takes_the_single_phase_encoder(nnunet_folders, tmp_path):  # noqa: F811
    source = _stock_checkpoint(tmp_path / "stock.pth")
    network, _, after, report = _transfer("nnUNetTrainerSTDNet_noWeightSharing", tmp_path / "stock.pth")
    assert len(network.encoders) == 4
    per_phase = [k for k in after if k.startswith("encoders.")]
    assert per_phase
    for key in per_phase:
        assert torch.equal(after[key], source["encoder." + key.split(".", 2)[2]]), key
    # the modules themselves, not only the state dict, hold the weights
    for encoder in network.encoders:
        assert torch.equal(encoder.stages[1][0].convs[0].conv.weight, source["encoder.stages.1.0.convs.0.conv.weight"])


def _first_conv(encoder):
    return next(m for m in encoder.modules() if isinstance(m, torch.nn.modules.conv._ConvNd))


def test_early_fusion_first_layer_tiles_the_single_channel_kernel(nnunet_folders, tmp_path):  # noqa: F811
    """One encoder on the 4 phases as channels: its first kernel is the single-channel one tiled 4 times over
    4, so an input whose 4 phases show the same image gives the single-phase model's response."""
    _stock_checkpoint(tmp_path / "stock.pth")
    stock = make_trainer("nnUNetTrainer", SINGLE_PHASE)
    stock.load_checkpoint(str(tmp_path / "stock.pth"))
    network, _, after, report = _transfer("nnUNetTrainerSTDNet_earlyFusion", tmp_path / "stock.pth")
    key = "encoder.stages.0.0.convs.0.conv.weight"
    assert key in report.adapted and "tiled 4 times, divided by 4" in report.adapted[key]
    assert after[key].shape[1] == 4
    image = torch.randn(1, 1, 8, 16, 16)
    with torch.no_grad():
        expected = _first_conv(stock.network.encoder)(image)
        got = _first_conv(network.encoder)(image.expand(1, 4, 8, 16, 16))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # the aliases of that kernel (decoder.encoder.*, all_modules) were adapted alike
    assert all(torch.equal(after[k], after[key]) for k in first_layer_keys(network))


def test_model_trained_on_phases_as_channels_sums_into_the_shared_phase_encoder(nnunet_folders, tmp_path):  # noqa: F811
    """Stock nnU-Net trained on the 4 phases as channels -> STD-Net's shared encoder of one channel per phase:
    the kernel's 4 channel groups are summed; the same response to a phase-constant input."""
    four_channels = {k: v for k, v in DATASET_JSON.items() if k not in ("phases", "characterization", "enhancement")}
    _stock_checkpoint(tmp_path / "stock4.pth", four_channels)
    stock = make_trainer("nnUNetTrainer", four_channels)
    stock.load_checkpoint(str(tmp_path / "stock4.pth"))
    network, _, after, report = _transfer("nnUNetTrainerSTDNet", tmp_path / "stock4.pth")
    key = "encoder.stages.0.0.convs.0.conv.weight"
    assert "sum of the kernel's 4 channel groups" in report.adapted[key]
    image = torch.randn(1, 1, 8, 16, 16)
    with torch.no_grad():
        expected = _first_conv(stock.network.encoder)(image.expand(1, 4, 8, 16, 16))
        got = _first_conv(network.encoder)(image)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(after["encoder.stages.1.0.convs.0.conv.weight"],
                       stock.network.state_dict()["encoder.stages.1.0.convs.0.conv.weight"])


def test_mti_net_takes_the_encoder_and_leaves_heads_and_discriminator(nnunet_folders, tmp_path):  # noqa: F811
    source = _stock_checkpoint(tmp_path / "stock.pth")
    network, before, after, report = _transfer("nnUNetTrainerMTINet", tmp_path / "stock.pth")
    assert network.discriminator is not None and network.curve_head is not None and network.cls_head is not None
    for key in after:
        if key.startswith(("encoder.", "decoder.stages.", "decoder.transpconvs.")):
            assert torch.equal(after[key], source[key]), key
        elif key.startswith(("cls_head.", "curve_head.", "discriminator.")) or ".seg_layers." in key:
            assert report.skipped[key][0] == HEAD and torch.equal(after[key], before[key]), key
        elif key.startswith(("mdief.", "phase_concat.", "token_pools.", "transformer.")):
            assert report.skipped[key][0] == MISSING and torch.equal(after[key], before[key]), key


def test_mti_net_per_phase_encoders(nnunet_folders, tmp_path):  # noqa: F811
    source = _stock_checkpoint(tmp_path / "stock.pth")
    network, _, after, _ = _transfer("nnUNetTrainerMTINet_noWeightSharing", tmp_path / "stock.pth")
    for key in (k for k in after if k.startswith("encoders.")):
        assert torch.equal(after[key], source["encoder." + key.split(".", 2)[2]]), key


def test_a_state_dict_without_the_decoder_alias_still_loads_the_encoder(nnunet_folders, tmp_path):  # noqa: F811
    """``decoder.encoder.*`` names the same tensors as ``encoder.*``: from a source without those alias keys the
    encoder holds the source's values and the report counts the aliases as loaded, not as missing."""
    source = _stock_checkpoint(tmp_path / "stock.pth")
    plain = {k: v for k, v in source.items() if not k.startswith("decoder.encoder.")}
    torch.save(plain, tmp_path / "plain_state_dict.pth")
    network, _, after, report = _transfer("nnUNetTrainerSTDNet", tmp_path / "plain_state_dict.pth")
    key = "encoder.stages.1.0.convs.0.conv.weight"
    assert torch.equal(network.encoder.stages[1][0].convs[0].conv.weight, source[key])
    assert "decoder.encoder.stages.1.0.convs.0.conv.weight" in report.loaded


# ---------------------------------------------------------------------- refusals
def test_a_model_without_a_matching_encoder_is_refused_naming_the_file(nnunet_folders, tmp_path):  # noqa: F811
    dyn = make_trainer("nnUNetTrainerDynTransNet")
    dyn.save_checkpoint(str(tmp_path / "dyntransnet.pth"))
    trainer = make_trainer("nnUNetTrainerSTDNet")
    before = _state(trainer.network)
    with pytest.raises(UserError, match=r"dyntransnet\.pth: none of the \d+ encoder tensors of STDNet") as error:
        _load_like_nnunetv2_train(trainer, tmp_path / "dyntransnet.pth")
    assert "nnUNetv2_move_plans_between_datasets" in str(error.value)
    assert all(torch.equal(v, before[k]) for k, v in _state(trainer.network).items()), "loaded in part"


@pytest.mark.parametrize("content,message", [(None, "no such file"), (b"not a checkpoint", "torch cannot read it"),
                                             ({"epoch": 3}, "neither an nnU-Net checkpoint")])
def test_bad_files_are_refused_naming_the_file(nnunet_folders, tmp_path, content, message):  # noqa: F811
    path = tmp_path / "weights.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    trainer = make_trainer("nnUNetTrainerSTDNet")
    with pytest.raises(UserError, match=f"{path}: {message}"):
        _load_like_nnunetv2_train(trainer, path)


def test_stock_networks_keep_nnunets_loader(nnunet_folders, tmp_path):  # noqa: F811
    """The rebinding leaves stock nnU-Net alone: same-architecture weights load as nnU-Net loads them, and a
    model with other input channels is refused by nnU-Net's own assertion."""
    import nnunetv2.run.run_training as run_training
    from nnunetv2.run import load_pretrained_weights as nnunet_loader

    from nnunet_liver_ext.training import pretrained

    assert run_training.load_pretrained_weights is pretrained.load_pretrained_weights
    assert nnunet_loader.load_pretrained_weights is not pretrained.load_pretrained_weights
    source = _stock_checkpoint(tmp_path / "stock.pth")
    stock = make_trainer("nnUNetTrainer", SINGLE_PHASE)
    _load_like_nnunetv2_train(stock, tmp_path / "stock.pth")
    for key, value in stock.network.state_dict().items():
        assert ".seg_layers." in key or torch.equal(value, source[key]), key
    four = make_trainer("nnUNetTrainer", {**SINGLE_PHASE, "channel_names": {str(c): "CT" for c in range(4)}})
    with pytest.raises(AssertionError, match="not the same"):
        _load_like_nnunetv2_train(four, tmp_path / "stock.pth")


def test_a_loader_another_extension_installed_first_still_gets_stock_networks(nnunet_folders, monkeypatch):  # noqa: F811
    """Another extension that rebinds the same nnU-Net name before our trainers are imported keeps its loader for
    networks that are not ours; ours keeps STD-Net's, and installing twice changes nothing."""
    import nnunetv2.run.run_training as run_training

    from nnunet_liver_ext.training import pretrained

    calls = []

    def their_loader(network, fname, verbose=False):
        calls.append((type(network).__name__, fname))
        return "theirs"

    monkeypatch.setattr(run_training, "load_pretrained_weights", their_loader)
    monkeypatch.setattr(pretrained, "_replaced_loader", None)
    pretrained.install()
    pretrained.install()
    assert run_training.load_pretrained_weights is pretrained.load_pretrained_weights
    assert run_training.load_pretrained_weights(torch.nn.Conv3d(1, 1, 1), "model.pth") == "theirs"
    assert calls == [("Conv3d", "model.pth")]
    with pytest.raises(UserError, match="no such file"):  # ours, not theirs: STD-Net asks for its own rule
        run_training.load_pretrained_weights(make_trainer("nnUNetTrainerSTDNet").network, "missing.pth")
    assert len(calls) == 1


def test_a_first_layer_with_phases_as_channels_sums_each_channel_over_the_phases_phase_major():
    """Guards against summing the wrong channel groups when a stock model trained on r phases x C channels
    (nnU-Net's phase-major channel order) seeds an encoder of C channels per phase."""
    from nnunet_liver_ext.networks.transfer import adapt_first_layer

    source = torch.arange(2 * 6, dtype=torch.float32).view(2, 6, 1, 1, 1)  # 3 phases x 2 channels
    adapted, _ = adapt_first_layer(source, torch.Size((2, 2, 1, 1, 1)))
    torch.testing.assert_close(adapted[:, 0], source[:, [0, 2, 4]].sum(1))
    torch.testing.assert_close(adapted[:, 1], source[:, [1, 3, 5]].sum(1))


def test_every_wrapper_prefix_of_a_saved_ddp_and_compiled_model_is_stripped():
    """Guards against keys of a model saved while both DDP- and torch.compile-wrapped (``module._orig_mod.``)
    keeping a prefix, so that no key matches and nothing is transferred."""
    from nnunet_liver_ext.networks.transfer import strip_wrapper_prefixes

    t = torch.zeros(1)
    assert strip_wrapper_prefixes({"module._orig_mod.encoder.w": t, "_orig_mod.module.decoder.b": t,
                                   "encoder.x": t}) == {"encoder.w": t, "decoder.b": t, "encoder.x": t}


def test_weights_that_fit_the_decoder_but_no_encoder_tensor_are_refused():
    """Guards against a source whose encoder does not fit (other plans) being loaded for its decoder alone: the
    run would look fine-tuned while its encoder trains from scratch."""
    from test_std_net import make as make_std_net

    source = {k: v for k, v in make_std_net(num_case_classes=0).state_dict().items()
              if k.startswith("decoder.") and not k.startswith("decoder.encoder.")}
    net = make_std_net(num_case_classes=0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(UserError, match="none of the .* encoder tensors"):
        net.load_pretrained_state(source, "decoder_only.pth")
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
