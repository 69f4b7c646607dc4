import subprocess
import sys


def test_functional_and_core_do_not_import_lightning():
    code = (
        "import sys, lightning_probes.core, lightning_probes.functional, pkgutil, importlib\n"
        "import lightning_probes.core as c, lightning_probes.functional as f\n"
        "for pkg in (c, f):\n"
        "    for m in pkgutil.iter_modules(pkg.__path__):\n"
        "        importlib.import_module(pkg.__name__ + '.' + m.name)\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('pytorch_lightning', 'lightning')]\n"
        "print(bad)\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_core_subpackage_and_module_does_not_import_lightning():
    """Every module of ``core`` (each subpackage, recursively) and ``functional`` imported in one
    fresh interpreter: Lightning stays unimported (if the union imports none, no part does)."""
    code = (
        "import sys, pkgutil, importlib\n"
        "import lightning_probes.core as c, lightning_probes.functional as f\n"
        "names = []\n"
        "for pkg in (c, f):\n"
        "    names += [m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.')]\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "subpackages = {n for n in names if hasattr(sys.modules[n], '__path__')}\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('pytorch_lightning', 'lightning')]\n"
        "print(len(names), sorted(subpackages))\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    for sub in ("interventions", "kernels", "landscape", "lca", "nad"):
        assert f"'lightning_probes.core.{sub}'" in result.stdout, result.stdout


def test_top_level_exports_callbacks():
    import lightning_probes

    assert lightning_probes.ProbeCallback.__name__ == "ProbeCallback"
    for name in ("ProbeCallback", "ProbeSchedule"):
        assert getattr(lightning_probes, name).__name__ == name


def test_public_contract_paths_of_the_design_import():
    """Every path named in DESIGN.md's "Public contracts" stays importable after the move of
    core/ into subpackages (re-exported by the subpackages and the two shim modules)."""
    import importlib

    contracts = {
        "lightning_probes": [
            "LossContributionCallback", "AblationAUCCallback", "SelectivityCallback",
            "LayerCKACallback", "NADCallback", "LandscapeCallback",
        ],
        "lightning_probes.core.layers": ["select_layers"],
        "lightning_probes.core.kernels": ["layer_tangent_kernels"],
        "lightning_probes.core.lca": ["loss_change_allocation", "LCAResult"],
        "lightning_probes.core.ablation": ["ablation_curve", "AblationCurve"],
        "lightning_probes.core.selectivity": ["class_selectivity"],
        "lightning_probes.core.nad": ["neural_anisotropy_directions", "NADResult"],
        "lightning_probes.functional.alignment": [
            "kernel_label_alignment", "centered_kernel_alignment",
        ],
    }  # fmt: skip
    for module, names in contracts.items():
        mod = importlib.import_module(module)
        for name in names:
            assert callable(getattr(mod, name)), f"{module}.{name}"
