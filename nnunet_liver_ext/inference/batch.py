"""Predicting a list of checked cases so that a failure costs one case and never leaves a partial file.

nnU-Net writes each ``CASE.nii.gz`` straight into the output folder from an export worker. When
anything fails in the middle of a run, nnU-Net stops: the cases after it are not predicted, and the
export pool is terminated, possibly in the middle of writing a file; ``--continue_prediction``
would then take that half-written file for a finished case.

Here every output is written into a private staging folder inside the output folder first
(``.nnunet-liver-partial-<pid>@<host>-*``, same file system) and moved into place with ``os.replace``
only once the case's files are complete and its segmentation reads back. The cases go through
nnU-Net's own parallel pipeline (``predict_from_files``) in one run; if that run fails, each case
is predicted again on its own in this process (``CharacterizationPredictor.predict_case_in_process``),
so only the case that fails again is lost, with its error. The staging folder is removed at the end,
also after Ctrl-C; one left by a killed process is removed by the next run on the same machine in the
same folder (another machine's, e.g. another node's ``-part_id`` on a shared file system, is left alone:
its process cannot be looked up from here).

When every case fails inside nnU-Net and none is predicted, the failure is the run's (a CUDA error, a
wrong model), not the cases': nothing in the output folder is touched, where a case-specific failure
removes that case's outputs of an earlier run, which would no longer match.
"""
from __future__ import annotations

import os
import shutil
import socket
import tempfile
import traceback
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from nnunet_liver_ext.inference.inputs import CaseInput, short_error

STAGING_PREFIX = ".nnunet-liver-partial-"
PREDICTION_FAILED = "prediction failed"
# what nnU-Net writes into an output folder besides the cases: kept from the last run
RUN_FILES = ("dataset.json", "plans.json", "predict_from_raw_data_args.json")


def case_output_files(output_folder: str, case: str, file_ending: str) -> List[str]:
    """Every file ``nnunet-liver predict`` may write for one case: segmentation, CASE.json,
    probabilities (.npz) and their properties (.pkl)."""
    stem = os.path.join(output_folder, case)
    return [stem + file_ending, stem + ".json", stem + ".npz", stem + ".pkl"]


def remove_case_outputs(output_folder: str, case: str, file_ending: str) -> List[str]:
    """Deletes the outputs of ``case`` in ``output_folder`` (stale files of an earlier run of a case
    that failed now); returns the paths removed."""
    removed = []
    for path in case_output_files(output_folder, case, file_ending):
        if os.path.isfile(path):
            os.remove(path)
            removed.append(path)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def staging_owner() -> str:
    """``<pid>@<host>``: whose staging folder it is (host without ``-``, which ends the owner in the name)."""
    return f"{os.getpid()}@{socket.gethostname().replace('-', '_')}"


def remove_abandoned_staging(output_folder: str) -> None:
    """Staging folders of this machine's runs whose process is gone (killed: its ``finally`` never ran)."""
    if not os.path.isdir(output_folder):
        return
    here = staging_owner().split("@", 1)[1]
    for name in os.listdir(output_folder):
        if not name.startswith(STAGING_PREFIX):
            continue
        owner = name[len(STAGING_PREFIX):].split("-", 1)[0]
        pid_text, _, host = owner.partition("@")
        if host and host != here:  # another machine's run: its process cannot be looked up from here
            continue
        if pid_text.isdigit() and int(pid_text) != os.getpid() and not _pid_alive(int(pid_text)):
            shutil.rmtree(os.path.join(output_folder, name), ignore_errors=True)


@dataclass
class BatchResult:
    """``predicted``: cases whose files are now in the output folder; ``failed``: case -> why not;
    ``run_failed``: every case failed inside nnU-Net and none was predicted, so the output folder was left as
    it was (earlier outputs of these cases kept)."""
    predicted: List[str] = field(default_factory=list)
    failed: Dict[str, str] = field(default_factory=dict)
    batch_error: Optional[str] = None  # why nnU-Net's parallel run stopped, when it did
    run_failed: bool = False


def _error_text(error: BaseException) -> str:
    where = traceback.extract_tb(error.__traceback__)
    place = f" (in {os.path.basename(where[-1].filename)}:{where[-1].lineno})" if where else ""
    return f"{type(error).__name__}: {short_error(error) if str(error).strip() else ''}{place}"


