"""`nnunet-liver phantom ...`: generate synthetic cases into nnU-Net raw or a source layout."""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from nnunet_liver_ext.errors import UserError

LAYOUTS = {
    "lits": "LiTS download layout (volume-i.nii / segmentation-i.nii, portal venous CT)",
    "msd": "Medical Segmentation Decathlon Task03_Liver layout (portal venous CT)",
    "atlas": "ATLAS 2023 layout (train/imagesTr/im{i}.nii.gz, portal venous MRI)",
    "tcga-dicom": "TCGA-LIHC style multiphase CT DICOM, masks, classes.csv",
    "dynamic-mri": "4-phase dynamic MRI NIfTI, masks, labels.csv with curves",
}


def _generation_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("generation")
    g.add_argument("-n", "--num-cases", type=int, default=20, help="number of (training) cases [20]")
    g.add_argument("--modality", choices=("CT", "MRI"), default=None,
                   help="CT or MRI [CT; MRI for atlas and dynamic-mri]")
    g.add_argument("--phases", nargs="+", default=None, metavar="PHASE",
                   help="phases in acquisition order; CT: pre_contrast arterial portal_venous delayed "
                        "[arterial portal_venous delayed]; MRI: pre arterial portal_venous delay [all four]")
    g.add_argument("--shape", nargs=3, type=int, default=(64, 192, 192), metavar=("Z", "Y", "X"),
                   help="voxel grid (z, y, x) [64 192 192]")
    g.add_argument("--seed", type=int, default=0, help="random seed; same seed and arguments give "
                                                     "identical cases [0]")
    g.add_argument("--prefix", default="phantom", help="case id prefix: PREFIX_000 ... [phantom]")
    g.add_argument("--classes", nargs="+", default=None, metavar="CLASS",
                   help="lesion classes to draw from [HCC hemangioma metastasis cyst]")
    g.add_argument("--lesions", nargs=2, type=int, default=(0, 4), metavar=("MIN", "MAX"),
                   help="lesions per case [0 4]; with MIN 0, 15%% of cases have none")
    g.add_argument("--lesion-size", nargs=2, type=float, default=(6.0, 60.0), metavar=("MIN", "MAX"),
                   help="lesion diameter range in mm, clamped to what the liver holds [6 60]")
    g.add_argument("--contrast", type=float, default=1.0,
                   help="scale of lesion-to-liver contrast (lower is harder) [1.0]")
    g.add_argument("--low-contrast-fraction", type=float, default=0.2,
                   help="share of lesions drawn at 35-55%% contrast [0.2]")
    g.add_argument("--noise", type=float, default=None,
                   help="noise sigma: HU for CT [12], fraction of liver signal for MRI [0.04]")
    g.add_argument("--blur", type=float, default=0.7, help="partial-volume blur sigma in mm [0.7]")
    g.add_argument("--motion-mm", type=float, default=3.0, help="max rigid shift per phase in mm [3]")
    g.add_argument("--motion-deg", type=float, default=2.0, help="max rotation per axis in degrees [2]")
    g.add_argument("--inplane-spacing", nargs=2, type=float, default=(0.6, 1.0), metavar=("MIN", "MAX"),
                   help="in-plane spacing range in mm [0.6 1.0]")
    g.add_argument("--slice-spacing", nargs=2, type=float, default=(1.5, 5.0), metavar=("MIN", "MAX"),
                   help="slice spacing range in mm [1.5 5.0]")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _config(args):
    from nnunet_liver_ext.phantom.config import LESION_CLASSES, PhantomConfig

    return PhantomConfig(
        modality=args.modality or "CT", phases=tuple(args.phases) if args.phases else None,
        shape=tuple(args.shape), inplane_spacing_range=tuple(args.inplane_spacing),
        slice_spacing_range=tuple(args.slice_spacing),
        lesion_classes=tuple(args.classes) if args.classes else LESION_CLASSES,
        n_lesions_range=tuple(args.lesions), lesion_diameter_range_mm=tuple(args.lesion_size),
        contrast=args.contrast, noise_sigma=args.noise, blur_sigma_mm=args.blur,
        motion_mm=args.motion_mm, motion_deg=args.motion_deg,
        low_contrast_fraction=args.low_contrast_fraction)


