"""nnunet-liver-ext: liver and liver-tumor methods plugged into a stock nnU-Net v2.

`dataset_conversion/` and `trainer_plans/` live at the repository top level (the user's
design card fixes that layout) but install as `nnunet_liver_ext.dataset_conversion` and
`nnunet_liver_ext.trainer_plans`, so no generic top-level package names land in
site-packages.
"""
from setuptools import find_packages, setup

core_packages = find_packages(include=["nnunet_liver_ext", "nnunet_liver_ext.*"])
mapped = {
    "nnunet_liver_ext.dataset_conversion": "dataset_conversion",
    "nnunet_liver_ext.trainer_plans": "trainer_plans",
}

setup(
    name="nnunet-liver-ext",
    version="0.1.0",
    description="STD-Net, DynTransNet, Mamba-codebook U-Net and MTI-Net inside nnU-Net v2",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # trainers/ has no __init__.py (nnU-Net imports its modules as top-level modules), so find_packages
    # skips it; without it a non-editable install leaves nnUNet_extTrainer pointing at nothing
    packages=core_packages + ["nnunet_liver_ext.trainers"] + list(mapped),
    package_dir=mapped,
    install_requires=[
        "nnunetv2==2.8.*",
        "SimpleITK>=2.2",
        "pydicom>=3.0",
        "scipy",
        "numpy",
        "matplotlib",
        "tqdm",
        "scikit-learn",
        "filelock",  # torch's own dependency
    ],
    extras_require={
        # mamba-ssm ships as an sdist with a CUDA extension; never a CPU dependency.
        "mamba": ["mamba-ssm>=2.3,<2.4"],
        "dev": ["pytest", "scikit-learn", "medpy", "monai"],
    },
    entry_points={
        "console_scripts": [
            "nnunet-liver=nnunet_liver_ext.cli:main",
        ],
    },
)
