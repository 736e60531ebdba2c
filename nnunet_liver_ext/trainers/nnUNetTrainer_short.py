"""Stock nnU-Net (``nnUNetTrainer``, its PlainConvUNet, loss and optimiser untouched) on the short
schedules of ``training.schedules``: the baseline our methods' short variants are compared with.
"""
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_liver_ext.training.schedules import apply_schedule


class nnUNetTrainer_short(nnUNetTrainer):
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_schedule(self, "short")


class nnUNetTrainer_demo(nnUNetTrainer):
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_schedule(self, "demo")


class nnUNetTrainer_tiny(nnUNetTrainer):
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_schedule(self, "tiny")
