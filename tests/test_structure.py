"""Structure of the package: no import circle, and no module imports another module's private (``_x``) names.

A private name is an implementation detail of its module; a name two modules share gets a public
home (this is checked on the package source with the standard library's AST, function-level
imports included)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def cross_module_private_imports(package: Path) -> list[str]:
    root = package.parent
    found = []
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cmiexp"):
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        found.append(f"{path.relative_to(root).as_posix()}:{node.lineno}: {node.module}.{alias.name}")
    return found


def test_no_private_names_cross_modules():
    assert cross_module_private_imports(REPO / "cmiexp") == []


def test_the_check_sees_a_private_import(tmp_path):
    pkg = tmp_path / "cmiexp"
    pkg.mkdir()
    (pkg / "a.py").write_text("def f():\n    from cmiexp.b import _hidden\n    return _hidden\n")
    assert cross_module_private_imports(pkg) == ["cmiexp/a.py:2: cmiexp.b._hidden"]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the package modules it imports (module-level and function-level imports alike:
    a function-level import is a dependency too, only a later one). An import of ``a.b.name`` is an
    edge to ``a.b.name`` if that is a module, else to ``a.b``; a module's own parent packages are not
    edges (importing ``cmiexp.x.y`` runs ``cmiexp/x/__init__.py`` first by Python's rules)."""
    root = package.parent
    files = {module_name(p, root): p for p in sorted(package.rglob("*.py"))}

    def owner(name: str) -> str:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name

    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        is_package = path.name == "__init__.py"
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = mod.split(".") if is_package else mod.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            for name in names:
                target = owner(name) if name.split(".")[0] == package.name else ""
                if target and target != mod and not mod.startswith(target + "."):
                    deps.add(target)
        graph[mod] = deps
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(cycles)


def test_no_import_cycles():
    cycles = import_cycles(import_graph(REPO / "cmiexp"))
    assert cycles == [], "import circles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_check_sees_a_cycle_through_a_function_level_import(tmp_path):
    pkg = tmp_path / "cmiexp"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from cmiexp.sub.a import f\n")
    (pkg / "sub" / "a.py").write_text("def f():\n    from cmiexp.b import g\n    return g\n")
    (pkg / "b.py").write_text("from .sub import a\n\ndef g():\n    return a\n")
    (pkg / "c.py").write_text("import cmiexp.b\n")
    graph = import_graph(pkg)
    assert graph["cmiexp.sub.a"] == {"cmiexp.b"} and graph["cmiexp.b"] == {"cmiexp.sub", "cmiexp.sub.a"}
    assert graph["cmiexp.sub"] == {"cmiexp.sub.a"}  # a package importing its own module is not a circle
    assert import_cycles(graph) == [["cmiexp.b", "cmiexp.sub", "cmiexp.sub.a"]]


# ---------------------------------------------------------------- config defaults have one home
def config_keys(conf: Path) -> set[str]:
    """Every key name any YAML under ``conf`` defines (at any depth)."""
    import yaml

    keys: set[str] = set()

    def walk(node) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                keys.add(str(k))
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    for path in sorted(conf.rglob("*.yaml")):
        walk(yaml.safe_load(path.read_text(encoding="utf-8")))
    return keys


