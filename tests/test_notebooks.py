"""Every notebook in notebooks/ runs top to bottom without an error (executed with nbclient).

The kernel is this interpreter's own: a kernelspec written into a temporary folder runs
`sys.executable -m ipykernel_launcher`, and every Jupyter and IPython user folder points into that
temporary folder, so no user-level kernelspec, config or IPython startup file takes part. The
kernel inherits the offline environment from conftest.py and reports its interpreter back.
The committed notebooks are stored executed, with their outputs, and kept small.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
MAX_BYTES = 2_000_000


KERNEL = "lenslab-test-python"  # a name no user kernelspec has


def _own_kernel(monkeypatch, tmp_path) -> str:
    """A kernelspec for this interpreter in tmp_path, the only Jupyter path searched first; user
    folders (data, config, runtime, IPython profile) are empty temporary ones."""
    import json

    home = tmp_path / "jupyter"
    spec = home / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "lenslab test kernel",
                "language": "python",
            }
        )
    )
    for var, sub in (
        ("JUPYTER_PATH", "jupyter"),
        ("JUPYTER_DATA_DIR", "data"),
        ("JUPYTER_CONFIG_DIR", "config"),
        ("JUPYTER_RUNTIME_DIR", "runtime"),
        ("IPYTHONDIR", "ipython"),
    ):
        (tmp_path / sub).mkdir(exist_ok=True)
        monkeypatch.setenv(var, str(tmp_path / sub))
    from jupyter_client.kernelspec import KernelSpecManager

    assert KernelSpecManager().get_kernel_spec(KERNEL).argv[0] == sys.executable
    return KERNEL


def test_there_are_notebooks():
    assert any(p.name == "01_quickstart.ipynb" for p in NOTEBOOKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_committed_notebook_is_executed_and_small(path):
    import nbformat

    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "a notebook without code cells"
    assert all(c.execution_count is not None for c in code), "commit the notebook executed (outputs saved)"
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), "run it top to bottom once"
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"the committed notebook holds an error output: {errors[0].get('ename')}"
    assert path.stat().st_size < MAX_BYTES, f"{path.name} is {path.stat().st_size} bytes: clear large outputs"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(path, as_version=4)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    # a last cell reports the kernel's interpreter: it must be this one
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    client = NotebookClient(
        nb,
        kernel_name=_own_kernel(monkeypatch, tmp_path),
        timeout=300,
        startup_timeout=120,
        resources={"metadata": {"path": str(path.parent)}},
    )
    try:
        client.execute()
    except CellExecutionError as exc:
        pytest.fail(f"{path.name} failed:\n{exc}")
    finally:
        nbformat.write(nb, tmp_path / path.name)  # what a run produces, for inspection on failure
    assert nb.cells[-1].outputs[0]["text"].strip() == sys.executable
