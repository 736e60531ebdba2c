"""The trainer catalogue (`nnunet-liver trainers`): it lists every trainer the trainer modules define,
describes each, and agrees with the README's trainer tables."""
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nnunet_liver_ext import catalogue
from nnunet_liver_ext.training.schedules import SCHEDULES

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def cat():
    return catalogue.load_catalogue()


def _importable_modules():
    """Trainer modules that import (others' work in progress may not): {stem: module}."""
    out = {}
    for stem in catalogue.trainer_modules():
        try:
            out[stem] = importlib.import_module(f"{catalogue.TRAINERS_PACKAGE}.{stem}")
        except Exception:
            continue
    return out


def test_covers_every_trainer_class_of_every_module_that_imports(cat):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    modules = _importable_modules()
    assert {"nnUNetTrainerSTDNet", "nnUNetTrainer_schedules"} <= set(modules)
    for stem, module in modules.items():
        assert stem not in cat.errors, cat.error_details.get(stem)
        defined = {name for name, v in vars(module).items()
                   if isinstance(v, type) and issubclass(v, nnUNetTrainer) and v.__module__ == module.__name__}
        assert defined, f"{stem} defines no trainer"
        listed = {e.name for e in cat.entries.values() if e.module == stem}
        assert defined == listed, (stem, defined ^ listed)
    # a module that does not import is reported, not silently left out
    assert set(cat.errors) == set(catalogue.trainer_modules()) - set(modules)


def test_stdnet_entries_kinds_keys_and_descriptions(cat):
    e = cat.entries
    assert e["nnUNetTrainerSTDNet"].kind == "method" and e["nnUNetTrainerSTDNet"].parent is None
    assert e["nnUNetTrainerSTDNet_noTemporal"].kind == "variant"
    assert e["nnUNetTrainerSTDNet_noTemporal"].parent == "nnUNetTrainerSTDNet"
    assert e["nnUNetTrainerSTDNet_refPhase"].keys_required == ("phases",)
    assert set(e["nnUNetTrainerSTDNet"].keys_used) >= {"phases", "characterization"}
    tiny = e["nnUNetTrainerSTDNet_hybrid_tiny"]
    assert (tiny.kind, tiny.parent, tiny.schedule) == ("schedule", "nnUNetTrainerSTDNet_hybrid", "tiny")
    stock = e["nnUNetTrainer_tiny"]
    assert stock.stock_based and stock.keys_required == () and stock.keys_used == ()
    assert "stock nnU-Net" in stock.summary
    # nnU-Net ships nnUNetTrainer_5epochs / _10epochs itself: they are not ours
    assert "nnUNetTrainer_5epochs" not in e and catalogue.is_nnunet_trainer("nnUNetTrainer_5epochs")
    for entry in e.values():
        assert entry.summary and entry.summary != "(no docstring)", entry.name
        assert "\n" not in entry.summary


def test_every_base_has_every_schedule_and_a_stock_baseline(cat):
    for base in cat.bases():
        assert {s.schedule for s in cat.schedules_of(base.name)} == set(SCHEDULES), base.name
    for entry in cat.entries.values():
        baseline = catalogue.stock_trainer_for(entry.name)
        assert baseline in cat.entries or catalogue.is_nnunet_trainer(baseline), (entry.name, baseline)
    assert catalogue.stock_trainer_for("nnUNetTrainerSTDNet_tiny") == "nnUNetTrainer_tiny"
    assert catalogue.stock_trainer_for("nnUNetTrainerSTDNet") == "nnUNetTrainer"
    assert catalogue.is_stock("nnUNetTrainer_tiny") and catalogue.is_stock("nnUNetTrainer_5epochs")
    assert not catalogue.is_stock("nnUNetTrainerSTDNet_tiny")


def test_names_and_closest(cat):
    names = catalogue.trainer_names()
    assert names == list(cat.entries) and "nnUNetTrainerSTDNet_demo" in names
    assert catalogue.closest_trainers("nnUNetTrainerSTDNet_tny")[0] == "nnUNetTrainerSTDNet_tiny"
    assert catalogue.closest_trainers("nnunettrainerstdnet")[0] == "nnUNetTrainerSTDNet"
    assert "nnUNetTrainer" in catalogue.nnunet_trainer_names()


def _readme_trainer_rows():
    """First-column cells of the README tables whose header starts with `| trainer (-tr)`."""
    rows, in_table = [], False
    for line in (REPO / "README.md").read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped.startswith("|"):
            in_table = False
            continue
        cells = [c.strip() for c in stripped.strip("|").split("|")]
        if cells[0].replace("`", "").startswith("trainer (-tr)"):
            in_table = True
            continue
        if in_table and not set(cells[0]) <= set("-: "):
            rows.append(cells[0])
    return rows


