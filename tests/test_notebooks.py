"""The notebooks run at CI size (JATTRI_NOTEBOOK_SMALL=1) and make their figures.

Each notebook's code cells run in order in one namespace, in a fresh process, with the
Agg backend and a temporary working directory (the committed PNGs beside the notebooks
are not overwritten). The committed notebooks must carry their outputs.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
# notebook -> the PNGs it saves in its working directory
FIGURES = {"01_quickstart.ipynb": ["01_top_examples.png", "01_mislabel.png", "01_top_text.png"],
           "02_benchmark.ipynb": ["02_lds_vs_time.png"],
           "03_ensembles.ipynb": ["03_ensembles.png", "03_dropout_rate.png"]}
# notebook -> (table files it writes in its working directory, header lines it prints)
TABLES = {"01_quickstart.ipynb": ([], ["helpers same label", "AUC"]),
          "02_benchmark.ipynb": (["02_benchmark_table.txt"], ["LDS      LDS      LDS"]),
          "03_ensembles.ipynb": (["03_ensembles.csv"], ["naive I=1", "dropout I=2", "lora I=2"])}

RUNNER = """
import json, sys
cells = [c for c in json.load(open(sys.argv[1]))["cells"] if c["cell_type"] == "code"]
namespace = {"__name__": "__main__"}
for k, cell in enumerate(cells):
    source = "".join(cell["source"])
    try:
        exec(compile(source, f"<{sys.argv[1]} code cell {k}>", "exec"), namespace)
    except Exception:
        print(f"--- code cell {k} failed:\\n{source}", file=sys.stderr)
        raise
"""


def code_cells(name):
    return [c for c in json.loads((NOTEBOOKS / name).read_text())["cells"]
            if c["cell_type"] == "code"]


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_notebook_runs_at_ci_size(name, tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("sklearn")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    env.update(JATTRI_NOTEBOOK_SMALL="1", MPLBACKEND="Agg",
               XLA_FLAGS=os.environ.get("JATTRI_TEST_FAST_XLA", ""))  # the suite's fast compile
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", RUNNER, str(NOTEBOOKS / name)],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    seconds = time.perf_counter() - start
    assert run.returncode == 0, f"{name} failed:\n{run.stderr[-4000:]}"
    for png in FIGURES[name]:
        path = tmp_path / png
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    files, headers = TABLES[name]
    for table in files:
        assert (tmp_path / table).is_file() and (tmp_path / table).stat().st_size > 0, table
    for header in headers:
        assert header in run.stdout, f"{name} printed no table with {header!r}"
    assert seconds < 120, f"{name} took {seconds:.0f} s at CI size"


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_committed_notebook_has_outputs(name):
    """Stored executed (at full size), with its figures inline and saved beside it."""
    cells = code_cells(name)
    assert cells and all(c.get("execution_count") for c in cells), "not executed"
    errors = [o for c in cells for o in c["outputs"] if o["output_type"] == "error"]
    assert not errors, errors[0].get("ename")
    images = [o for c in cells for o in c["outputs"] if "image/png" in o.get("data", {})]
    assert len(images) >= len(FIGURES[name])
    for png in FIGURES[name]:
        assert (NOTEBOOKS / png).is_file(), png
    for table in TABLES[name][0]:
        assert (NOTEBOOKS / table).is_file(), table
    printed = "".join("".join(o.get("text", "")) for c in cells for o in c["outputs"])
    for header in TABLES[name][1]:
        assert header in printed, header
