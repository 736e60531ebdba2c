"""Reading nnU-Net plans for our networks, and the package's own block inside the plans.

nnU-Net's predictor rebuilds the network with ``build_network_architecture(plans_manager, ...)``
from the ``plans.json`` that the trainer copied into its results folder; dataset.json is not
passed. What the network's shape depends on beyond the plans (the characterization classes, the
phase names, the curve normalisation) therefore travels inside the plans under
:data:`PLANS_KEY`, written by the trainer before it saves them: plans as data.
"""
from __future__ import annotations

import pydoc

PLANS_KEY = "nnunet_liver_ext"


def resolved_arch_kwargs(configuration_manager) -> dict:
    """The configuration's architecture kwargs with import strings (conv_op, norm_op, ...) resolved,
    as nnU-Net's ``get_network_from_plans`` does."""
    arch_kwargs = dict(configuration_manager.network_arch_init_kwargs)
    for key in configuration_manager.network_arch_init_kwargs_req_import:
        if arch_kwargs.get(key) is not None:
            located = pydoc.locate(arch_kwargs[key])
            if located is None:
                raise ImportError(f"plans name {arch_kwargs[key]!r} for {key!r}, which cannot be imported")
            arch_kwargs[key] = located
    return arch_kwargs


def liver_ext_block(plans: dict) -> dict:
    return plans.get(PLANS_KEY) or {}


def trained_case_heads(plans: dict) -> list:
    """The case-level heads a trained network has ("cls", "curve"), as its trainer wrote them into the plans;
    plans from before that key had a class head exactly when they had classes. Torch-free: the prediction
    command reads it before it loads a model."""
    block = liver_ext_block(plans)
    if "case_heads" in block:
        return list(block["case_heads"])
    return ["cls"] if block.get("case_classes") else []
