"""The package surface: trainers/ installs as `hf_eu.trainers` (no top-level `trainers` of its own, a name any
other distribution may own), exports every trainer, config and data tool, and `import hf_eu` never imports it."""

import ast
import importlib
import os
import subprocess
import sys
import tomllib

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def _setuptools_table() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as file:
        return tomllib.load(file)["tool"]["setuptools"]


def test_trainers_install_as_hf_eu_trainers():
    table = _setuptools_table()
    assert "hf_eu.trainers" in table["packages"] and "trainers" not in table["packages"]
    assert all(name == "hf_eu" or name.startswith("hf_eu.") for name in table["packages"]), table["packages"]
    assert table["package-dir"]["hf_eu.trainers"] == "trainers"
    assert table["package-dir"]["hf_eu.model_cards"] == "model_cards"
    assert not os.path.exists(os.path.join(ROOT, "hf_eu", "trainers"))  # the folder itself stays trainers/


def test_trainers_import_each_other_relatively():
    """An absolute `trainers.x` import would fail once installed as hf_eu.trainers (lazy imports included)."""
    absolute = []
    for name in sorted(os.listdir(os.path.join(ROOT, "trainers"))):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(ROOT, "trainers", name), encoding="utf-8") as file:
            tree = ast.parse(file.read())
        for node in ast.walk(tree):
            modules = ([alias.name for alias in node.names] if isinstance(node, ast.Import) else
                       [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            absolute += [f"{name}:{node.lineno} {m}" for m in modules if m == "trainers" or m.startswith("trainers.")]
    assert not absolute, absolute


def test_hf_eu_trainers_exports_every_trainer_config_and_data_tool():
    package = importlib.import_module("hf_eu.trainers")
    for name in ["DDDTrainer", "DDDConfig", "OSDTrainer", "OSDConfig", "GaussianDistillationTrainer",
                 "GaussianDistillationConfig", "EUHeadTrainer", "EUHeadConfig", "DistillationCollator",
                 "generate_responses", "partition_dataset", "reasoning_gym_questions", "build_data", "load_data",
                 "eu_head_dataset", "fit_calibrator", "fit_answer_risk"]:
        assert name in package.__all__ and callable(getattr(package, name)), name
    assert [name for name in package.__all__ if not hasattr(package, name)] == []
    for module_name in ["answer_risk", "calibration", "collator", "data", "ddd_config", "ddd_trainer", "distillation",
                        "eu_head_config", "eu_head_data", "eu_head_trainer", "factor_em", "gaussian_config",
                        "gaussian_design", "gaussian_trainer", "osd_config", "osd_trainer", "partition", "questions",
                        "script_utils"]:
        module = importlib.import_module(f"hf_eu.trainers.{module_name}")
        assert set(module.__all__) <= set(package.__all__), (module_name, set(module.__all__) - set(package.__all__))


def test_no_exported_name_is_also_a_module():
    """`import hf_eu.trainers.X` sets the package attribute X to the module: an exported function named like a
    module (the old `fit_calibrator`) would be replaced by it."""
    import pkgutil

    package = importlib.import_module("hf_eu.trainers")
    modules = {info.name for info in pkgutil.iter_modules(package.__path__)}
    assert "run_calibrator" in modules and not set(package.__all__) & modules
    importlib.import_module("hf_eu.trainers.run_calibrator")
    assert callable(package.fit_calibrator) and package.fit_calibrator.__module__.endswith("calibration")


def test_import_hf_eu_never_imports_the_trainers(tmp_path):
    """From outside the repository (so its root is not on the path): `import hf_eu` loads no trainer module,
    `hf_eu.trainers` is the installed trainers/, and the install maps no top-level `trainers` to it."""
    script = """
import importlib.util, os, sys
import hf_eu
loaded = [m for m in sys.modules if m.split(".")[0] == "trainers" or m.startswith("hf_eu.trainers")]
assert not loaded, loaded
import hf_eu.trainers
from hf_eu.trainers import DDDTrainer, OSDTrainer, EUHeadTrainer
folder = os.path.dirname(hf_eu.trainers.__file__)  # the clone's trainers/ (editable), or site-packages/hf_eu/trainers
assert (os.path.samefile(folder, os.path.join(sys.argv[1], "trainers"))
        or folder.endswith(os.path.join("hf_eu", "trainers"))), folder
spec = importlib.util.find_spec("trainers")
assert spec is None or not os.path.samefile(os.path.dirname(spec.origin), os.path.join(sys.argv[1], "trainers")), spec
"""
    env = {**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script, ROOT], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
