"""``nnunet-liver plan``: our planners through nnU-Net's planning API."""
from __future__ import annotations

import argparse
import functools
import math

#: the presets of this package's networks (trainer_plans.planners.PRESETS), in README order
NETWORK_PRESETS = ("stdnet", "dyntransnet", "mamba-codebook", "mti-net")
#: the configuration names nnU-Net's planners write
NNUNET_CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres")


def _check_inputs(args: argparse.Namespace) -> int:
    """The dataset id, once the raw dataset and nnU-Net's fingerprint are where planning reads them;
    otherwise a UserError with the command that makes them."""
    from nnunet_liver_ext.errors import UserError, dataset_id, env_folder, resolve_dataset

    dataset_name = resolve_dataset(args.d)
    did = dataset_id(dataset_name)
    raw = env_folder("nnUNet_raw", "planning reads the raw dataset's dataset.json")
    if not (raw / dataset_name / "dataset.json").is_file():
        raise UserError(f"no raw dataset {raw / dataset_name} (with dataset.json): planning reads it",
                        f"convert or generate it first (nnunet-liver convert ... -d {did}, or nnunet-liver phantom "
                        f"nnunet-raw -d {did} ...), or point nnUNet_raw at the folder that holds {dataset_name}")
    preprocessed = env_folder("nnUNet_preprocessed", "where the fingerprint and the plans go")
    if not (preprocessed / dataset_name / "dataset_fingerprint.json").is_file():
        raise UserError(f"{dataset_name} has no fingerprint yet ({preprocessed / dataset_name}/"
                        f"dataset_fingerprint.json)",
                        f"nnUNetv2_extract_fingerprint -d {did}   (or nnUNetv2_plan_and_preprocess -d {did} "
                        f"-c 3d_fullres --verify_dataset_integrity)")
    return did


def _data_identifier(plans: dict, plans_name: str, configuration: str) -> str:
    if configuration not in plans["configurations"]:
        return f"{plans_name}_{configuration}"
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    # through nnU-Net's inheritance: 3d_cascade_fullres reads 3d_fullres' data
    return PlansManager(plans).get_configuration(configuration).data_identifier


#: what decides a configuration's preprocessed data (nnU-Net's DefaultPreprocessor reads these and nothing else of
#: the configuration; the plans' transpose_forward too)
_PREPROCESSING_KEYS = ("spacing", "normalization_schemes", "use_mask_for_norm", "preprocessor_name",
                       "resampling_fn_data", "resampling_fn_data_kwargs", "resampling_fn_seg",
                       "resampling_fn_seg_kwargs")


def _data_folder_complete(folder, dataset_name: str) -> bool:
    """Whether ``folder`` holds every training case of the raw dataset (nnU-Net writes a case's .pkl after its
    arrays, so a .pkl is a finished case); an interrupted preprocessing leaves some out."""
    import json

    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    from nnunet_liver_ext.errors import env_folder

    raw = env_folder("nnUNet_raw") / dataset_name
    cases = get_filenames_of_train_images_and_targets(str(raw), json.loads((raw / "dataset.json").read_text()))
    return bool(cases) and all((folder / f"{case}.pkl").is_file() for case in cases)


def _check_shared_data(plans: dict, plans_name: str, configuration: str, folder) -> None:
    """A UserError when another plans file of the dataset writes the same data folder with other preprocessing
    (nnU-Net's plans made with -overwrite_target_spacing but no plans name of their own write nnUNetPlans_3d_fullres
    at their spacing): these plans would train on data they do not describe, or preprocessing them would rewrite
    the other plans' data."""
    import json

    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_liver_ext.errors import UserError

    mine = PlansManager(plans).get_configuration(configuration).configuration
    identifier = _data_identifier(plans, plans_name, configuration)
    for other_file in sorted(folder.glob("*.json")):
        if other_file.stem == plans_name:
            continue
        try:
            other_plans = json.loads(other_file.read_text())
            other = PlansManager(other_plans).get_configuration(configuration)
        except Exception:  # dataset.json, the fingerprint, plans without this configuration
            continue
        if other.data_identifier != identifier:
            continue
        differ = [k for k in _PREPROCESSING_KEYS if other.configuration.get(k) != mine.get(k)]
        if other_plans.get("transpose_forward") != plans.get("transpose_forward"):
            differ.append("transpose_forward")
        if differ:
            details = "; ".join(f"{k}: {other.configuration.get(k, other_plans.get(k))} there, "
                                f"{mine.get(k, plans.get(k))} here" for k in differ)
            raise UserError(f"{plans_name} {configuration} reads the preprocessed data in {folder / identifier}, "
                            f"which {other_file.name} writes with other preprocessing ({details})",
                            f"plan nnU-Net's own plans under another name (nnUNetv2_plan_experiment ... "
                            f"-overwrite_plans_name NAME) so that {other_file.stem} no longer claims {identifier}, "
                            f"then preprocess its data again")


