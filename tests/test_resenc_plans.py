"""nnU-Net's residual-encoder presets (``nnUNetv2_plan_and_preprocess -pl nnUNetPlannerResEncM``, then
``nnUNetv2_train ... -p nnUNetResEncUNetMPlans``), which nnU-Net recommends over its plain U-Net: every trainer
builds its network from ResidualEncoderUNet plans (``n_blocks_per_stage`` instead of ``n_conv_per_stage``) and
trains a step. The networks that reuse the plans' encoder (STD-Net, MTI-Net, the Mamba-codebook U-Net) get
dynamic-network-architectures' ResidualEncoder; DynTransNet has a transformer encoder of its own."""
import copy

import pytest
import torch
from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder

from test_mti_net_trainer import PLANS, catalogue_trainers, make_batch, make_trainer, nnunet_folders  # noqa: F401

torch.set_num_threads(1)

RESENC_PLANS = copy.deepcopy(PLANS)
_architecture = RESENC_PLANS["configurations"]["3d_fullres"]["architecture"]
_architecture["network_class_name"] = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
_architecture["arch_kwargs"]["n_blocks_per_stage"] = [1, 2, 2]  # nnU-Net's ResEnc presets: more blocks deeper
del _architecture["arch_kwargs"]["n_conv_per_stage"]


@pytest.mark.parametrize("name", ["nnUNetTrainer", *catalogue_trainers()])
def test_every_trainer_trains_on_residual_encoder_plans(nnunet_folders, name):  # noqa: F811
    trainer = make_trainer(name, plans=RESENC_PLANS)
    network = trainer.network
    encoders = [getattr(network, "encoder", None)] + list(getattr(network, "encoders", None) or [])
    encoders = [e for e in encoders if e is not None]
    if not name.startswith("nnUNetTrainerDynTransNet"):
        assert encoders and all(isinstance(e, ResidualEncoder) for e in encoders), [type(e) for e in encoders]
        assert [len(stage.blocks) for stage in encoders[0].stages] == [1, 2, 2]
    result = trainer.train_step(make_batch(trainer))
    assert all(torch.isfinite(torch.as_tensor(v)) for v in result.values()), result
