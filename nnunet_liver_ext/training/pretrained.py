"""``nnUNetv2_train DATASET CONFIG FOLD -tr <our trainer> -pretrained_weights FILE`` for this package's networks.

nnU-Net 2.8's ``run_training.maybe_load_checkpoint`` hands ``-pretrained_weights`` to
``load_pretrained_weights(network, fname)``, a name ``nnunetv2.run.run_training`` imports from
``nnunetv2.run.load_pretrained_weights``. That loader demands every non-segmentation key of the network
in the source with the same shape, which a multiphase network never meets against a single-phase
model (``networks.transfer`` explains why and gives the rule we use instead).

Why a rebinding: nnU-Net offers no hook for it. ``maybe_load_checkpoint`` is a module function that
receives the network and the file name only, so neither a trainer method nor the network's
``load_state_dict`` sees the call with its file. :func:`install` (run when
``training.multitask_trainer``, the base of every method trainer, is imported, which
``nnUNetv2_train`` does while it looks the trainer up, before it loads any weights) rebinds
``nnunetv2.run.run_training.load_pretrained_weights`` to :func:`load_pretrained_weights`. No file of
nnU-Net changes, and nnU-Net's behaviour does not either except for networks that ask for it:

- a network with a ``load_pretrained_state`` method (STD-Net, MTI-Net, the Mamba-codebook U-Net) gets
  it, and the report of loaded, adapted and skipped keys is printed;
- any other network (stock nnU-Net's, DynTransNet's) goes to the loader that was bound before: nnU-Net's own
  function, or another extension's replacement installed earlier, unchanged.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from nnunet_liver_ext.errors import UserError
from nnunet_liver_ext.networks.contract import unwrap_network
from nnunet_liver_ext.networks.transfer import TransferReport


def source_previous_stage_channels(checkpoint: dict) -> Optional[int]:
    """How many input channels of an nnU-Net checkpoint's network are the previous stage's one-hot segmentation
    (nnU-Net's ``determine_num_input_channels``): its foreground labels in a cascade configuration, 0 in any
    other; None when the checkpoint does not say (no ``init_args`` with plans, configuration and dataset.json)."""
    init_args = checkpoint.get("init_args")
    if not isinstance(init_args, dict) or not all(k in init_args for k in ("plans", "configuration", "dataset_json")):
        return None
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_manager = PlansManager(init_args["plans"])
    if plans_manager.get_configuration(init_args["configuration"]).previous_stage_name is None:
        return 0
    return len(plans_manager.get_label_manager(init_args["dataset_json"]).foreground_labels)


def read_pretrained(fname: str) -> Tuple[dict, Optional[int]]:
    """``(network state dict, previous-stage channels of its input)`` of ``fname`` (an nnU-Net checkpoint, or a
    plain state dict, whose previous-stage channels are unknown: None). A UserError naming the file otherwise."""
    if not os.path.isfile(fname):
        raise UserError(f"-pretrained_weights {fname}: no such file",
                        "give the checkpoint_final.pth of the pretraining run (nnUNet_results/.../fold_X/)")
    try:
        saved = torch.load(fname, map_location="cpu", weights_only=False)
    except Exception as e:  # a file torch cannot read, whatever the reason, is the user's input
        raise UserError(f"-pretrained_weights {fname}: torch cannot read it ({type(e).__name__}: {e})") from e
    if isinstance(saved, dict) and isinstance(saved.get("network_weights"), dict):
        try:
            previous_stage = source_previous_stage_channels(saved)
        except Exception as e:  # init_args nnU-Net cannot read: the checkpoint is not what its keys claim
            raise UserError(f"-pretrained_weights {fname}: its init_args (plans, configuration, dataset.json) do "
                            f"not load in nnU-Net ({type(e).__name__}: {e})") from e
        return saved["network_weights"], previous_stage
    if isinstance(saved, dict) and saved and all(isinstance(v, torch.Tensor) for v in saved.values()):
        return saved, None
    what = f"a dict with keys {sorted(map(str, saved))[:8]}" if isinstance(saved, dict) else type(saved).__name__
    raise UserError(f"-pretrained_weights {fname}: neither an nnU-Net checkpoint (no 'network_weights') nor a "
                    f"state dict; it holds {what}")


def load_pretrained_weights(network, fname: str, verbose: bool = False):
    """Drop-in for ``nnunetv2.run.load_pretrained_weights.load_pretrained_weights`` (same arguments).

    Networks with ``load_pretrained_state`` take the weights under ``networks.transfer``'s rule; the report
    is printed (rank 0 under DDP) and returned. Any other network: the loader :func:`install` replaced
    (nnU-Net's function unless another extension had replaced it first), its result returned."""
    module = unwrap_network(network)
    if not callable(getattr(module, "load_pretrained_state", None)):
        if _replaced_loader is not None:
            return _replaced_loader(network, fname, verbose=verbose)
        from nnunetv2.run import load_pretrained_weights as nnunet_loader

        return nnunet_loader.load_pretrained_weights(network, fname, verbose=verbose)
    weights, previous_stage = read_pretrained(fname)
    report: TransferReport = module.load_pretrained_state(weights, source=str(fname),
                                                          source_previous_stage_channels=previous_stage)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        print(report.format(), flush=True)
    return report


#: what ``run_training.load_pretrained_weights`` was before :func:`install`; networks that are not ours go there,
#: so another extension that rebinds the same name keeps working whichever is imported first
_replaced_loader = None


def install() -> None:
    """Routes ``nnUNetv2_train -pretrained_weights`` through :func:`load_pretrained_weights` (idempotent)."""
    global _replaced_loader
    import nnunetv2.run.run_training as run_training

    if run_training.load_pretrained_weights is not load_pretrained_weights:
        _replaced_loader = run_training.load_pretrained_weights
        run_training.load_pretrained_weights = load_pretrained_weights
