"""`nnunet-liver`: one entry point for everything nnU-Net's own commands do not cover.

Each subsystem owns its subcommands: the module listed in `SUBCOMMAND_MODULES` defines
`register(subparsers)`, which adds its parsers with `set_defaults(func=handler)`. Handlers
import their heavy dependencies (torch, SimpleITK) themselves, so `--help` stays fast.

A handler that finds a mistake in its input raises `errors.UserError`; `main` prints it in one or
two lines (what is wrong, the command that fixes it) and returns 1. Other exceptions keep their
traceback: they are bugs.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from nnunet_liver_ext.errors import UserError
from nnunet_liver_ext.paths import ext_trainer_export_line

SUBCOMMAND_MODULES = (
    "nnunet_liver_ext.phantom.cli",
    "nnunet_liver_ext.dataset_conversion.cli",
    "nnunet_liver_ext.evaluation.cli",
    "nnunet_liver_ext.trainer_plans.cli",
    "nnunet_liver_ext.inference.cli",
)


def _env(args: argparse.Namespace) -> int:
    if not args.check:
        print(ext_trainer_export_line())
        return 0
    from nnunet_liver_ext.paths import check_environment

    checks = check_environment()
    width = max(len(c.variable) for c in checks)
    for c in checks:
        print(f"{'ok     ' if c.ok else 'MISSING'} {c.variable:<{width}}  {c.state}")
    fixes = [c.profile_line for c in checks if not c.ok and c.profile_line]
    if all(c.ok for c in checks):
        print("\nAll set: nnU-Net finds its folders and nnUNetv2_train / nnUNetv2_predict find our trainers.")
        return 0
    if fixes:
        print("\nAdd to your shell profile (~/.bashrc or ~/.zshrc), then open a new shell:")
        for line in fixes:
            print(f"  {line}")
    return 1


def _trainers(args: argparse.Namespace) -> int:
    from nnunet_liver_ext.catalogue import closest_trainers, load_catalogue
    from nnunet_liver_ext.training.schedules import SCHEDULES

    cat = load_catalogue()
    for module, error in cat.errors.items():
        print(f"warning: trainers/{module}.py could not be imported ({error}); its trainers are not listed",
              file=sys.stderr)
    if args.names:
        unknown = [n for n in args.names if n not in cat.entries]
        for name in args.names:
            if name in cat.entries:
                _print_entry(cat.entries[name])
        if unknown:
            from nnunet_liver_ext.catalogue import is_nnunet_trainer

            stock = [n for n in unknown if is_nnunet_trainer(n)]
            for name in stock:
                print(f"{name}\n    nnU-Net's own trainer (nnunetv2.training.nnUNetTrainer); dataset.json: no extra keys")
            unknown = [n for n in unknown if n not in stock]
        if unknown:
            hints = "; ".join(f"{n}: did you mean {', '.join(closest_trainers(n)) or '(nothing close)'}?"
                              for n in unknown)
            raise UserError(f"no trainer named {', '.join(unknown)} in this package or in nnU-Net", hints)
        return 0
    if args.all:
        for entry in cat.entries.values():
            _print_entry(entry)
        return 0
    print("Trainers of nnunet-liver-ext: nnUNetv2_train DATASET CONFIGURATION FOLD -tr NAME "
          "(with nnUNet_extTrainer set: eval \"$(nnunet-liver env)\").")
    print("dataset.json keys: 'needs' = training refuses a dataset without them; 'uses' = read when present.")
    print("Short schedules (append to any name below; epochs x iterations per epoch): "
          + ", ".join(f"_{s} {e}x{i}" for s, (e, i, _) in SCHEDULES.items()) + ".")
    print()
    for entry in cat.bases():
        _print_entry(entry, schedules=[s.schedule for s in cat.schedules_of(entry.name)])
    stock = [p for p in cat.schedule_parents() if p not in cat.entries]
    for parent in stock:
        variants = cat.schedules_of(parent)
        print(f"{parent}_{{{','.join(v.schedule for v in variants)}}}")
        print(f"    stock nnU-Net {parent} on our short schedules: the like-for-like baselines "
              f"(nnU-Net itself ships {parent}_5epochs, _10epochs, ...)")
        print("    dataset.json: no extra keys")
    print(f"\n{len(cat.entries)} trainers ({len(cat.bases())} methods and variants, "
          f"{len(cat.entries) - len(cat.bases())} schedule variants); `nnunet-liver trainers --all` lists every name.")
    return 0


def _keys(entry) -> str:
    if not entry.keys_required and not entry.keys_used:
        return "no extra keys"
    needs = ", ".join(entry.keys_required) or "nothing"
    uses = ", ".join(entry.keys_used) or "nothing else"
    return f"needs {needs}; uses {uses}"


def _print_entry(entry, schedules=None) -> None:
    kind = {"method": "method", "variant": f"variant of {entry.parent}",
            "schedule": f"{entry.parent} on the {entry.schedule} schedule"}[entry.kind]
    print(f"{entry.name}  [{kind}]")
    print(f"    {entry.summary}")
    line = f"    dataset.json: {_keys(entry)}"
    if schedules:
        line += "  |  schedules: " + " ".join(f"_{s}" for s in schedules)
    print(line)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnunet-liver",
        description="Liver and liver-tumor methods inside nnU-Net v2. Training and "
                    "prediction stay nnU-Net's own commands (nnUNetv2_train -tr ...); "
                    "this tool makes data, plans, characterization predictions and reports.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    env = sub.add_parser(
        "env", help="print the export that lets nnUNetv2_train find our trainers (--check: check the shell)",
        description='Print the nnUNet_extTrainer export. Use: eval "$(nnunet-liver env)". With --check: check '
                    "nnUNet_raw, nnUNet_preprocessed, nnUNet_results and nnUNet_extTrainer and print what to add "
                    "to the shell profile (exit status 1 when something is missing).")
    env.add_argument("--check", action="store_true", help="check nnU-Net's variables and the trainer export")
    env.set_defaults(func=_env)
    tr = sub.add_parser(
        "trainers", help="list the trainers this package provides (-tr values) and the dataset.json keys they need",
        description="Every trainer of this package: methods, ablations, variants and their short schedules, "
                    "with a one-line description and the dataset.json keys each needs or uses. Give names to "
                    "look them up (a typo gets the closest names).")
    tr.add_argument("names", nargs="*", metavar="NAME", help="show only these trainers")
    tr.add_argument("--all", action="store_true", help="list every name, schedule variants included")
    tr.set_defaults(func=_trainers)
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        command = " ".join(a for a in (args.command, getattr(args, "source", None) or
                                       getattr(args, "phantom_command", None)) if a)
        print(f"nnunet-liver {command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