def _cases(args, config, lazy: bool = False):
    """Training and test cases; ``lazy``: generated one at a time as the writer consumes them."""
    from nnunet_liver_ext.phantom.generator import iter_cases

    if args.num_cases < 1:
        raise ValueError(f"--num-cases must be >= 1, got {args.num_cases}")
    n_test = getattr(args, "test", 0) or 0
    if n_test < 0:
        raise ValueError(f"--test must be >= 0, got {n_test}")
    train = iter_cases(args.num_cases, config, args.seed, prefix=args.prefix, progress=not args.no_progress)
    # Test cases continue the index sequence, so their ids never clash with training ids.
    test = iter_cases(n_test, config, args.seed, prefix=args.prefix, progress=not args.no_progress,
                      start=args.num_cases) if n_test else iter(())
    return (train, test) if lazy else (list(train), list(test))


def _exit_on_sigterm(signum, frame):
    # a kill (SIGTERM) unwinds like Ctrl-C, so the writers remove their temporary folders
    raise SystemExit(128 + signum)


def _run(handler):
    def wrapped(args) -> int:
        start = time.time()
        try:
            previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        except ValueError:  # not the main thread: signals stay as they are
            previous = _exit_on_sigterm
        try:
            out = handler(args)
        except (UserError, ValueError, FileExistsError, TypeError) as err:
            # exit status 1 like every nnunet-liver user error (nnunet_liver_ext.cli.main); 2 stays argparse's, for
            # a malformed command line
            command = " ".join(c for c in ("phantom", getattr(args, "phantom_command", None)) if c)
            print(f"nnunet-liver {command}: error: {err}", file=sys.stderr)
            return 1
        finally:
            if previous is not _exit_on_sigterm:
                signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        print(f"wrote {out} ({time.time() - start:.1f} s)")
        return 0
    return wrapped


def _nnunet_raw(args):
    from nnunet_liver_ext.phantom.writers import check_raw_target, write_nnunet_raw

    raw = args.raw or os.environ.get("nnUNet_raw")
    if not raw:
        raise ValueError("no raw folder: pass --raw DIR or set nnUNet_raw")
    check_raw_target(Path(raw), args.dataset_id, args.name, args.overwrite)  # before minutes of generating
    config = _config(args)
    train, test = _cases(args, config, lazy=True)  # one case in memory at a time
    return write_nnunet_raw(Path(raw), args.dataset_id, args.name, train, test, mode=args.mode,
                            overwrite=args.overwrite)