def _plan(args: argparse.Namespace) -> int:
    from nnunet_liver_ext.errors import UserError, env_folder

    if len(args.preset) > 1 and args.overwrite_plans_name:
        raise UserError("--overwrite-plans-name names one plans file, but several presets were given",
                        "plan one preset at a time with --overwrite-plans-name, or leave it out")
    if args.trainer and (len(args.preset) > 1 or args.preset[0] not in NETWORK_PRESETS):
        raise UserError(f"--trainer picks the variant of one network's planner; got presets {args.preset}",
                        f"nnunet-liver plan -d {args.d} --preset {NETWORK_PRESETS[0]} --trainer {args.trainer}")
    if args.resenc and any(p not in NETWORK_PRESETS for p in args.preset):
        others = [p for p in args.preset if p not in NETWORK_PRESETS]
        raise UserError(f"--resenc plans this package's networks on nnU-Net's residual-encoder presets; {others} "
                        f"are no network presets",
                        f"for stock nnU-Net's own: nnUNetv2_plan_experiment -d {args.d} -pl nnUNetPlannerResEnc"
                        f"{args.resenc}; for a network: nnunet-liver plan -d {args.d} --preset {NETWORK_PRESETS[0]} "
                        f"--resenc {args.resenc}")

    target = args.gpu_memory_target
    if target is not None and not (math.isfinite(target) and target > 0):
        raise UserError(f"--gpu-memory-target {target:g}: the VRAM target must be a positive number of GB",
                        "e.g. --gpu-memory-target 8 (nnU-Net's default), 24 or 40")
    if args.np < 1:
        raise UserError(f"-np {args.np}: preprocessing needs at least one process", "e.g. -np 2")
    unknown = [c for c in args.c or () if c not in NNUNET_CONFIGURATIONS]
    if unknown:
        raise UserError(f"-c {' '.join(unknown)}: nnU-Net's configurations are {', '.join(NNUNET_CONFIGURATIONS)}",
                        "e.g. -c 3d_fullres, or leave -c out for the configurations these plans train")

    dataset_id = _check_inputs(args)
    from nnunetv2.experiment_planning.plan_and_preprocess_api import plan_experiment_dataset, preprocess_dataset

    from nnunet_liver_ext.trainer_plans.planners import PRESETS, network_planner

    preprocessed = set()  # data identifiers preprocessed in this run (the network plans share nnU-Net's)
    for preset in args.preset:
        planner = network_planner(PRESETS[preset], args.resenc) if args.resenc else PRESETS[preset]
        if args.trainer:
            planner = functools.partial(planner, trainer=args.trainer)
        plans, plans_name = plan_experiment_dataset(dataset_id, planner, gpu_memory_target_in_gb=args.gpu_memory_target,
                                                    overwrite_plans_name=args.overwrite_plans_name)
        for name, configuration in plans["configurations"].items():
            estimate = configuration.get("vram_estimate")
            if estimate:
                print(f"{plans_name} {name}: patch {configuration['patch_size']}, batch {configuration['batch_size']}; "
                      f"{estimate['trainer']} estimated at {estimate['predicted_gb']:.2f} GB for a "
                      f"{estimate['gpu_memory_target_gb']:g} GB target (nnU-Net's U-Net at this patch and batch: "
                      f"{estimate['plain_unet_predicted_gb']:.2f} GB)")
        trainer = args.trainer or getattr(PRESETS[preset], "trainer_name", None) or "TRAINER"
        # a 2d dataset's plans have no 3d configuration
        main = "3d_fullres" if "3d_fullres" in plans["configurations"] else "2d"
        print(f"Wrote plans '{plans_name}' for dataset {dataset_id}. Train with: "
              f"nnUNetv2_train {dataset_id} {main} FOLD -tr {trainer} -p {plans_name}")
        cascade = "3d_lowres" in plans["configurations"]
        if cascade:  # nnU-Net plans one where the full-resolution patch sees little of the median image
            print(f"These plans also have nnU-Net's cascade: nnUNetv2_train {dataset_id} 3d_lowres FOLD -tr {trainer} "
                  f"-p {plans_name} for all five folds (their validation writes the next stage's input), then "
                  f"nnUNetv2_train {dataset_id} 3d_cascade_fullres FOLD -tr {trainer} -p {plans_name}")
        trained = [main] + (["3d_lowres"] if cascade else [])  # 3d_cascade_fullres reads 3d_fullres' data
        absent = [c for c in args.c or () if c not in plans["configurations"]]
        if absent:  # nnU-Net's preprocessing would print "not found ... Skipping" and succeed with nothing done
            raise UserError(f"-c {' '.join(absent)}: {plans_name} has no such configuration (it has "
                            f"{', '.join(plans['configurations'])}; 3d_lowres only where nnU-Net plans a cascade)",
                            f"-c {' '.join(trained)}")
        folder = env_folder("nnUNet_preprocessed") / plans["dataset_name"]
        asked = args.c or trained
        data = {c: folder / _data_identifier(plans, plans_name, c) for c in {*asked, *trained}}
        for c in asked:
            _check_shared_data(plans, plans_name, c, folder)
        if args.preprocess:
            wanted = [c for c in asked if data[c].name not in preprocessed]
            # nnU-Net's preprocessing deletes the data folder first: the folder these plans share with nnU-Net's own
            # (and every other network's) is left alone when complete: a stock training may be reading it
            reused = [c for c in wanted
                      if data[c].name != f"{plans_name}_{c}" and _data_folder_complete(data[c], plans["dataset_name"])]
            for c in reused:
                print(f"{c} reads the preprocessed data in {data[c]}, which nnU-Net's plans share and which is already "
                      f"complete: not preprocessed again")
            configurations = [c for c in wanted if c not in reused]
            if configurations:
                preprocess_dataset(dataset_id, plans_name, configurations, [args.np] * len(configurations))
            preprocessed.update(data[c].name for c in wanted)
        else:
            _print_preprocessing_hint(dataset_id, plans, plans_name, {c: data[c] for c in trained})
    return 0


