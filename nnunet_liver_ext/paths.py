"""Where nnU-Net must look for this package's trainers."""
from pathlib import Path

TRAINERS_DIR = Path(__file__).resolve().parent / "trainers"


def ext_trainer_export_line() -> str:
    """The shell line that makes stock `nnUNetv2_train -tr` find our trainers."""
    return f"export nnUNet_extTrainer={TRAINERS_DIR}"
