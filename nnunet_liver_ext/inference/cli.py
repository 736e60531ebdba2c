"""``nnunet-liver predict``: ``nnUNetv2_predict`` plus per-case characterization.

Same options as ``nnUNetv2_predict`` (-i -o -d -c -p -tr -f -chk -step_size --disable_tta
-num_parts -part_id ...);
segmentations are nnU-Net's own, and next to each ``CASE.nii.gz`` comes ``CASE.json`` (class
probabilities and predicted class, the enhancement curve where the method has one), plus
``characterization.csv`` for the folder. Folds are averaged like the segmentation.

What it adds to ``nnUNetv2_predict`` for bad input (``inference/inputs.py`` lists what nnU-Net does
with each defect): every case is checked before nnU-Net sees it; a case with a missing or extra
channel file, an unreadable file, phases on different grids or NaN/inf voxels is reported with
its file and left out, its stale outputs of an earlier run deleted, and the other cases are
predicted. Outputs are staged and moved into ``-o`` whole (``inference/batch.py``), so a failure
inside nnU-Net costs that case alone and leaves no partial file. Exit status 1 when any case was
not predicted, with the list of those cases.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from nnunet_liver_ext.training.plans import trained_case_heads


def _check_model(args: argparse.Namespace) -> tuple[str, list]:
    """The model folder and the folds to load, or a UserError saying what is missing and how to get it.
    Reads folders only, so a mistake is reported before torch is imported."""
    from nnunet_liver_ext.errors import UserError, dataset_id, env_folder, resolve_dataset

    if args.npp < 1 or args.nps < 1:
        raise UserError("nnunet-liver predict needs -npp >= 1 and -nps >= 1 (nnU-Net's sequential mode bypasses "
                        "the per-case hook that writes CASE.json)", "-npp 1 -nps 1")
    if not 0 < args.step_size <= 1:  # nnU-Net asserts it inside every case's sliding window
        raise UserError(f"-step_size {args.step_size}: the sliding window's step is a fraction of the patch, in "
                        f"(0, 1]", "-step_size 0.5 (nnU-Net's default)")
    if args.num_parts < 1 or not 0 <= args.part_id < args.num_parts:
        raise UserError(f"-num_parts {args.num_parts} -part_id {args.part_id}: the parts are numbered 0 to "
                        f"num_parts - 1", "e.g. two GPUs: -num_parts 2, and -part_id 0 on one, -part_id 1 on the other")
    if not os.path.isdir(args.i):
        raise UserError(f"input folder {args.i} does not exist",
                        "-i needs a folder of CASE_0000.nii.gz, ... files, e.g. $nnUNet_raw/DatasetXXX_Name/imagesTs")
    if os.path.exists(args.o) and not os.path.isdir(args.o):
        raise UserError(f"-o {args.o} is a file, not a folder: the predictions are written into a folder",
                        "give -o a new folder, or an existing folder of earlier predictions")
    dataset_name = resolve_dataset(args.d)
    did = dataset_id(dataset_name)
    results = env_folder("nnUNet_results", "where nnUNetv2_train wrote the trained models")
    model_name = f"{args.tr}__{args.p}__{args.c}"
    model_folder = results / dataset_name / model_name
    if not model_folder.is_dir():
        raise _no_model_error(args, dataset_name, did, results / dataset_name, model_name)
    folds = []
    for f in args.f:
        if f != "all":
            try:
                f = int(f)
            except ValueError:
                raise UserError(f"-f {f}: a fold is a number (0-4) or 'all'", "-f 0 1 2 3 4") from None
        folds.append(f)
    missing = [f for f in folds if not (model_folder / f"fold_{f}" / args.chk).is_file()]
    if missing:
        trained = sorted(d.name[len("fold_"):] for d in model_folder.glob("fold_*") if (d / args.chk).is_file())
        unfinished = sorted(f for f in missing if (model_folder / f"fold_{f}" / "checkpoint_latest.pth").is_file())
        what = (f"fold {', '.join(map(str, missing))} of {dataset_name}/{model_name} "
                f"{'is' if len(missing) == 1 else 'are'} not trained (no fold_k/{args.chk})")
        if unfinished:
            what += f"; fold {', '.join(map(str, unfinished))} stopped before the end (checkpoint_latest.pth only)"
        train = f"nnUNetv2_train {did} {args.c} FOLD -tr {args.tr} -p {args.p}" + (" --c" if unfinished else "")
        if trained:
            fix = f"predict with the trained fold(s): -f {' '.join(trained)}   (or train the others: {train})"
        else:
            fix = f"no fold has {args.chk} yet; train one: {train}"
        if unfinished and len(unfinished) == len(missing):
            fix += "; or predict with the unfinished model as it stands: -chk checkpoint_latest.pth"
        raise UserError(what, fix)
    previous = _previous_stage(_read_plans(model_folder), args.c)
    if previous is None and args.prev_stage_predictions is not None:
        raise UserError(f"-prev_stage_predictions {args.prev_stage_predictions}: {args.c} is no stage of nnU-Net's "
                        f"cascade (it has no previous_stage in {model_folder / 'plans.json'}), so it takes no "
                        f"previous segmentation; nnU-Net would add it to the input and fail on every case",
                        "drop -prev_stage_predictions (it is for 3d_cascade_fullres)")
    if previous is not None and args.prev_stage_predictions is None:
        raise UserError(f"{args.c} is a stage of nnU-Net's cascade: it predicts from the {previous} stage's "
                        f"segmentation of every case, and no -prev_stage_predictions folder was given",
                        f"nnunet-liver predict -i {args.i} -o FOLDER -d {args.d} -c {previous} -tr {args.tr} "
                        f"-p {args.p} first, then this command with -prev_stage_predictions FOLDER")
    return str(model_folder), folds


def _read_plans(model_folder) -> dict:
    """The model's plans.json; empty when it cannot be read (nnU-Net reports that when it loads the model).
    Read as JSON rather than through nnU-Net's PlansManager, whose import loads torch (about 2.5 s):
    ``_check_model`` reports a mistake before that."""
    import json

    try:
        return json.loads((Path(model_folder) / "plans.json").read_text())
    except (OSError, ValueError):
        return {}


def _previous_stage(plans: dict, configuration: str):
    """The ``previous_stage`` of ``configuration`` in a model's plans (following ``inherits_from`` as nnU-Net
    does), or None."""
    configurations = plans.get("configurations", {})
    seen = set()
    while configuration in configurations and configuration not in seen:
        seen.add(configuration)
        if configurations[configuration].get("previous_stage"):
            return configurations[configuration]["previous_stage"]
        configuration = configurations[configuration].get("inherits_from")
    return None


def _no_model_error(args, dataset_name: str, did: int, dataset_results, model_name: str):
    from nnunet_liver_ext.errors import UserError

    trained = sorted(d.name for d in dataset_results.glob("*__*__*") if d.is_dir()) if dataset_results.is_dir() else []
    same_trainer = [t for t in trained if t.startswith(f"{args.tr}__")]
    if same_trainer:
        plans, config = same_trainer[0].split("__")[1:3]
        return UserError(f"{args.tr} has no model with plans {args.p} and configuration {args.c} for {dataset_name}; "
                         f"it was trained as {', '.join(same_trainer)}", f"-p {plans} -c {config}")
    from nnunet_liver_ext.catalogue import closest_trainers, is_nnunet_trainer, trainer_names

    trained_trainers = tuple(sorted({t.split("__")[0] for t in trained}))
    if args.tr not in trainer_names() and not is_nnunet_trainer(args.tr):
        close = closest_trainers(args.tr, extra=trained_trainers)
        return UserError(f"no trainer named {args.tr} (in this package or in nnU-Net)",
                         f"did you mean {', '.join(close)}?" if close else "`nnunet-liver trainers` lists them")
    where = f"trained for {dataset_name}: {', '.join(trained)}" if trained else f"nothing is trained for {dataset_name}"
    return UserError(f"{args.tr} is not trained for {dataset_name} with plans {args.p}, configuration {args.c} "
                     f"({where})", f"nnUNetv2_train {did} {args.c} FOLD -tr {args.tr} -p {args.p}")


def _cases_to_predict(args: argparse.Namespace, dataset_json: dict, writes_case_json: bool):
    """The input check (no torch): ``(check, skipped)`` where ``skipped`` are the cases left alone
    because ``--continue_prediction`` found their output (with its CASE.json when the model writes one).
    Bad cases are reported here, and their stale outputs from an earlier run are deleted."""
    import sys

    from nnunet_liver_ext.errors import UserError
    from nnunet_liver_ext.inference.batch import remove_case_outputs
    from nnunet_liver_ext.inference.inputs import check_input_folder, group_channel_files

    ending = dataset_json["file_ending"]
    grouped, stray = group_channel_files(args.i, ending)
    if not grouped:
        found = f" ({len(stray)} without the _0000 channel suffix)" if stray else ""
        raise UserError(f"no image files of nnU-Net's form CASE_0000{ending} in {args.i}{found}",
                        "-i needs a folder of CASE_0000.nii.gz, ... files, e.g. $nnUNet_raw/DatasetXXX_Name/imagesTs")
    cases = sorted(grouped)
    if args.num_parts > 1:  # nnU-Net's split: the sorted cases, every num_parts-th from part_id
        part = cases[args.part_id::args.num_parts]
        print(f"part {args.part_id} of {args.num_parts}: {len(part)} of the {len(cases)} cases in {args.i}")
        cases = part
    skipped = []
    if args.continue_prediction:
        def done(case):
            stem = os.path.join(args.o, case)
            return os.path.isfile(stem + ending) and (not args.save_probabilities or os.path.isfile(stem + ".npz")) \
                and (not writes_case_json or os.path.isfile(stem + ".json"))
        skipped = [c for c in cases if done(c)]
        cases = [c for c in cases if c not in skipped]
        if skipped:
            print(f"--continue_prediction: {len(skipped)} case(s) already predicted in {args.o}, not checked again")
    check = check_input_folder(args.i, dataset_json, cases=cases, prev_stage_folder=args.prev_stage_predictions)
    for path in check.stray_files:
        print(f"warning: {path} is not named CASE_XXXX{ending} (nnU-Net's channel suffix); not predicted",
              file=sys.stderr)
    for case in check.bad:
        for problem in case.problems:
            print(f"nnunet-liver predict: input error: {problem}", file=sys.stderr)
        for path in remove_case_outputs(args.o, case.case, ending):
            print(f"  removed {path} (an earlier prediction of {case.case}: it would not match this input)",
                  file=sys.stderr)
    if check.bad:
        print(f"{len(check.bad)} of {len(check.cases)} case(s) fail the input check and are left out; "
              f"predicting the other {len(check.good)}", file=sys.stderr)
    return check, skipped


def _predict(args: argparse.Namespace) -> int:
    import json

    model_folder, folds = _check_model(args)
    if args.device == "cuda":  # before reading any image: a wrong device is the whole run's mistake
        import torch

        if not torch.cuda.is_available():
            from nnunet_liver_ext.errors import UserError

            raise UserError("-device cuda (the default), but torch finds no CUDA GPU on this machine", "-device cpu")
    dataset_json_path = os.path.join(model_folder, "dataset.json")
    if not os.path.isfile(dataset_json_path):
        from nnunet_liver_ext.errors import UserError

        raise UserError(f"{model_folder} has no dataset.json (nnUNetv2_train writes it there): not a complete "
                        f"nnU-Net model folder", "train the model again, or copy the dataset's dataset.json there")
    with open(dataset_json_path) as f:
        dataset_json = json.load(f)
    os.makedirs(args.o, exist_ok=True)
    check, skipped = _cases_to_predict(args, dataset_json, bool(trained_case_heads(_read_plans(model_folder))))
    failed = {c.case: "; ".join(f"{os.path.basename(p.path)} {p.message.split(';')[0]}" for p in c.problems)
              for c in check.bad}
    predicted, written, run_failure = [], [], None
    if check.good:
        result, written = _run_predictor(args, model_folder, folds, check.good)
        if result.run_failed:  # the run's fault: these cases keep their earlier files and rows
            run_failure = result
        else:
            failed.update(result.failed)
            predicted = result.predicted
    # the folder's table: this run's cases replace their rows, failed cases lose theirs, and so do cases this
    # model predicted without a CASE.json (an earlier model's row would describe a replaced segmentation);
    # others stay (characterization.CSV_NAME; that module imports torch, not needed when nothing was predicted)
    results = [r for r in written if r.case in predicted]
    drop = list(failed) + sorted(set(predicted) - {r.case for r in results})
    if results or (drop and os.path.isfile(os.path.join(args.o, "characterization.csv"))):
        from nnunet_liver_ext.inference.characterization import CSV_NAME, write_characterization_csv

        write_characterization_csv(os.path.join(args.o, CSV_NAME), results, drop=drop)
    if run_failure is not None:
        _run_failure(args, run_failure, check.bad)
    if failed:
        from nnunet_liver_ext.errors import UserError

        total = len(check.cases)
        lines = "\n".join(f"  {case}: {why}" for case, why in sorted(failed.items()))
        raise UserError(f"{len(failed)} of {total} case(s) were not predicted (the other {total - len(failed)} are in "
                        f"{args.o}; nothing is left there for the failed ones):\n{lines}",
                        "fix these cases' files (the messages above name each file) and rerun with "
                        "--continue_prediction to predict only them")
    print(f"\nnnunet-liver predict: {len(predicted)} case(s) predicted into {args.o}"
          + (f", {len(skipped)} already there" if skipped else ""))
    return 0


def _run_failure(args: argparse.Namespace, result, bad_inputs) -> None:
    """Every checked case failed inside nnU-Net: the run's failure, reported as one; the outputs of these
    cases in -o (an earlier run's) and their table rows are left as they were."""
    from nnunet_liver_ext.errors import UserError

    errors = sorted(set(result.failed.values()))
    shown = "\n".join(f"  {why}" for why in errors[:3])
    if len(errors) > 3:
        shown += f"\n  ... ({len(errors) - 3} more)"
    left_out = f"; {len(bad_inputs)} more failed the input check (above)" if bad_inputs else ""
    raise UserError(f"nnU-Net failed on every one of the {len(result.failed)} checked case(s), so the fault is the "
                    f"run's (model, device, options), not a case's; nothing was written to {args.o} and its earlier "
                    f"files were left as they were{left_out}:\n{shown}",
                    "fix the cause named above and rerun; --verbose shows nnU-Net's own output")


def _run_predictor(args: argparse.Namespace, model_folder: str, folds: list, cases):
    """Loads the model and predicts the checked cases; ``(BatchResult, the CaseCharacterization of
    every CASE.json written; empty when the model has no case-level heads)``."""
    import torch

    from nnunet_liver_ext.inference.batch import predict_cases
    from nnunet_liver_ext.inference.characterization import CharacterizationPredictor
    from nnunet_liver_ext.paths import TRAINERS_DIR, points_at_our_trainers

    # the predictor rebuilds the network through the trainer class, which nnU-Net finds here
    if not points_at_our_trainers():
        current = os.environ.get("nnUNet_extTrainer")
        os.environ["nnUNet_extTrainer"] = f"{current}{os.pathsep}{TRAINERS_DIR}" if current else str(TRAINERS_DIR)
    if args.device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    elif args.device == "cuda":
        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
    predictor = CharacterizationPredictor(tile_step_size=args.step_size, use_gaussian=True,
                                          use_mirroring=not args.disable_tta,
                                          perform_everything_on_device=not args.not_on_device,
                                          device=torch.device(args.device), verbose=args.verbose,
                                          verbose_preprocessing=args.verbose,
                                          allow_tqdm=not args.disable_progress_bar)
    predictor.initialize_from_trained_model_folder(model_folder, folds, checkpoint_name=args.chk)
    result = predict_cases(predictor, cases, args.o, save_probabilities=args.save_probabilities,
                           num_processes_preprocessing=args.npp, num_processes_segmentation_export=args.nps,
                           prev_stage_folder=args.prev_stage_predictions)
    return result, predictor.written_results


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "predict", help="nnUNetv2_predict plus CASE.json characterization per case",
        description="Runs nnU-Net's prediction with the same options as nnUNetv2_predict and also writes, next to "
                    "each CASE.nii.gz, CASE.json with class probabilities and the predicted class (averaged over "
                    "folds; patch heads weighted by predicted lesion mass), and characterization.csv. Every case "
                    "is checked first (missing or extra channel files, unreadable files, phases on different "
                    "grids, NaN/inf voxels): a bad case is reported with its file and left out, the others are "
                    "predicted, and the exit status is 1 when any case was not predicted. No partial output "
                    "file is ever left in -o.")
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
    p.add_argument("-num_parts", type=int, default=1,
                   help="number of nnunet-liver predict calls sharing the cases (one per GPU, each with its own "
                        "CUDA_VISIBLE_DEVICES); default 1: this call predicts every case")
    p.add_argument("-part_id", type=int, default=0,
                   help="which of the -num_parts calls this is, 0 to num_parts - 1; the calls may run at the same "
                        "time into the same -o")
    p.set_defaults(func=_predict)
