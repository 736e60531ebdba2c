"""Print the headline of an ``nnunet-liver evaluate`` folder: case count, liver and tumor Dice, and
the characterization metrics. Used by scripts/demo.sh and benchmarks/cpu_stdnet_characterization.sh.

    python scripts/print_evaluation.py EVALUATION_FOLDER [LABEL]
"""
import csv
import json
import statistics
import sys


def main(folder: str, label: str = "held-out") -> None:
    rows = list(csv.DictReader(open(f"{folder}/per_case_metrics.csv")))

    def mean(column):
        values = [float(r[column]) for r in rows if r.get(column) not in (None, "", "nan")]
        return statistics.mean(values) if values else float("nan")

    print(f"{label} cases: {len(rows)}")
    print(f"Dice liver (region {{1,2}}): {mean('liver_region_dice'):.3f}")
    print(f"Dice tumor (label 2):       {mean('tumor_dice'):.3f}")
    summary = json.load(open(f"{folder}/summary.json")).get("characterization", {})
    true_classes = [r["true_class"] for r in rows if r.get("true_class")]
    for result in summary.values():
        pooled = result.get("pooled", {})
        classes = pooled.get("classes") or []
        # chance: always answering the commonest class of these cases; AUC 0.5; balanced accuracy 1/K
        majority = max(true_classes.count(c) for c in set(true_classes)) / len(true_classes) if true_classes else 0
        print(f"characterization ({pooled.get('n_cases')} cases, classes {classes}):")
        print(f"  accuracy          {pooled.get('accuracy', float('nan')):.3f}   (chance: {majority:.3f}, the commonest "
              f"class every time)")
        print(f"  balanced accuracy {pooled.get('balanced_accuracy', float('nan')):.3f}   (chance: "
              f"{1 / max(len(classes), 1):.3f})")
        print(f"  AUC one-vs-rest   {pooled.get('auc_ovr_macro', float('nan')):.3f}   (chance: 0.500)")


if __name__ == "__main__":
    if not 2 <= len(sys.argv) <= 3:
        sys.exit(__doc__)
    main(*sys.argv[1:])
