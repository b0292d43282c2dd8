"""The README documents every flag each script accepts, and CI runs the README's test command."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["align_faces.py", "train_v42_diamond.py", "make_diamonds.py", "safe_inference.py",
           "plot_training_curves.py", "detect.py", "evaluate.py", "bench/compare_archs.py", "bench/detect_bench.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_readme_lists_every_flag_of(script):
    out = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", out.stdout)) - {"--help"}
    readme = (ROOT / "README.md").read_text()
    missing = sorted(f for f in flags if f not in readme)
    assert not missing, f"{script}: flags missing from README.md: {missing}"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make demo" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"(?m)^make test$", ci)
