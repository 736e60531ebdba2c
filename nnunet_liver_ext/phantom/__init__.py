"""Synthetic multiphase liver phantom: contrast-enhanced CT and dynamic MRI cases whose
lesion class is decidable from the enhancement dynamics, with writers for the source layouts
the converters read (LiTS, MSD Task03, TCGA-LIHC DICOM, dynamic MRI, ATLAS) and for an
nnU-Net raw dataset.
"""
from nnunet_liver_ext.phantom.case import TISSUES, Lesion, PhantomCase
from nnunet_liver_ext.phantom.config import (
    CT_PHASES, DEFAULT_CT_PHASES, LESION_CLASSES, MRI_PHASES, REFERENCE_PHASE, PhantomConfig,
)
from nnunet_liver_ext.phantom.generator import generate_case, generate_cases
from nnunet_liver_ext.phantom.writers import (
    write_atlas, write_dynamic_mri, write_lits, write_msd_task03, write_nnunet_raw, write_tcga_dicom,
)

__all__ = [
    "PhantomConfig", "PhantomCase", "Lesion", "generate_case", "generate_cases", "CT_PHASES",
    "MRI_PHASES", "LESION_CLASSES", "REFERENCE_PHASE", "DEFAULT_CT_PHASES", "TISSUES",
    "write_nnunet_raw", "write_lits", "write_msd_task03", "write_atlas", "write_tcga_dicom",
    "write_dynamic_mri",
]