def _incomplete(staging: str, case: str, file_ending: str, with_json: bool, save_probabilities: bool) -> Optional[str]:
    """Why the staged outputs of ``case`` are not a finished prediction, or None when they are."""
    import SimpleITK as sitk

    stem = os.path.join(staging, case)
    needed = [stem + file_ending] + ([stem + ".json"] if with_json else []) + \
             ([stem + ".npz", stem + ".pkl"] if save_probabilities else [])
    missing = [os.path.basename(p) for p in needed if not os.path.isfile(p)]
    if missing:
        return f"nnU-Net did not write {', '.join(missing)}"
    try:
        sitk.ReadImage(stem + file_ending)
    except RuntimeError as e:
        return f"the segmentation nnU-Net wrote does not read back: {short_error(e)}"
    return None


def _point_at_the_output_folder(args_file: str, staging: str, output_folder: str) -> None:
    """nnU-Net records the output paths it was given, here the staging folder, which is deleted once the cases
    are moved: the record names the output folder instead."""
    import json

    def moved(value):
        if isinstance(value, str) and value.startswith(staging):
            return output_folder + value[len(staging):]
        return [moved(v) for v in value] if isinstance(value, list) else value

    with open(args_file, encoding="utf-8") as f:
        recorded = json.load(f)
    with open(args_file, "w", encoding="utf-8") as f:
        json.dump({key: moved(value) for key, value in recorded.items()}, f, sort_keys=True, indent=4)


def predict_cases(predictor, cases: Sequence[CaseInput], output_folder: str, save_probabilities: bool = False,
                  num_processes_preprocessing: int = 1, num_processes_segmentation_export: int = 1,
                  parallel: bool = True, prev_stage_folder: Optional[str] = None) -> BatchResult:
    """Predicts ``cases`` (already checked) into ``output_folder`` with an initialised
    ``CharacterizationPredictor``. ``parallel``: nnU-Net's worker pipeline first (what
    ``nnUNetv2_predict`` does), then one case at a time for the cases it did not finish; False:
    one case at a time from the start (no worker processes to spawn: cheaper for a few small cases)."""
    ending = predictor.dataset_json["file_ending"]
    with_json = bool(predictor.case_heads)
    os.makedirs(output_folder, exist_ok=True)
    remove_abandoned_staging(output_folder)
    staging = tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{staging_owner()}-", dir=output_folder)
    result = BatchResult()
    try:
        todo = list(cases)
        if parallel and todo:
            try:
                predictor.predict_from_files([c.files for c in todo], [os.path.join(staging, c.case) for c in todo],
                                             save_probabilities=save_probabilities, overwrite=True,
                                             num_processes_preprocessing=num_processes_preprocessing,
                                             num_processes_segmentation_export=num_processes_segmentation_export,
                                             folder_with_segs_from_prev_stage=prev_stage_folder)
            except Exception as e:  # noqa: BLE001 - any failure: retry case by case below
                result.batch_error = _error_text(e)
                print(f"\nnnU-Net's run over {len(todo)} cases stopped ({result.batch_error}); predicting the "
                      f"cases one at a time so that only a failing case is lost")
                for c in todo:
                    remove_case_outputs(staging, c.case, ending)
            else:
                todo = [c for c in todo if _incomplete(staging, c.case, ending, with_json, save_probabilities)]
        if not parallel or result.batch_error is not None:
            for c in todo:
                ofile = os.path.join(staging, c.case)
                previous = os.path.join(prev_stage_folder, c.case + ending) if prev_stage_folder else None
                try:
                    predictor.predict_case_in_process(c.files, ofile, save_probabilities, previous)
                except Exception as e:  # noqa: BLE001 - the error is this case's, reported with it
                    result.failed[c.case] = f"{PREDICTION_FAILED}: {_error_text(e)}"
                    remove_case_outputs(staging, c.case, ending)
        for c in cases:
            if c.case in result.failed:
                continue
            why = _incomplete(staging, c.case, ending, with_json, save_probabilities)
            if why is not None:
                result.failed[c.case] = why
                continue
            for staged, final in zip(case_output_files(staging, c.case, ending),
                                     case_output_files(output_folder, c.case, ending)):
                if os.path.isfile(staged):
                    os.replace(staged, final)
                elif os.path.isfile(final):  # e.g. an old .npz when this run saves no probabilities
                    os.remove(final)
            result.predicted.append(c.case)
        result.run_failed = bool(cases) and not result.predicted and \
            any(why.startswith(PREDICTION_FAILED) for why in result.failed.values())
        for name in RUN_FILES if not result.run_failed else ():
            if os.path.isfile(os.path.join(staging, name)):
                if name == "predict_from_raw_data_args.json":
                    _point_at_the_output_folder(os.path.join(staging, name), staging, output_folder)
                os.replace(os.path.join(staging, name), os.path.join(output_folder, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not result.run_failed:
        for case in result.failed:
            remove_case_outputs(output_folder, case, ending)
    return result