def _key_and_default(node: ast.Call):
    """(key, default) of a config read with a fallback: ``x.get("key", d)``, or a getter helper
    ``getattr(x, "key", d)`` / ``cfg_get(x, "key", d)`` (any function whose name ends in "get")."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    if name == "get" and isinstance(func, ast.Attribute) and len(node.args) == 2:
        key, default = node.args
    elif name != "get" and (name.endswith("get") or name == "getattr") and len(node.args) == 3:
        _, key, default = node.args
    else:
        return None
    return (key, default) if isinstance(key, ast.Constant) and isinstance(key.value, str) else None


def _read_or_constant(node: ast.BoolOp):
    """The key of ``<config read> or <constant>`` (``x.get("key") or 128``, ``setting(x, "key", ...)
    or "full"``): a fallback for a null value, i.e. a default in code; None for anything else."""
    if not (isinstance(node.op, ast.Or) and len(node.values) == 2):
        return None
    read, default = node.values
    if not (isinstance(read, ast.Call) and isinstance(default, ast.Constant)) or default.value in (None, "", 0, False):
        return None
    func = read.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    keys = [a for a in read.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    return keys[0] if keys and (name.endswith("get") or name.endswith("setting")) else None


def defaults_in_code(package: Path, keys: set[str]) -> list[str]:
    """Config reads with a fallback value other than None (``x.get("key", 128)``, ``x.get("key") or
    128``): a second copy of a default that the YAML already sets (or a default the YAML should set)."""
    root = package.parent
    found = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.BoolOp):
                key = _read_or_constant(node)
                if key is not None and key.value in keys:
                    found.append(f"{path.relative_to(root).as_posix()}: {ast.unparse(node)}")
                continue
            pair = _key_and_default(node) if isinstance(node, ast.Call) else None
            if pair is None:
                continue
            key, default = pair
            if key.value in keys and not (isinstance(default, ast.Constant) and default.value is None):
                found.append(f"{path.relative_to(root).as_posix()}: {ast.unparse(node)}")
    return found


# Reads that are not of a composed config: records on disk written by other (possibly older)
# versions, report rows and Hydra's own node.
NOT_CONFIG_READS = {
    "cmiexp/models/heads.py: meta.get('dropout', 0.1)",  # a saved classifier's head.json
    "cmiexp/probes/inputs.py: r.get('seed', c.get('seed'))",  # a source run's results.json
    "cmiexp/report/tables.py: r.source.get('split', '')",  # a report row
    "cmiexp/runs/provision.py: c.get('trainer', {})",  # a provisioned run's spec file
    "cmiexp/runs/records.py: old.get('num_processes', procs_new)",  # a recorded run config
    "cmiexp/train/init_from.py: (run_cfg.get('peft') or {}).get('name', 'none')",  # a source run's config
    "cmiexp/train/init_from.py: getattr(model, 'name_or_path', '')",  # a loaded model's attribute
    "cmiexp/train/distributed.py: getattr(plugin, 'fsdp_version', 1)",  # Accelerate's FSDP plugin
    "cmiexp/train/distributed.py: getattr(plugin.state_dict_type, 'name', str(plugin.state_dict_type))",
    # What null means, as the YAML's comment says (not a second default): RoCoFT's head / Conv1D
    # switches (conf/peft/rocoft.yaml), and a run config written before the head group existed.
    "cmiexp/models/peft_methods.py: get('head') or 'full'",
    "cmiexp/models/peft_methods.py: get('conv1d') or 'rocoft'",
    "cmiexp/models/heads.py: optional_setting(optional_setting(cfg, 'head'), 'name') or 'pooling'",
    "cmiexp/models/heads.py: optional_setting(optional_setting(cfg, 'model'), 'name') or '?'",  # a message
}


def test_config_defaults_are_not_repeated_in_code():
    found = set(defaults_in_code(REPO / "cmiexp", config_keys(REPO / "conf")))
    assert sorted(found - NOT_CONFIG_READS) == [], "defaults repeated in code (set them in conf/ and read the key)"
    assert sorted(NOT_CONFIG_READS - found) == [], "stale entries in NOT_CONFIG_READS"


def test_the_default_check_sees_a_default(tmp_path):
    pkg = tmp_path / "cmiexp"
    pkg.mkdir()
    (pkg / "a.py").write_text("def f(cfg):\n    return cfg.task.get('max_length', 128), cfg.get('other', 1), "
                              "cfg.get('max_length'), _cfg_get(cfg, 'max_length', 64), getattr(cfg, 'max_length', 32), "
                              "getattr(cfg, 'max_length', None), cfg.get('max_length') or 256, "
                              "optional_setting(cfg, 'max_length') or None\n")
    assert defaults_in_code(pkg, {"max_length"}) == [
        "cmiexp/a.py: cfg.task.get('max_length', 128)", "cmiexp/a.py: _cfg_get(cfg, 'max_length', 64)",
        "cmiexp/a.py: getattr(cfg, 'max_length', 32)", "cmiexp/a.py: cfg.get('max_length') or 256"]


def test_a_failed_sweep_job_survives_pickling():
    """Launchers that run jobs in other processes (submitit) pickle the job's return value."""
    import math
    import pickle

    from cmiexp.runs.sweeps import JobFailed

    back = pickle.loads(pickle.dumps(JobFailed("/runs/x", "trainer.lr=abc must be a finite number")))
    assert isinstance(back, JobFailed) and math.isnan(back)
    assert (back.run_dir, back.message) == ("/runs/x", "trainer.lr=abc must be a finite number")


