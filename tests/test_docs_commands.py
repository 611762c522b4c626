"""Every shell command the README and docs/*.md show is run, in a reduced form, so the docs stay true.

The fence convention (README, "Documentation"): a fenced block with info string ``bash`` holds
commands that run offline on CPU from the repository root; ``bash needs-hub`` and ``bash needs-gpu``
blocks are shown, not run; output goes in ``text`` blocks. Each offline command is one parametrised
test named by file and line, so a broken one is named. Commands run in document order (README first,
then docs/ by name) in one shared working directory next to a ``shared`` link to the real
``../shared``, so the quick start's runs feed its report and later pages can read them.

Reduction rules (``reduce_command``): ``cmiexp`` training commands get overrides that cap steps and
rows; ``--help``/``--cfg``/``--info``/``--dry-run`` commands and ``cmiexp-report`` run as written;
reproduction scripts get ``--dry-run``; for benchmark and helper scripts the script and the options
used must exist (bench_mi and bench_flownib run, reduced, in tests/test_benchmarks.py; the others by hand); ``pip install`` and ``pytest`` must be exactly what
.ci/run runs. A command no rule covers fails its test until it gets a rule or a needs-* marker.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import warm_cli
from filelock import FileLock

from tests.conftest import REPO, compose_config, offline_env, with_warm_cli

DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# Every test here on one xdist worker (pyproject: --dist loadgroup): the documented commands run once, in
# the session fixture `executed`, and a second worker asking for it would only wait on the first's lock.
pytestmark = pytest.mark.xdist_group("docs-commands")

RUN_TAG = "bash"
NOT_RUN_TAGS = ("bash needs-hub", "bash needs-gpu")
SHELL_WORDS = {"bash", "sh", "shell", "console", "zsh", "shell-session"}
# Appended to every cmiexp training command: the last value of a key wins in Hydra, so these cap
# whatever the documented command set. Two optimizer steps on 64 rows still run every stage of a
# run (data, tiny model, training, evaluation, results, checkpoint) and of a sweep.
CMIEXP_REDUCTION = ["trainer.max_steps=2", "task.max_train_samples=64", "task.max_eval_samples=32",
                    "task.max_length=32", "trainer.progress_bar=false"]
CHEAP_CMIEXP_FLAGS = {"--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c", "--dry-run"}
AS_WRITTEN = {"cmiexp-report", "grep", "find", "ls", "cat", "head", "tail", "wc", "test"}
# objective=flownib probes (or an experiment overlay that selects it) train critics, not the model:
# fewer critic steps on fewer rows.
PROBE_REDUCTION = ["objective.steps=30", "objective.max_samples=128"]
COMMAND_TIMEOUT_S = 300


def is_probe(args: list[str]) -> bool:
    """Whether a cmiexp command probes: objective=flownib, or an experiment overlay whose composed
    config selects it (composed by Hydra, so an overlay that inherits the choice counts too)."""
    if "objective=flownib" in args:
        return True
    overlays = [a for a in args if a.startswith("experiment=")]
    return bool(overlays) and compose_config(overlays[-1:]).objective.name == "flownib"


@dataclass
class DocCommand:
    """One documented command line (continuations joined), with where it was written."""

    file: str
    line: int
    text: str
    section: str = ""

    @property
    def id(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass
class Fence:
    file: str
    line: int
    info: str
    body: list[str] = field(default_factory=list)
    section: str = ""


def unfenced_commands(path: Path) -> list[str]:
    """Indented (4-space) code lines outside fences that start with a command: they would escape the
    test, so the docs put commands in fences."""
    found, inside = [], False
    for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if re.match(r"^\s{0,3}(`{3,}|~{3,})", line):
            inside = not inside
        elif not inside and re.match(r"^( {4,}|\t)(\$ )?(cmiexp|cmiexp-report|python|scripts/|pip|accelerate|torchrun)\b", line):
            found.append(f"{path.relative_to(REPO).as_posix()}:{no}: {line.strip()}")
    return found


def fences(path: Path) -> list[Fence]:
    """Fenced blocks of a Markdown file (``` or ~~~), with their info string and the heading above."""
    rel = path.relative_to(REPO).as_posix()
    found, current, section = [], None, ""
    for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        m = re.match(r"^\s{0,3}(`{3,}|~{3,})\s*(.*)$", line)
        if current is None:
            if m:
                current = Fence(rel, no, m.group(2).strip(), section=section)
                marker = m.group(1)
            elif line.startswith("#"):
                section = line.lstrip("#").strip()
        elif m and m.group(1).startswith(marker[0]) and len(m.group(1)) >= len(marker) and not m.group(2):
            found.append(current)
            current = None
        else:
            current.body.append(line)
    return found