class _Staged:
    """A folder built in a hidden temporary one and moved into place when complete: a failed or killed run leaves
    no half folder, and a run never mixes with an earlier one (stale volumes, a DICOM series with slices of two
    runs), so the folder must be new or empty. Checked when made, before minutes of generating."""

    def __init__(self, given: str, what: str, option: str):
        # absolute, links kept: '.' and 'a/..' have a name and a parent, a link keeps the name the user gave
        path = Path(os.path.abspath(given))
        if path.is_symlink() and not path.exists():
            raise UserError(f"{what} {given} is a symbolic link to {os.readlink(path)}, which does not exist",
                            f"mkdir -p {path.resolve()}, or choose another {option}")
        self.path, self.what, self.given, self.option = path, what, given, option
        self.existed = path.exists()
        self._check_free()
        # into an existing folder the built entries move one by one, and its temporary is inside it: replacing the
        # folder itself would strand a shell working in it (-o .), replace a link by a folder, or cross file systems
        # (a mount point); a new folder is the temporary renamed
        self.tmp = (path / f".phantom.tmp{os.getpid()}" if self.existed
                    else path.parent / f".{path.name}.tmp{os.getpid()}")
        self._made_parents = [p for p in path.parents if not p.exists()]  # nearest first
        self._placed: list[Path] = []

    def _check_free(self, ignore: Path | None = None) -> None:
        path = self.path
        if not path.exists():
            return
        entries = sorted(p.name for p in path.iterdir() if p != ignore) if path.is_dir() else None
        if entries is None or entries:
            from nnunet_liver_ext.phantom.writers import TargetTaken

            # named: hidden entries (a killed run's temporary, .DS_Store) do not show in a plain ls
            held = "is a file" if entries is None else \
                f"is not empty ({', '.join(entries[:3])}{', ...' if len(entries) > 3 else ''})"
            raise TargetTaken(f"{self.what} {self.given} exists and {held}; it is written into a new or empty folder "
                              f"only (into another it would mix with what is there)",
                              f"remove it, or choose another {self.option}")

    def open(self) -> Path:
        try:
            self.tmp.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp.mkdir()
        except OSError as err:
            self.discard()
            raise UserError(f"cannot write the {self.what} {self.given}: {err.strerror or err}",
                            f"choose another {self.option}") from None
        return self.tmp

    def commit(self) -> None:
        self._check_free(ignore=self.tmp)  # another process may have written there while this one generated
        if not self.existed:
            os.replace(self.tmp, self.path)
            self._placed.append(self.path)
            return
        for entry in sorted(self.tmp.iterdir()):
            os.replace(entry, self.path / entry.name)
            self._placed.append(self.path / entry.name)
        self.tmp.rmdir()

    def discard(self) -> None:
        """Remove what this run made (its temporary, what it placed, the parents it created); nothing else."""
        shutil.rmtree(self.tmp, ignore_errors=True)
        for placed in self._placed:
            if placed.is_dir() and not placed.is_symlink():
                shutil.rmtree(placed, ignore_errors=True)
            else:
                placed.unlink(missing_ok=True)
        for parent in self._made_parents:
            try:
                parent.rmdir()
            except OSError:
                break


def _layout(args):
    stages = [_Staged(args.output, "source folder", "-o")]
    out = stages[0].path
    truth = None
    if args.layout == "tcga-dicom" and (getattr(args, "test", 0) or 0) > 0:
        stages.append(_Staged(args.test_truth or str(out.with_name(out.name + "_test_truth")),
                              "test truth folder", "--test-truth"))
        truth = stages[1].path
        if truth.resolve().is_relative_to(out.resolve()):
            raise ValueError(f"the test truth folder {truth} is inside the source folder {out}, where the converter "
                             f"would read it as a patient")
        if out.resolve().is_relative_to(truth.resolve()):
            raise ValueError(f"the source folder {out} is inside the test truth folder {truth}; they are two "
                             f"separate folders (choose another --test-truth or -o)")
    config = _config(args)
    try:
        tmps = [stage.open() for stage in stages]
        train, test = _cases(args, config)
        written = _write_layout(args, tmps[0], train, test, truth_tmp=tmps[1] if truth is not None else None)
        for stage in stages:
            stage.commit()
    except BaseException:
        for stage in stages:
            stage.discard()
        raise
    written = out / written.relative_to(tmps[0])
    if truth is not None:
        print(f"{len(test)} held-out patient(s) without masks in {written}; their truth in {truth} (labelsTs/, "
              f"test_targets.json)")
    return written


def _write_layout(args, tmp: Path, train, test, truth_tmp: Path | None = None) -> Path:
    from nnunet_liver_ext.phantom import writers

    if args.layout == "lits":
        return writers.write_lits(tmp, train, test)
    if args.layout == "msd":
        return writers.write_msd_task03(tmp, train, test, apple_double=args.apple_double)
    if args.layout == "atlas":
        return writers.write_atlas(tmp, train)
    if args.layout == "tcga-dicom":
        return writers.write_tcga_dicom(tmp, train, test, truth_dir=truth_tmp)
    return writers.write_dynamic_mri(tmp, train, with_curves=not args.no_curves)


