"""`nnunet-liver convert {lits,msd,atlas,tcga-lihc,dynamic-mri} SRC -d ID ...`"""
from __future__ import annotations

import argparse
import os
import sys

from nnunet_liver_ext.errors import UserError

SOURCES = {
    "lits": ("lits", "LiTS", "LiTS download: volume-N.nii[.gz] + segmentation-N.nii[.gz], test-volume-N"),
    "msd": ("msd", "Liver", "MSD Task03_Liver folder (imagesTr, labelsTr, imagesTs, dataset.json)"),
    "atlas": ("atlas", "ATLAS", "ATLAS liver MRI: train/imagesTr/im{N}.nii.gz + train/labelsTr/lb{N}.nii.gz"),
    "tcga-lihc": ("tcga_lihc", "TCGALIHC", "TCGA-LIHC DICOM: one folder per patient, one series per phase, "
                                           "masks/{patient}.nii.gz, classes.csv"),
    "dynamic-mri": ("dynamic_mri", "DynamicMRI", "dynamic MRI: images/{case}/{phase}.nii.gz, masks/, labels.csv"),
}


def register(subparsers) -> None:
    convert = subparsers.add_parser(
        "convert", help="convert a public liver dataset into an nnU-Net raw dataset",
        description="Convert a public liver dataset, in its download layout, into "
                    "nnUNet_raw/DatasetID_NAME (atomic: nothing appears unless every case passed).")
    sources = convert.add_subparsers(dest="source", metavar="SOURCE")
    for source, (_, default_name, help_text) in SOURCES.items():
        p = sources.add_parser(source, help=help_text, description=help_text)
        p.add_argument("src", metavar="SRC", help="source folder in the download layout")
        p.add_argument("-d", "--dataset-id", type=int, required=True, help="nnU-Net dataset id (1-999)")
        p.add_argument("--name", default=default_name, help=f"dataset name (default {default_name})")
        p.add_argument("--raw", default=None, help="nnUNet_raw folder (default: $nnUNet_raw)")
        p.add_argument("--phases", choices=("as-channels", "sequence"), default="as-channels",
                       help="'sequence' also writes the phase order into dataset.json for the "
                            "temporal networks (default as-channels)")
        p.add_argument("--phase-subset", nargs="+", default=None, metavar="P",
                       help="only these phases become channels, e.g. portal_venous for a single-phase baseline")
        p.add_argument("--overwrite", action="store_true",
                       help="replace an existing dataset with this id in the raw folder (an id that another name "
                            "holds in nnUNet_preprocessed or nnUNet_results is refused all the same)")
        p.add_argument("--skip-incomplete", action="store_true",
                       help="skip (and report) cases with a missing phase or label instead of failing")
        p.add_argument("-np", "--num-workers", type=int, default=1, help="parallel worker processes")
        p.add_argument("--orient", default="keep",
                       help="'keep' each image's orientation (default) or reorient all cases to a code like LPS "
                            "(one letter of R/L, A/P and S/I each)")
        p.add_argument("--geometry-tolerance", type=float, default=1.0,
                       help="image/label grids differing by up to this many voxels are resampled "
                            "(with a warning); beyond it the case fails (default 1.0)")
        if source == "tcga-lihc":
            p.add_argument("--phase-map", default=None, metavar="FILE",
                           help='JSON {"SeriesDescription or SeriesInstanceUID": "phase"} or per patient '
                                '{"PATIENT": {...}}; "ignore" drops a series (a relative path not found here is '
                                'looked up in SRC)')
        if source in ("tcga-lihc", "dynamic-mri"):
            p.add_argument("--classes", default=None, metavar="CSV",
                           help="case classes (default SRC/classes.csv or SRC/labels.csv; a relative path not "
                                "found here is looked up in SRC)")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        p.set_defaults(func=_convert)
    convert.set_defaults(func=lambda args: (convert.print_help(), 2)[1])


def source_relative(path: str | None, src: str, option: str) -> str | None:
    """A file given to a converter option: as given when it exists from where the user stands, else
    the same relative path inside the source folder (`--classes classes.csv` next to the DICOM
    folders), else a UserError naming both places."""
    if path is None or os.path.exists(path):
        return path
    in_src = os.path.join(src, path)
    if not os.path.isabs(path) and os.path.exists(in_src):
        return in_src
    places = "" if os.path.isabs(path) else \
        f", neither {os.path.abspath(path)} (current folder) nor {os.path.abspath(in_src)} (source folder)"
    raise UserError(f"{option} {path}: no such file{places}",
                    f"give {option} the file's path from the current folder, or from the source folder {src}")


def _convert(args: argparse.Namespace) -> int:
    import importlib

    from nnunet_liver_ext.dataset_conversion.common import (ConversionError, ConversionFailed, ConversionOptions,
                                                            default_raw_root)

    if not os.path.isdir(args.src):
        raise UserError(f"source folder {args.src} does not exist ({os.path.abspath(args.src)})",
                        f"give the folder of the {args.source} download as SRC")
    for attr, option in (("classes", "--classes"), ("phase_map", "--phase-map")):
        if getattr(args, attr, None) is not None:
            setattr(args, attr, source_relative(getattr(args, attr), args.src, option))
    try:
        options = ConversionOptions(
            raw_root=args.raw or default_raw_root(), dataset_id=args.dataset_id, name=args.name, overwrite=args.overwrite,
            skip_incomplete=args.skip_incomplete, num_workers=args.num_workers, phases_mode=args.phases,
            phase_subset=args.phase_subset, phase_map=getattr(args, "phase_map", None),
            classes_csv=getattr(args, "classes", None), orient=args.orient,
            geometry_tolerance_vox=args.geometry_tolerance, progress=not args.no_progress)
        module = importlib.import_module(f"nnunet_liver_ext.dataset_conversion.{SOURCES[args.source][0]}")
        module.convert(args.src, options)
    except (ConversionFailed, ConversionError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