def commands_of(fence: Fence) -> list[DocCommand]:
    """Join backslash continuations, drop blank and comment lines; one command per logical line."""
    out, buf, start = [], [], None
    for offset, raw in enumerate(fence.body, 1):
        line = raw.rstrip()
        if not buf and (not line.strip() or line.strip().startswith("#")):
            continue
        if start is None:
            start = fence.line + offset
        if line.endswith("\\"):
            buf.append(line[:-1].strip())
            continue
        buf.append(line.strip())
        out.append(DocCommand(fence.file, start, " ".join(buf), fence.section))
        buf, start = [], None
    if buf:
        out.append(DocCommand(fence.file, start, " ".join(buf), fence.section))
    return out


def documented_commands() -> list[DocCommand]:
    return [c for path in DOC_FILES for f in fences(path) if f.info == RUN_TAG for c in commands_of(f)]


def ci_commands() -> set[str]:
    """The commands .ci/run executes, normalised (the README's set-up must be exactly these)."""
    lines = (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    words = [shlex.split(x, comments=True) for x in lines]
    # the install and test commands; set/cd/export lines are CI's own harness
    return {shlex.join(w) for w in words if w and w[0] in {"pip", "pip3", "pytest"}}


def strip_comment(text: str) -> str:
    """The command without a trailing shell comment (an unquoted ``#`` at a word start)."""
    quote, prev = None, " "
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and prev.isspace():
            return text[:i].rstrip()
        prev = ch
    return text.rstrip()


def split_segments(text: str) -> list[str]:
    """``a && b  # c`` -> ["a", "b"]: the command's text split at ``&&`` (comments dropped). Only
    ``&&`` chains are split: a command with pipes or other operators stays one segment and is judged
    by its first program. The text is kept as written, so the shell still expands globs and $(...)."""
    return [seg.strip() for seg in re.split(r"\s&&\s", strip_comment(text)) if seg.strip()]


class NoReduction(Exception):
    """A documented offline command that no rule knows how to run in a reduced form."""


def reduce_segment(seg: str) -> tuple[str, str]:
    """(kind, line): kind "run" with the reduced shell line, or "ci" with the normalised command
    (checked against .ci/run, not run). Reductions are appended to the text as written."""
    words = shlex.split(seg)
    env = []
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        env, words = env + [words[0]], words[1:]
    if not words:
        raise NoReduction("an environment assignment alone is not a command")
    prog, args = words[0], words[1:]
    if any(w in {"|", ";", ">", ">>", "<", "&", "||"} for w in words) and prog not in AS_WRITTEN:
        raise NoReduction(f"'{prog}' inside a pipeline or redirection has no reduction rule")
    if prog in {"pip", "pip3"} or (prog == "pytest" and not env):
        return "ci", shlex.join(words)

    def plus(extra: list[str]) -> str:
        return " ".join([seg, *map(shlex.quote, extra)])

    if prog in {"python", "python3"} and args[:2] == ["-m", "cmiexp"]:
        prog, args = "cmiexp", args[2:]
    if prog in {"python", "python3"} and args[:2] == ["-m", "cmiexp.dry_run"]:
        return "run", seg
    if prog in {"python", "python3"} and args[:2] == ["-m", "cmiexp.objectives.kd"]:
        return "run", plus(CMIEXP_REDUCTION)  # trains the teacher of a KD config: the same reduction
    if prog == "cmiexp":
        if CHEAP_CMIEXP_FLAGS & set(args):
            return "run", seg
        return "run", plus(CMIEXP_REDUCTION + (PROBE_REDUCTION if is_probe(args) else []))
    if prog in AS_WRITTEN:
        return "run", seg
    if re.fullmatch(r"(\./)?scripts/reproduce_\w+\.sh", prog):
        if {"--help", "-h", "--dry-run"} & set(args):
            return "run", seg
        if "--" in args:  # options go before the pass-through overrides
            head, _, tail = seg.partition(" -- ")
            return "run", f"{head} --dry-run -- {tail}"
        return "run", plus(["--dry-run"])
    if prog in {"python", "python3"} and args and re.fullmatch(r"(benchmarks|scripts)/\w+\.py", args[0]):
        return "options", shlex.join(args)
    if prog in {"python", "python3"} and args[:2] == ["-m", "pytest"]:
        # A part of the suite, which runs it anyway: the named test files must exist.
        return "exists", shlex.join([a for a in args[2:] if a.startswith("tests/")] or ["tests"])
    if prog == "bash" and args and re.fullmatch(r"benchmarks/\w+\.sh", args[0]):
        # Shell benchmarks (benchmarks/gpu_check.sh --cpu-smoke runs in tests/test_benchmarks.py): the script
        # must exist and name each documented option.
        return "options", shlex.join(args)
    raise NoReduction(f"no reduction rule for '{prog}': give it one in tests/test_docs_commands.py or mark "
                      "its block `bash needs-hub` / `bash needs-gpu`")


def missing_options(argv: list[str]) -> list[str]:
    """A Python helper script and its --options must exist (its argparse declares them): the
    benchmarks take minutes; bench_mi and bench_flownib run, reduced, in tests/test_benchmarks.py."""
    script = REPO / argv[0]
    if not script.is_file():
        return [f"{argv[0]} does not exist"]
    source = script.read_text(encoding="utf-8")
    if script.suffix == ".sh":  # a shell script names its options in its argument parsing
        return [f"{argv[0]} has no option {opt}" for opt in argv[1:]
                if opt.startswith("--") and opt.split("=")[0] not in source]
    return [f"{argv[0]} has no option {opt}" for opt in argv[1:]
            if opt.startswith("--") and not re.search(r"add_argument\([^)]*[\"']" + re.escape(opt.split("=")[0]) + "[\"']", source)]


def reduce_command(cmd: DocCommand, ci: set[str]) -> tuple[str | None, list[str]]:
    """The shell line to run (None: nothing to run) and the problems found without running it."""
    problems, runnable = [], []
    for seg in split_segments(cmd.text):
        try:
            kind, line = reduce_segment(seg)
        except NoReduction as e:
            problems.append(str(e))
            continue
        if kind == "ci":
            if line not in ci:
                problems.append(f"'{line}' is not what .ci/run runs ({sorted(ci)})")
        elif kind == "options":
            problems += missing_options(shlex.split(line))
        elif kind == "exists":
            problems += [f"{p} does not exist" for p in shlex.split(line) if not (REPO / p.split("::")[0]).exists()]
        else:
            runnable.append(line)
    return (" && ".join(runnable) or None), problems


def make_workspace(root: Path) -> Path:
    """root/repo (the commands' cwd, with the repository's folders linked in) next to root/shared."""
    work = root / "repo"
    work.mkdir(parents=True)
    shared = (REPO.parent / "shared").resolve()
    (root / "shared").symlink_to(shared, target_is_directory=True)
    for name in ("cmiexp", "conf", "scripts", "benchmarks", "docs", "tests", ".ci", "pyproject.toml", "README.md"):
        if (REPO / name).exists():
            (work / name).symlink_to(REPO / name)
    return work


def command_env(root: Path) -> dict:
    env = offline_env()
    env.pop("CMIEXP_OUTPUT_DIR", None)  # the commands write outputs/ under their cwd, as documented
    # offline_env already puts this interpreter's console scripts first on PATH
    env.update(CMIEXP_CACHE_DIR=str(root / "cache"), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return with_warm_cli(env)


def execute(cmds: list[DocCommand], root: Path) -> dict[str, dict]:
    """Run every command in order in one workspace; a record per command id."""
    work = make_workspace(root)
    env, ci, results = command_env(root), ci_commands(), {}
    # The README's set-up command (a new user's first one) runs cold, as the installed console script;
    # every other command runs warm (tests/warm_cli.py).
    cold = dict(env, **{warm_cli.COLD_ENV: "1"})
    first_readme = next((c.id for c in cmds if c.file == "README.md"), None)
    for cmd in cmds:
        line, problems = reduce_command(cmd, ci)
        rec = {"command": cmd.text, "ran": line, "problems": problems, "rc": None, "output": "", "seconds": 0.0}
        t0 = time.monotonic()
        if line is not None:
            try:
                p = subprocess.run(["bash", "-c", line], cwd=work, env=cold if cmd.id == first_readme else env,
                                   capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
                rec.update(rc=p.returncode, stdout=p.stdout, output=(p.stdout + p.stderr)[-4000:])
            except subprocess.TimeoutExpired:
                rec.update(rc=124, output=f"timed out after {COMMAND_TIMEOUT_S}s")
        rec["seconds"] = round(time.monotonic() - t0, 1)
        results[cmd.id] = rec
    return results


DOC_COMMANDS = documented_commands()


@pytest.fixture(scope="session")
def executed(tmp_path_factory, worker_id) -> dict[str, dict]:
    """All documented commands, run once per test session even under xdist (the first worker runs them,
    the other reads its record), because later commands read what earlier ones wrote."""
    base = tmp_path_factory.getbasetemp()
    if worker_id != "master":
        base = base.parent
    record = base / "docs-commands.json"
    with FileLock(str(base / "docs-commands.lock")):
        if record.exists():
            return json.loads(record.read_text(encoding="utf-8"))
        results = execute(DOC_COMMANDS, base / "docs-commands")
        record.write_text(json.dumps(results), encoding="utf-8")
        return results


def test_the_docs_hold_offline_commands():
    assert len(DOC_COMMANDS) >= 5 and any(c.file == "README.md" for c in DOC_COMMANDS)


# The first test to ask for `executed` runs every command (a few minutes on a loaded 2-core machine).
SESSION_TIMEOUT_S = 1800


@pytest.mark.slow
@pytest.mark.timeout(SESSION_TIMEOUT_S)
@pytest.mark.parametrize("cmd", DOC_COMMANDS, ids=[c.id for c in DOC_COMMANDS])
def test_documented_command_runs(cmd: DocCommand, executed):
    rec = executed[cmd.id]
    assert not rec["problems"], f"{cmd.id}: {cmd.text}\n" + "\n".join(rec["problems"])
    assert rec["rc"] in (0, None), f"{cmd.id}: `{rec['ran']}` exited {rec['rc']}:\n{rec['output']}"


def test_shell_fences_follow_the_convention():
    """A shell block is `bash`, `bash needs-hub` or `bash needs-gpu`; every fence says what it holds
    (output: `text`), so no command hides in an unlabelled block."""
    bad = []
    for path in DOC_FILES:
        for f in fences(path):
            first = f.info.split()[0] if f.info else ""
            if not f.info:
                bad.append(f"{f.file}:{f.line}: unlabelled fence (commands: bash, output: text)")
            elif first in SHELL_WORDS and f.info != RUN_TAG and f.info not in NOT_RUN_TAGS:
                bad.append(f"{f.file}:{f.line}: info string '{f.info}' (use bash, bash needs-hub or bash needs-gpu)")
        bad += [f"{x} (an indented command: put it in a fenced block)" for x in unfenced_commands(path)]
    assert bad == []


def markdown_tables(text: str) -> list[tuple[list[str], list[str]]]:
    """(header cells, first-column cells) of every Markdown table in the text."""
    tables, rows = [], []
    for line in [*text.splitlines(), ""]:
        if line.strip().startswith("|"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif rows:
            body = [r for r in rows[1:] if not all(set(c) <= set("-: ") for c in r)]
            tables.append((rows[0], [r[0] for r in body]))
            rows = []
    return tables


def quickstart_report() -> tuple[DocCommand, str]:
    """The quick start's cmiexp-report command and the output block the README shows after it."""
    readme = fences(REPO / "README.md")
    qs = [f for f in readme if f.section.lower().startswith("quick start")]
    cmd = next(c for f in qs if f.info == RUN_TAG for c in commands_of(f) if c.text.startswith("cmiexp-report"))
    shown = next(f for f in qs if f.info == "text" and f.line > cmd.line)
    return cmd, "\n".join(shown.body)


@pytest.mark.slow
@pytest.mark.timeout(SESSION_TIMEOUT_S)
def test_quickstart_prints_the_table_the_readme_shows(executed):
    """Screenshot-level check: the reduced quick start gives tables with the README's rows and columns
    (the numbers differ: two steps on 64 rows instead of three epochs on 1000)."""
    cmd, shown = quickstart_report()
    expected = markdown_tables(shown)
    assert len(expected) >= 2, "the README's quick start output should show the result tables"
    rec = executed[cmd.id]
    assert rec["rc"] == 0, rec["output"]
    got = markdown_tables(rec["stdout"])
    assert got[:len(expected)] == expected


# The extractor and the rules themselves, on small inputs.

def test_continuations_comments_and_chains_are_parsed(tmp_path, monkeypatch):
    doc = tmp_path / "x.md"
    doc.write_text("# T\n```bash\n# a comment\ncmiexp -m a=1 \\\n  b=2   # trailing\n\ncmiexp-report out\n```\n"
                   "```bash needs-hub\ncmiexp model=bert-base-uncased\n```\n", encoding="utf-8")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    fs = fences(doc)
    assert [f.info for f in fs] == ["bash", "bash needs-hub"]
    cmds = commands_of(fs[0])
    assert [(c.line, c.text) for c in cmds] == [(4, "cmiexp -m a=1 b=2   # trailing"), (7, "cmiexp-report out")]
    assert split_segments(cmds[0].text) == ["cmiexp -m a=1 b=2"]
    assert split_segments("pip install -e '.[dev]' && cmiexp x='#a' # c") == ["pip install -e '.[dev]'", "cmiexp x='#a'"]


def test_reduction_rules():
    ci = {"pip install -e '.[dev]'", "pytest"}
    line, problems = reduce_command(DocCommand("R", 1, 'pip install -e ".[dev]" && cmiexp'), ci)
    assert problems == [] and line == "cmiexp " + " ".join(CMIEXP_REDUCTION)
    assert reduce_command(DocCommand("R", 1, 'pip install -e ".[dev]" && pytest'), ci) == (None, [])
    _, problems = reduce_command(DocCommand("R", 1, "pip install -e ."), ci)
    assert problems and "not what .ci/run runs" in problems[0]
    assert reduce_command(DocCommand("R", 1, "cmiexp --cfg job task=glue/rte"), ci) == \
        ("cmiexp --cfg job task=glue/rte", [])
    assert reduce_command(DocCommand("R", 1, "scripts/reproduce_cmi_glue.sh --smoke -- a=1"), ci)[0] == \
        "scripts/reproduce_cmi_glue.sh --smoke --dry-run -- a=1"
    _, problems = reduce_command(DocCommand("R", 1, "accelerate launch -m cmiexp task=glue/rte"), ci)
    assert problems and "no reduction rule for 'accelerate'" in problems[0]
    _, problems = reduce_command(DocCommand("R", 1, "cmiexp task=glue/rte | tee log"), ci)
    assert problems and "pipeline" in problems[0]
    assert reduce_command(DocCommand("R", 1, "python benchmarks/bench_mi.py --quick"), ci) == (None, [])
    assert reduce_command(DocCommand("R", 1, "python benchmarks/bench_mi.py --fast"), ci) == \
        (None, ["benchmarks/bench_mi.py has no option --fast"])
    # globs and $(...) stay as written, for the shell to expand
    line, _ = reduce_command(DocCommand("R", 1, "cmiexp trainer.init_from=out/seed1-*  # a run"), ci)
    assert line == "cmiexp trainer.init_from=out/seed1-* " + " ".join(CMIEXP_REDUCTION)
    # a probe selected by its experiment overlay gets the probe reduction too; a training overlay does not
    line, _ = reduce_command(DocCommand("R", 1, "cmiexp experiment=flownib_probe_mini seed=1"), ci)
    assert line == "cmiexp experiment=flownib_probe_mini seed=1 " + " ".join(CMIEXP_REDUCTION + PROBE_REDUCTION)
    line, _ = reduce_command(DocCommand("R", 1, "cmiexp experiment=flownib_mini"), ci)
    assert line == "cmiexp experiment=flownib_mini " + " ".join(CMIEXP_REDUCTION)


def test_a_broken_command_fails(tmp_path):
    """The runner reports a failing command (an unknown task) with its exit status and error line."""
    results = execute([DocCommand("X.md", 3, "cmiexp task=glue/no_such_task")], tmp_path)
    rec = results["X.md:3"]
    assert rec["rc"] != 0 and "no_such_task" in rec["output"]


def test_ci_runs_the_readme_setup():
    """.ci/run's two commands are the README's set-up lines (CI checks them by running them)."""
    assert ci_commands() == {"pip install -e '.[dev]'", "pytest"}
    setup = [c.text for c in DOC_COMMANDS if c.file == "README.md"][:2]
    assert setup == ['pip install -e ".[dev]" && cmiexp', 'pip install -e ".[dev]" && pytest']
