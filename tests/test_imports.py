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


def test_top_level_exports_callbacks():
    import lightning_probes

    assert lightning_probes.ProbeCallback.__name__ == "ProbeCallback"
    for name in ("ProbeCallback", "ProbeSchedule"):
        assert getattr(lightning_probes, name).__name__ == name
