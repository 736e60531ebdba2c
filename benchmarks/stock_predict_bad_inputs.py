"""What stock ``nnUNetv2_predict`` does with bad input, one defect at a time (the README's comparison
with ``nnunet-liver predict``).

    python benchmarks/stock_predict_bad_inputs.py --work /tmp/stock_bad_inputs \
        -o benchmarks/results/bad_inputs/stock_nnunetv2_predict.json

Trains the tiny STD-Net of tests/test_predict_bad_inputs.py (phantom, CPU-demo plans, 3d_fullres,
``nnUNetTrainerSTDNet_tiny``; skipped when ``--work`` already holds it), builds that test's input
folder (two good cases and one case per defect) and runs ``nnUNetv2_predict`` on one folder per
defect: the two good cases plus the defective one, in nnU-Net's (alphabetical) order. Records the
exit status, the files left in the output folder and the error lines. What ``nnunet-liver
predict`` does with the same folders is what tests/test_predict_bad_inputs.py asserts.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import test_predict_bad_inputs as t  # noqa: E402
from nnunet_helpers import BIN, nnunet_env, run, train, write_tiny_phantom_dataset  # noqa: E402

MARKERS = ("Error", "ERROR", "WARNING", "died")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, help="workspace (nnU-Net folders, inputs, outputs)")
    p.add_argument("-o", required=True, help="output JSON")
    args = p.parse_args()
    root = Path(args.work)
    root.mkdir(parents=True, exist_ok=True)
    env = nnunet_env(root)
    model = root / "res" / f"Dataset{t.DATASET_ID}_BadInputs" / f"{t.TRAINER}__{t.PLANS}__3d_fullres"
    if not (model / "fold_0" / "checkpoint_final.pth").is_file():
        write_tiny_phantom_dataset(root, t.DATASET_ID, "BadInputs", n_train=5, n_test=2, seed=4)
        run(["nnUNetv2_extract_fingerprint", "-d", str(t.DATASET_ID), "-np", "1"], env, root)
        run(["nnunet-liver", "plan", "-d", str(t.DATASET_ID), "--preset", "cpu-demo", "--preprocess", "-np", "1"],
            env, root)
        train(t.DATASET_ID, 0, t.TRAINER, t.PLANS, env, root)
    dataset = next((root / "raw").glob(f"Dataset{t.DATASET_ID}_*"))
    every = root / "all_defects"
    if every.exists():
        shutil.rmtree(every)
    t.build_bad_input_folder(dataset, every)
    report = {"nnunetv2": _version(),
              "model": f"{t.TRAINER}__{t.PLANS}__3d_fullres, fold 0", "defects": {}}
    print("| defect | case order | exit status | segmentations written | what nnU-Net said |")
    print("|---|---|---|---|---|")
    for defect in t.DEFECTS:
        folder, out = root / f"in_{defect}", root / f"out_{defect}"
        for d in (folder, out):
            if d.exists():
                shutil.rmtree(d)
        folder.mkdir()
        for f in every.iterdir():
            if f.name.startswith((defect, "good_")):
                shutil.copy(f, folder / f.name)
        cmd = [str(BIN / "nnUNetv2_predict"), "-i", str(folder), "-o", str(out), "-d", str(t.DATASET_ID), "-c",
               "3d_fullres", "-p", t.PLANS, "-tr", t.TRAINER, "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1",
               "--disable_tta", "--disable_progress_bar"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        written = sorted(f.name[:-len(".nii.gz")] for f in out.glob("*.nii.gz")) if out.exists() else []
        said = [line.strip() for line in (proc.stdout + proc.stderr).splitlines() if any(m in line for m in MARKERS)]
        order = sorted({f.name[:-len("_0000.nii.gz")] for f in folder.glob("*_0000.nii.gz")})
        report["defects"][defect] = {"case_order": order, "exit_status": proc.returncode, "written": written,
                                     "messages": said[-6:]}
        print(f"| {defect} | {', '.join(order)} | {proc.returncode} | {', '.join(written) or '-'} | "
              f"{(said[-1] if said else '(nothing)')[:160]} |", flush=True)
    Path(args.o).parent.mkdir(parents=True, exist_ok=True)
    Path(args.o).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.o}")
    return 0


def _version() -> str:
    from importlib.metadata import version

    return version("nnunetv2")


if __name__ == "__main__":
    sys.exit(main())
