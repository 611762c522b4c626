"""Commands that only print (``--cfg``, ``--resolve``) work as typed, from any directory."""

from __future__ import annotations

import os
import stat

from tests.conftest import run_cli


def test_cfg_hydra_resolve_prints_the_run_directory_from_a_read_only_folder(cmiexp_env, tmp_path):
    ro = tmp_path / "read-only"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        proc = run_cli(["--cfg", "hydra", "--resolve", "task=glue/rte", "seed=3"], cmiexp_env, cwd=ro)
    finally:
        ro.chmod(stat.S_IRWXU)
    lines = proc.stdout.splitlines()
    run_dirs = [ln.split("dir: ", 1)[1] for ln in lines if ln.strip().startswith("dir: ") and "/seed3-" in ln]
    out = cmiexp_env["CMIEXP_OUTPUT_DIR"]
    assert run_dirs and run_dirs[0].startswith(f"{out}/runs/default/glue/rte/tiny-bert/ce/seed3-"), proc.stdout[:800]
    assert "Traceback" not in proc.stderr and "${" not in run_dirs[0]
    # the run directory does not depend on where the command is typed (CMIEXP_OUTPUT_DIR is absolute)
    again = run_cli(["--cfg", "hydra", "--resolve", "task=glue/rte", "seed=3"], cmiexp_env)
    assert [ln for ln in again.stdout.splitlines() if "/seed3-" in ln] == [ln for ln in lines if "/seed3-" in ln]
    assert not os.listdir(ro)


def test_cfg_hydra_resolve_with_a_bad_group_is_one_line(cmiexp_env):
    proc = run_cli(["--cfg", "hydra", "--resolve", "task=nope"], cmiexp_env, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "task" in proc.stderr and "Traceback" not in proc.stderr


def test_end_of_run_table_never_prints_a_small_value_as_zero():
    from cmiexp.cli import format_metric, format_results_table

    assert [format_metric(v) for v in (0.94512, 8e-6, 0.0, 12, -3.2e-5, 0.00123)] == [
        "0.9451", "8e-06", "0", "12", "-3.2e-05", "0.00123"]
    table = format_results_table({"task": "glue/rte", "model": "tiny-bert", "objective": "cmi_min", "seed": 0,
                                  "status": "completed", "best": {"metrics": {"accuracy": 0.5, "cmi": 8e-6}},
                                  "final": {"metrics": {"accuracy": 0.5, "cmi": 8e-6}}})
    cmi_row = [ln for ln in table.splitlines() if ln.startswith("| cmi")][0]
    assert "8e-06" in cmi_row and "0.0000" not in cmi_row