def test_the_probes_package_hands_on_flownib_lazily():
    """``cmiexp.probes.__all__`` is FlowNIB's API, and importing the probe job's file-only checks
    loads no torch (they run before it is imported)."""
    import cmiexp.probes
    import cmiexp.probes.flownib

    assert sorted(cmiexp.probes.__all__) == sorted(cmiexp.probes.flownib.__all__)
    code = ("import sys\nfrom cmiexp.probes import inputs\nimport cmiexp.data, cmiexp.train.settings\n"
            "print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.stdout.strip() == "False", proc.stderr[-1000:]


# Issue 13's acceptance, held by tests: no private state of Hydra or Accelerate (KD teachers train in a
# child cmiexp under filelock), results.json named only by cmiexp.runs, and no module past about 600 lines.
PRIVATE_LIBRARY_STATE = ("Singleton", "_shared_state", "GradientState", "fcntl")
MAX_MODULE_LINES = 600


def private_library_state(package: Path) -> list[str]:
    found = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
            names = [a.name for a in node.names] if isinstance(node, (ast.Import, ast.ImportFrom)) else [name]
            found += [f"{path.relative_to(package.parent).as_posix()}:{node.lineno}: {n}"
                      for n in names if n and n.split(".")[-1] in PRIVATE_LIBRARY_STATE]
    return found


def results_file_literals(package: Path) -> list[str]:
    """Places outside cmiexp/runs/ that spell the file name "results.json" as a string of their own
    (messages that mention it are fine; a path built from it is not)."""
    found = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package.parent).as_posix()
        if rel.startswith(f"{package.name}/runs/"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value == "results.json":
                found.append(f"{rel}:{node.lineno}")
    return found


def test_no_private_state_of_hydra_or_accelerate():
    assert private_library_state(REPO / "cmiexp") == []


def test_results_json_is_named_only_by_the_runs_package():
    assert results_file_literals(REPO / "cmiexp") == []


def test_no_module_is_over_600_lines():
    long = {p.relative_to(REPO).as_posix(): n for p in sorted((REPO / "cmiexp").rglob("*.py"))
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert long == {}


def test_the_structure_checks_see_what_they_look_for(tmp_path):
    pkg = tmp_path / "cmiexp"
    (pkg / "runs").mkdir(parents=True)
    (pkg / "a.py").write_text("import fcntl\nfrom hydra.core.singleton import Singleton\n"
                              "from accelerate.state import GradientState\nGradientState._shared_state.clear()\n"
                              "p = 'out/' + 'results.json'\nmsg = 'no results.json here'\n")
    (pkg / "runs" / "results.py").write_text("RESULTS = 'results.json'\n")
    assert private_library_state(pkg) == ["cmiexp/a.py:1: fcntl", "cmiexp/a.py:2: Singleton",
                                          "cmiexp/a.py:3: GradientState", "cmiexp/a.py:4: _shared_state",
                                          "cmiexp/a.py:4: GradientState"]
    assert results_file_literals(pkg) == ["cmiexp/a.py:5"]