def _print_preprocessing_hint(dataset_id: int, plans: dict, plans_name: str, data: dict) -> None:
    """The nnUNetv2_preprocess command for the configurations (``{configuration: its data folder}``) whose data
    folder is not complete yet; a network planner's 2d and 3d_fullres read nnU-Net's own preprocessed data, which
    LiTS-size datasets take long to make again."""
    configurations = list(data)
    present = [c for c in configurations if _data_folder_complete(data[c], plans["dataset_name"])]
    for c in present:
        print(f"{c} reads the preprocessed data in {data[c]}, which is already there: nothing to preprocess for it")
    missing = [c for c in configurations if c not in present]
    if missing:
        print(f"Preprocess with: nnUNetv2_preprocess -d {dataset_id} -plans_name {plans_name} -c {' '.join(missing)}")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "plan", help="plan a dataset with one of our planners (nnU-Net's planning API)",
        description="Runs nnU-Net's experiment planning with one of this package's planners and writes ordinary "
                    "nnU-Net plans (use them with -p). The dataset needs nnU-Net's fingerprint first "
                    "(nnUNetv2_plan_and_preprocess or nnUNetv2_extract_fingerprint).")
    p.add_argument("-d", required=True, help="dataset id or name")
    p.add_argument("--preset", nargs="+", default=["cpu-demo"], choices=["cpu-demo", "default", *NETWORK_PRESETS],
                   metavar="PRESET",
                   help="one or more of: cpu-demo (8 base features, at most 64 in 3d and 128 in 2d, one conv per "
                        "stage, for 2-core CPUs; plans nnUNetPlans_CPUDemo), default (nnU-Net's ExperimentPlanner), and one VRAM-aware planner per "
                        "network: stdnet, dyntransnet, mamba-codebook, mti-net (patch and batch from the network's "
                        "own memory estimate; plans nnUNetPlans_STDNet, nnUNetPlans_DynTransNet, "
                        "nnUNetPlans_MambaCodebook, nnUNetPlans_MTINet)")
    p.add_argument("--trainer", default=None,
                   help="with one network preset: plan for this variant of the method (e.g. "
                        "nnUNetTrainerSTDNet_noWeightSharing) instead of its main trainer")
    p.add_argument("--resenc", choices=["M", "L", "XL"], default=None,
                   help="with network presets: plan the network on nnU-Net's residual-encoder preset of this size "
                        "(nnUNetPlannerResEncM/L/XL: ResidualEncoderUNet topology, their reference values and VRAM "
                        "targets 8/24/40 GB); plans nnUNetResEncUNet<size>Plans_<Net>")
    p.add_argument("--gpu-memory-target", type=float, default=None,
                   help="VRAM target in GB (default: the planner's own, 8; with --resenc 8, 24 or 40)")
    p.add_argument("--overwrite-plans-name", default=None, help="name of the plans file to write")
    p.add_argument("--preprocess", action="store_true", help="also run nnU-Net's preprocessing for these plans")
    p.add_argument("-c", nargs="+", default=None,
                   help="configurations to preprocess (default: 3d_fullres, or 2d for a 2d dataset, and 3d_lowres "
                        "where the plans have nnU-Net's cascade)")
    p.add_argument("-np", type=int, default=2, help="processes for preprocessing")
    p.set_defaults(func=_plan)
