"""Stock nnU-Net (``nnUNetTrainer``, its PlainConvUNet, loss and optimiser untouched) on the short
schedules of ``training.schedules``: the baselines our methods' short variants are compared with
(``nnUNetTrainer_short`` for ``nnUNetTrainerSTDNet_short``, ...).

nnU-Net ships ``nnUNetTrainer_5epochs`` and ``nnUNetTrainer_10epochs`` itself (the same 5 and 10 x
250 iterations) and finds its own classes first, so those names are left to nnU-Net.
"""
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.training.nnUNetTrainer.variants.training_length import nnUNetTrainer_Xepochs

from nnunet_liver_ext.training.schedules import register_schedule_variants

register_schedule_variants(globals(), bases=[nnUNetTrainer], skip_names=dir(nnUNetTrainer_Xepochs))
