"""`nnunet-liver`: one entry point for everything nnU-Net's own commands do not cover.

Each subsystem owns its subcommands: the module listed in `SUBCOMMAND_MODULES` defines
`register(subparsers)`, which adds its parsers with `set_defaults(func=handler)`. Handlers
import their heavy dependencies (torch, SimpleITK) themselves, so `--help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from nnunet_liver_ext.paths import ext_trainer_export_line

SUBCOMMAND_MODULES = (
    "nnunet_liver_ext.phantom.cli",
    "nnunet_liver_ext.dataset_conversion.cli",
    "nnunet_liver_ext.evaluation.cli",
    "nnunet_liver_ext.trainer_plans.cli",
    "nnunet_liver_ext.inference.cli",
)


def _env(args: argparse.Namespace) -> int:
    print(ext_trainer_export_line())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnunet-liver",
        description="Liver and liver-tumor methods inside nnU-Net v2. Training and "
                    "prediction stay nnU-Net's own commands (nnUNetv2_train -tr ...); "
                    "this tool makes data, plans, characterization predictions and reports.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    env = sub.add_parser(
        "env", help="print the export that lets nnUNetv2_train find our trainers",
        description='Print the nnUNet_extTrainer export. Use: eval "$(nnunet-liver env)"')
    env.set_defaults(func=_env)
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