def _preview(args):
    from nnunet_liver_ext.phantom.generator import generate_case
    from nnunet_liver_ext.phantom.preview import save_preview

    config = _config(args)
    case = generate_case(config, args.seed, args.index, f"{args.prefix}_{args.index:03d}")
    return save_preview(case, args.output)


def register(subparsers) -> None:
    phantom = subparsers.add_parser(
        "phantom", help="synthetic multiphase liver CT/MRI cases (demo data, test fixtures)",
        description="Synthetic abdominal phantom: multiphase contrast-enhanced CT or dynamic MRI "
                    "with liver, tumors (HCC, hemangioma, metastasis, cyst) whose class shows in "
                    "the enhancement over the phases, per-phase rigid motion, anisotropic spacing.")
    sub = phantom.add_subparsers(dest="phantom_command", metavar="LAYOUT")
    # A fresh parent per subcommand: argparse shares parent actions, so a per-layout default
    # (MRI for atlas) set on a shared parent would leak into every other subcommand.
    gen = _generation_options

    raw = sub.add_parser("nnunet-raw", parents=[gen()], help="write an nnU-Net raw dataset (phases as channels)",
                         description="Generate cases straight into nnUNet_raw/DatasetXXX_NAME with "
                                     "dataset.json phases, characterization and enhancement targets.")
    raw.add_argument("-d", "--dataset-id", type=int, required=True, help="nnU-Net dataset id (1-999)")
    raw.add_argument("--name", required=True, help="dataset name (DatasetXXX_NAME)")
    raw.add_argument("--test", type=int, default=0, help="extra test cases into imagesTs/labelsTs [0]")
    raw.add_argument("--raw", default=None, help="nnU-Net raw folder [$nnUNet_raw]")
    raw.add_argument("--mode", choices=("sequence", "channels"), default="sequence",
                     help="sequence: dataset.json lists the phases (STD-Net, MTI-Net); channels: "
                          "plain multichannel [sequence]")
    raw.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder")
    raw.set_defaults(func=_run(_nnunet_raw))

    for layout, text in LAYOUTS.items():
        p = sub.add_parser(layout, parents=[gen()], help=text, description=f"Write phantom cases in the {text}.")
        p.add_argument("-o", "--output", required=True, help="output folder")
        if layout in ("lits", "msd"):
            p.add_argument("--test", type=int, default=0, help="extra unlabelled test volumes [0]")
        if layout == "tcga-dicom":
            p.add_argument("--test", type=int, default=0,
                           help="extra held-out patients: DICOM series only (no mask, not in classes.csv), their "
                                "truth written to --test-truth [0]")
            p.add_argument("--test-truth", default=None, metavar="DIR",
                           help="where the held-out patients' truth goes: labelsTs/PID.nii.gz, test_targets.json "
                                "(for nnunet-liver evaluate --dataset-json), phantom_truth.json "
                                "[OUTPUT_test_truth, next to the output folder]")
        if layout == "msd":
            p.add_argument("--apple-double", action="store_true",
                           help="also write the ._liver_N.nii.gz junk files of the real MSD tarball")
        if layout == "dynamic-mri":
            p.add_argument("--no-curves", action="store_true", help="labels.csv without curve columns")
        p.set_defaults(func=_run(_layout), layout=layout)
        if layout in ("atlas", "dynamic-mri"):
            p.set_defaults(modality="MRI")

    prev = sub.add_parser("preview", parents=[gen()], help="PNG montage of one case",
                          description="Render one case: every phase (aligned and as acquired) with "
                                      "label contours, a coronal slice and the enhancement curves.")
    prev.add_argument("-o", "--output", required=True, help="PNG file to write")
    prev.add_argument("--index", type=int, default=0, help="case index (with --seed) [0]")
    prev.set_defaults(func=_run(_preview))

    phantom.set_defaults(func=lambda args: (phantom.print_help(), 2)[1])
