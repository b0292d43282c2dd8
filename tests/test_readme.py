"""The README and docs/ document every flag each script accepts, and CI runs the README's test command."""
import contextlib
import io
import re
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Each script and the page that holds its flags (named in the failure message, so a new flag's
# place is obvious); a flag documented on any page, or in README.md, counts.
SCRIPTS = {
    "align_faces.py": "docs/stages.md",
    "train_v42_diamond.py": "docs/stages.md",
    "make_diamonds.py": "docs/stages.md",
    "safe_inference.py": "docs/stages.md",
    "plot_training_curves.py": "docs/stages.md",
    "detect.py": "docs/detect.md",
    "evaluate.py": "docs/evaluate.md",
    "serve.py": "docs/serve.md",
    "export.py": "docs/export.md",
    "bench/compare_archs.py": "docs/architectures.md",
    "bench/detect_bench.py": "docs/detect.md",
    "ensemble.py": "docs/folds.md",
    "bench/generalization.py": "docs/generalization.md",
}


def documentation() -> str:
    """README.md and every page under docs/, as one text."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return "\n".join(p.read_text(encoding="utf-8") for p in pages)


def help_text(script: str, monkeypatch) -> str:
    """``python SCRIPT --help``'s output, run in this process (a subprocess per script would import
    torch again each time: most of this test's time)."""
    monkeypatch.setattr(sys, "argv", [str(ROOT / script), "--help"])
    monkeypatch.chdir(ROOT)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    assert done.value.code in (0, None), f"{script} --help exited {done.value.code}"
    return out.getvalue()


@pytest.mark.parametrize("script", SCRIPTS)
def test_docs_list_every_flag_of(script, monkeypatch):
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*", help_text(script, monkeypatch))) - {"--help"}
    assert flags, f"{script} --help printed no flags"
    docs = documentation()
    # A flag is documented when it appears as a whole word: `--tta` does not count for `--tta-views`.
    missing = sorted(f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", docs))
    assert not missing, f"{script}: flags missing from README.md and docs/ (add them to {SCRIPTS[script]}): {missing}"


def test_readme_links_every_flag_page_and_each_page_names_its_scripts():
    readme = (ROOT / "README.md").read_text()
    for script, page in SCRIPTS.items():
        assert f"]({page}" in readme, f"README.md does not link {page}, where the flags of {script} are"
        assert Path(script).name in (ROOT / page).read_text(encoding="utf-8"), f"{page} does not mention {script}"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make demo" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"(?m)^make test$", ci)


def test_readme_stays_short():
    # The README is the way in; the reference lives in docs/ (docs/README.md is its index).
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
