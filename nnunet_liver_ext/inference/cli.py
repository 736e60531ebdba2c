"""``nnunet-liver predict``: ``nnUNetv2_predict`` plus per-case characterization.

Same options as ``nnUNetv2_predict`` (-i -o -d -c -p -tr -f -chk -step_size --disable_tta ...);
segmentations are nnU-Net's own, and next to each ``CASE.nii.gz`` comes ``CASE.json`` (class
probabilities and predicted class, the enhancement curve where the method has one), plus
``characterization.csv`` for the folder. Folds are averaged like the segmentation.
"""
from __future__ import annotations

import argparse
import os


def _predict(args: argparse.Namespace) -> int:
    import torch
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    from nnunet_liver_ext.inference.characterization import CharacterizationPredictor
    from nnunet_liver_ext.paths import TRAINERS_DIR

    # the predictor rebuilds the network through the trainer class, which nnU-Net finds here
    os.environ.setdefault("nnUNet_extTrainer", str(TRAINERS_DIR))
    if args.npp < 1 or args.nps < 1:
        raise SystemExit("nnunet-liver predict needs -npp >= 1 and -nps >= 1 (nnU-Net's sequential mode bypasses "
                         "the per-case hook that writes CASE.json)")
    if args.device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    elif args.device == "cuda":
        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
    model_folder = get_output_folder(args.d, args.tr, args.p, args.c)
    if not os.path.isdir(model_folder):
        raise SystemExit(f"no trained model at {model_folder} (dataset {args.d}, trainer {args.tr}, plans {args.p}, "
                         f"configuration {args.c})")
    os.makedirs(args.o, exist_ok=True)
    predictor = CharacterizationPredictor(tile_step_size=args.step_size, use_gaussian=True,
                                          use_mirroring=not args.disable_tta,
                                          perform_everything_on_device=not args.not_on_device,
                                          device=torch.device(args.device), verbose=args.verbose,
                                          verbose_preprocessing=args.verbose,
                                          allow_tqdm=not args.disable_progress_bar)
    folds = [f if f == "all" else int(f) for f in args.f]
    predictor.initialize_from_trained_model_folder(model_folder, folds, checkpoint_name=args.chk)
    predictor.predict_from_files(args.i, args.o, save_probabilities=args.save_probabilities,
                                 overwrite=not args.continue_prediction, num_processes_preprocessing=args.npp,
                                 num_processes_segmentation_export=args.nps,
                                 folder_with_segs_from_prev_stage=args.prev_stage_predictions)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "predict", help="nnUNetv2_predict plus CASE.json characterization per case",
        description="Runs nnU-Net's prediction with the same options as nnUNetv2_predict and also writes, next to "
                    "each CASE.nii.gz, CASE.json with class probabilities and the predicted class (averaged over "
                    "folds; patch heads weighted by predicted lesion mass), and characterization.csv.")
    p.add_argument("-i", required=True, help="input folder (nnU-Net raw naming: CASE_0000.nii.gz, ...)")
    p.add_argument("-o", required=True, help="output folder")
    p.add_argument("-d", required=True, help="dataset id or name")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("-tr", default="nnUNetTrainerSTDNet", help="trainer (default nnUNetTrainerSTDNet)")
    p.add_argument("-c", required=True, help="configuration, e.g. 3d_fullres")
    p.add_argument("-f", nargs="+", default=["0", "1", "2", "3", "4"], help="folds (default 0 1 2 3 4)")
    p.add_argument("-step_size", type=float, default=0.5, help="sliding window step, fraction of the patch")
    p.add_argument("--disable_tta", action="store_true", help="no mirroring test-time augmentation")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--save_probabilities", action="store_true", help="also export softmax probabilities (npz)")
    p.add_argument("--continue_prediction", action="store_true", help="skip cases already predicted")
    p.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint name")
    p.add_argument("-npp", type=int, default=3, help="preprocessing processes")
    p.add_argument("-nps", type=int, default=3, help="segmentation export processes")
    p.add_argument("-prev_stage_predictions", default=None, help="cascade: previous stage's predictions")
    p.add_argument("-device", default="cuda", choices=["cuda", "cpu", "mps"])
    p.add_argument("--disable_progress_bar", action="store_true")
    p.add_argument("--not_on_device", action="store_true", help="keep results arrays on the CPU")
    p.set_defaults(func=_predict)