def _names_in_row(cell: str) -> list[str]:
    """Backticked names; a shorthand (`_10epochs`) extends the row's first full name's base."""
    tokens = re.findall(r"`([^`]+)`", cell)
    names, base = [], None
    for token in tokens:
        if token.startswith("_"):
            assert base is not None, f"shorthand {token} without a full name before it: {cell}"
            names.append(base + token)
        else:
            names.append(token)
            if base is None:
                suffix = token.rsplit("_", 1)[-1]
                base = token[: -len(suffix) - 1] if "_" in token and suffix in SCHEDULES else token
    return names


def test_readme_trainer_tables_agree_with_the_catalogue(cat):
    rows = _readme_trainer_rows()
    assert rows, "no README table with a `| trainer (-tr) |` header"
    documented = [name for row in rows for name in _names_in_row(row)]
    unknown = [n for n in documented if n not in cat.entries]
    assert not unknown, f"README trainer tables name trainers the package does not have: {unknown}"
    undocumented = [b.name for b in cat.bases() if b.name not in documented]
    assert not undocumented, f"trainers missing from the README's trainer tables: {undocumented}"
    # the stock baselines have table rows; every other trainer's schedule variants are the README's
    # "Short schedules, for every trainer" paragraph, which names every schedule of the table
    assert any(s.name in documented for s in cat.schedules_of("nnUNetTrainer")), "no stock baseline row in README"
    readme = (REPO / "README.md").read_text()
    paragraph = readme[readme.index("**Short schedules, for every trainer.**"):].split("\n\n")[0]
    assert all(f"`_{schedule}`" in paragraph for schedule in SCHEDULES), paragraph


def test_readme_row_parsing():
    assert _names_in_row("`nnUNetTrainerSTDNet_5epochs`, `_10epochs`, `_tiny`") == [
        "nnUNetTrainerSTDNet_5epochs", "nnUNetTrainerSTDNet_10epochs", "nnUNetTrainerSTDNet_tiny"]
    assert _names_in_row("`nnUNetTrainer_short`, `_demo`") == ["nnUNetTrainer_short", "nnUNetTrainer_demo"]
    assert _names_in_row("`nnUNetTrainerSTDNet_noTemporal`") == ["nnUNetTrainerSTDNet_noTemporal"]


def test_trainers_command_lists_every_trainer(cat):
    run = lambda *a: subprocess.run([str(BIN / "nnunet-liver"), "trainers", *a], capture_output=True, text=True,
                                    timeout=300)
    out = run()
    assert out.returncode == 0, out.stderr
    for base in cat.bases():
        assert f"{base.name}  [" in out.stdout and base.summary in out.stdout
    assert "needs phases" in out.stdout and "_tiny 1x2" in out.stdout
    assert "nnUNetTrainer_{short,demo,tiny}" in out.stdout
    every = run("--all")
    assert every.returncode == 0
    listed = re.findall(r"^(nnUNetTrainer\w*)  \[", every.stdout, flags=re.M)
    assert listed == list(cat.entries)


def test_a_broken_trainer_module_is_reported_and_the_others_listed(tmp_path, monkeypatch):
    pkg = tmp_path / "fake_trainers"
    pkg.mkdir()
    (pkg / "nnUNetTrainerGood.py").write_text(
        "from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer\n"
        "from nnunet_liver_ext.training.schedules import register_schedule_variants\n\n\n"
        "class nnUNetTrainerGood(nnUNetTrainer):\n    \"\"\"A good trainer.\n\n    More words.\"\"\"\n\n\n"
        "class nnUNetTrainerGood_variant(nnUNetTrainerGood):\n    \"\"\"Its variant.\"\"\"\n\n\n"
        "register_schedule_variants(globals())\n")
    (pkg / "nnUNetTrainerHalfWritten.py").write_text("from nowhere_at_all import Network\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cat = catalogue.build_catalogue(pkg, "fake_trainers")
    assert set(cat.errors) == {"nnUNetTrainerHalfWritten"} and "nowhere_at_all" in cat.errors["nnUNetTrainerHalfWritten"]
    good = cat.entries["nnUNetTrainerGood"]
    assert (good.kind, good.summary, good.keys_required, good.keys_used) == ("method", "A good trainer.", (), ())
    assert cat.entries["nnUNetTrainerGood_variant"].parent == "nnUNetTrainerGood"
    assert len(cat.entries) == 2 * (1 + len(SCHEDULES))
    tiny = cat.entries["nnUNetTrainerGood_tiny"]
    assert not tiny.stock_based and tiny.summary.startswith("A good trainer. [tiny schedule")
