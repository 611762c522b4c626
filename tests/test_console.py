"""What a user sees: the end-of-run summary, progress lines, one line per error, cmiexp.log, no
library noise (issue #17 items 2 and 5)."""

from __future__ import annotations

import json
import logging
import re
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from tests.conftest import REPO, find_run_dirs, run_cli

ANSI = re.compile(r"\x1b\[")
LOG_PREFIX = re.compile(r"^\[\d\d:\d\d:\d\d\]\[(INFO|WARNING|ERROR)\] (.*)$")


def _results(**over):
    r = {"task": "glue/rte", "model": "tiny-bert", "objective": "cmi_min", "seed": 0, "status": "completed",
         "primary_metric": "accuracy",
         "best": {"step": 30, "metrics": {"accuracy": 0.5, "cmi": 8e-6, "loss": 0.69314718, "num_samples": 277}},
         "final": {"step": 60, "metrics": {"accuracy": 0.47, "cmi": 1.2e-5, "loss": 0.7}},
         "run_dir": "/runs/default/" + "x" * 120, "wall_time_s": 3.2, "train_samples_per_s": 100.0,
         "peak_memory_mb": 900.0}
    r.update(over)
    return r


def test_significant_digits():
    from cmiexp.train.summary import format_metric

    assert [format_metric(v) for v in (0.94512, 8e-6, 0.0, 12, -3.2e-5, 0.00123, 12.3456, 1234.5, 0.5)] == [
        "0.9451", "8e-06", "0", "12", "-3.2e-05", "0.00123", "12.35", "1234", "0.5"]


def test_summary_rows_run_dir_and_sync_hint_as_plain_text():
    from cmiexp.train.summary import summary_text

    sync_dir = "/runs/x/wandb/offline-run-20260101_000000-abc"
    text = summary_text(_results(wandb={"mode": "offline", "sync_dir": sync_dir}), width=80)
    lines = text.splitlines()
    assert not ANSI.search(text) and "\r" not in text
    assert lines[0] == "glue/rte | tiny-bert | cmi_min | seed 0 | status completed"
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines if ln.startswith("|")]
    assert rows[0] == ["metric", "best (step 30)", "final (step 60)"]
    assert rows[2:] == [["accuracy *", "0.5", "0.47"], ["cmi", "8e-06", "1.2e-05"], ["loss", "0.6931", "0.7"]]
    # a path longer than the console is printed whole (copy-pasteable), never wrapped
    assert "run dir: /runs/default/" + "x" * 120 in lines
    assert lines[-1] == f"W&B offline run; upload it with: wandb sync {sync_dir}"
    assert all(ln.strip() for ln in lines)  # no padding lines
    online = summary_text(_results(wandb={"mode": "online", "url": "https://wandb.ai/e/p/runs/abc"}))
    assert "wandb sync" not in online and "W&B run: https://wandb.ai/e/p/runs/abc" in online
    assert "W&B" not in summary_text(_results())


def test_progress_lines_when_not_a_terminal(caplog):
    """Plain periodic lines with the mean loss since the previous line; the loss is read on the host
    only when a line is written."""
    import torch

    from cmiexp.train.progress import TrainProgress

    reads = {"n": 0}

    class Loss:
        """A device value that counts how often it is read on the host."""

        def __init__(self, v):
            self.v = v

        def detach(self):
            return self

        def __add__(self, other):
            return Loss(self.v + other.v)

        def __float__(self):
            reads["n"] += 1
            return float(self.v)

    losses = [float(x) for x in torch.linspace(2.0, 0.1, 40)]
    with caplog.at_level(logging.INFO, logger="cmiexp"):
        with TrainProgress(40, 0, interactive=False, line_every_s=1e9) as p:
            for step, v in enumerate(losses, start=1):
                p.update(step, Loss(v))
    msgs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train step")]
    assert len(msgs) == 10 and reads["n"] == 10
    for i, m in enumerate(msgs):
        got = re.match(r"train step (\d+)/40 \((\d+)%\) loss=([0-9.e+-]+), ", m)
        assert got, m
        step = int(got.group(1))
        assert step == 4 * (i + 1) and int(got.group(2)) == round(100 * step / 40)
        expected = sum(losses[step - 4:step]) / 4  # the four steps since the previous line
        assert float(got.group(3)) == pytest.approx(expected, rel=1e-3)
    assert not any("\r" in m for m in msgs)


def test_resumed_progress_counts_from_the_resume_step(caplog):
    from cmiexp.train.progress import TrainProgress

    with caplog.at_level(logging.INFO, logger="cmiexp"):
        with TrainProgress(10, 6, interactive=False) as p:
            for step in range(7, 11):
                p.update(step, 0.5)
    steps = [int(re.search(r"step (\d+)/", r.getMessage()).group(1)) for r in caplog.records
             if r.getMessage().startswith("train step")]
    assert steps == [7, 8, 9, 10]


def test_benign_library_warnings_dropped_genuine_ones_kept():
    """Exactly the known-benign records are filtered; any other library warning reaches the console."""
    import transformers

    from cmiexp.train.environment import ConsoleFilter, route_library_logs

    # logging.captureWarnings(True) does nothing while an earlier call in this process is still in force,
    # and pytest swaps warnings.showwarning per test: start from the off state, so the route taken here is
    # the one route_library_logs sets up (this test failed when another test of its worker had called it).
    logging.captureWarnings(False)
    route_library_logs()
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Keep()
    handler.addFilter(ConsoleFilter())
    root = logging.getLogger()
    root.addHandler(handler)
    level = root.level
    root.setLevel(logging.INFO)  # as in a run (conf/hydra/job_logging/cmiexp.yaml)
    try:
        acc = logging.getLogger("accelerate.utils.other")
        acc.warning("[RANK 0] Removed shared tensor {'a', 'b'} while saving. This should be OK, but check")
        acc.warning("[RANK 0] something genuinely wrong while saving")
        tf = transformers.utils.logging.get_logger("transformers.modeling_utils")
        head = ("\x1b[1mBertForSequenceClassification LOAD REPORT\x1b[0m from: /m\nKey | Status | \n--+--+-\n"
                "classifier.weight | MISSING | \nclassifier.bias | MISSING | \n\nNotes:\n- MISSING:\tnew")
        tf.warning(head)
        body = head.replace("classifier.bias", "bert.encoder.layer.0.attention.self.query.weight")
        tf.warning(body)
        transformers.utils.logging.get_logger("transformers.tokenization_utils_base").warning("genuine tokenizer")
        transformers.utils.logging.get_logger("transformers.configuration_utils").info("library info: file only")
        logging.getLogger("cmiexp").info("own info")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("a genuine UserWarning", UserWarning)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        logging.captureWarnings(False)
    assert not any("Removed shared tensor" in m for m in seen)
    assert "[RANK 0] something genuinely wrong while saving" in seen
    assert body in seen and head not in seen
    assert "genuine tokenizer" in seen
    assert "own info" in seen
    assert "library info: file only" not in seen
    assert any("a genuine UserWarning" in m for m in seen)


def _console_messages(stdout: str) -> list[str]:
    return [m.group(2) for m in map(LOG_PREFIX.match, stdout.splitlines()) if m]


def test_t5_tiny_run_console_log_file_and_wandb_sync_hint(cmiexp_env, output_dir, tmp_path):
    """One T5 tiny run (fresh cache: its tokenizer is trained), stdout redirected, W&B offline."""
    from cmiexp.io import read_jsonl
    from cmiexp.train.summary import format_metric

    env = dict(cmiexp_env, CMIEXP_CACHE_DIR=str(tmp_path / "fresh-cache"))
    proc = run_cli(["model=tiny-t5", "task.num_train=96", "task.num_eval=48", "trainer.max_steps=10",
                    "trainer.batch_size=16", "trainer.log_every=1", "logger=wandb"], env)
    out, err = proc.stdout, proc.stderr
    (run_dir,) = find_run_dirs(output_dir)
    res = json.loads((run_dir / "results.json").read_text())
    assert res["status"] == "completed"
    # no library noise, no blank lines (tokenizer training), no escapes or carriage returns
    for noise in ("Removed shared tensor", "LOAD REPORT", "\r"):
        assert noise not in out + err, noise
    assert not ANSI.search(out + err)
    assert all(ln.strip() for ln in out.splitlines()), out[:2000]
    assert err.strip() == "", err[-2000:]
    # progress: one plain line per 10% with the loss; with log_every=1 each line's loss is that step's
    # loss in train_log.jsonl (the loop's own record)
    progress = [m for m in _console_messages(out) if m.startswith("train step")]
    logged = {r["step"]: r["train/loss"] for r in read_jsonl(run_dir / "train_log.jsonl")}
    assert [int(re.search(r"step (\d+)/10", m).group(1)) for m in progress] == list(range(1, 11))
    for m in progress:
        step = int(re.search(r"step (\d+)/", m).group(1))
        assert float(re.search(r"loss=([0-9.e+-]+)", m).group(1)) == pytest.approx(logged[step], rel=1e-3)
    # the summary: title, one row per metric with best and final as format_metric prints them
    lines = out.splitlines()
    assert "tiny-t5 | ce | seed 0 | status completed" in out
    rows = {r[0].rstrip(" *"): r[1:] for r in
            ([c.strip() for c in ln.strip("|").split("|")] for ln in lines if ln.startswith("|"))}
    assert rows["metric"] == [f"best (step {res['best']['step']})", f"final (step {res['final']['step']})"]
    for k, v in res["best"]["metrics"].items():
        if isinstance(v, float):
            assert rows[k] == [format_metric(v), format_metric(res["final"]["metrics"][k])], k
    assert f"run dir: {run_dir}" in lines
    # the sync hint names the real offline run folder of this run
    (hint,) = [ln for ln in lines if "wandb sync" in ln]
    sync_dir = Path(hint.split("wandb sync ", 1)[1])
    assert sync_dir.parent == run_dir / "wandb" and sync_dir.name.startswith("offline-run-")
    assert list(sync_dir.glob("*.wandb")), list(sync_dir.iterdir())
    # cmiexp.log: every line the console showed (log lines and the summary), and library INFO
    log_text = (run_dir / "cmiexp.log").read_text()
    for msg in _console_messages(out):
        assert msg in log_text, msg
    for ln in lines:
        if not LOG_PREFIX.match(ln):
            assert ln.rstrip() in log_text, ln
    assert "[accelerate.checkpointing][INFO]" in log_text and "[transformers.modeling_utils][INFO]" in log_text
    assert "Removed shared tensor" not in log_text


def test_bad_input_is_exactly_one_line_with_a_failure_record(cmiexp_env, output_dir):
    proc = run_cli(["trainer.lr=fast", "trainer.progress_bar=false"], cmiexp_env, check=False)
    shown = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    assert proc.returncode == 1
    assert shown == ["cmiexp: error: trainer.lr='fast' must be a finite number"], shown
    (run_dir,) = find_run_dirs(output_dir)
    res = json.loads((run_dir / "results.json").read_text())
    assert res["status"] == "failed" and "trainer.lr" in res["error"]
    log_text = (run_dir / "cmiexp.log").read_text()
    assert "error: trainer.lr='fast' must be a finite number" in log_text and "Traceback" in log_text


@pytest.mark.parametrize("args,key", [(["trainer.lrr=1"], "trainer.lrr"), (["-m", "seed=1,2", "nokey=3"], "nokey"),
                                      (["trainer.lr=[1"], "[1")])
def test_hydra_override_errors_are_one_line(cmiexp_env, output_dir, args, key):
    proc = run_cli(args, cmiexp_env, check=False)
    shown = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    assert proc.returncode == 1 and len(shown) == 1, shown
    assert shown[0].startswith("cmiexp: error: ") and key in shown[0]
    assert not list(output_dir.iterdir())  # refused before anything was created


def test_help_info_cfg_from_a_read_only_folder(cmiexp_env, tmp_path):
    ro = tmp_path / "read-only"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        helped = run_cli(["--help"], cmiexp_env, cwd=ro)
        info = run_cli(["--info"], cmiexp_env, cwd=ro)
        job = run_cli(["--cfg", "job", "seed=4"], cmiexp_env, cwd=ro)
        hydra = run_cli(["--cfg", "hydra", "--resolve"], cmiexp_env, cwd=ro)
    finally:
        ro.chmod(stat.S_IRWXU)
    assert "== cmiexp ==" in helped.stdout and "task: " in helped.stdout
    assert "Config search path" in info.stdout and "Defaults List" in info.stdout
    assert "seed: 4" in job.stdout
    assert f"dir: {cmiexp_env['CMIEXP_OUTPUT_DIR']}/runs/default/synthetic/tiny-bert/ce/seed0-" in hydra.stdout
    for p in (helped, info, job, hydra):
        assert p.stderr.strip() == "" and "Traceback" not in p.stdout
    # nothing written where the command was typed (as root, chmod does not stop writes: check it)
    assert not list(ro.iterdir())
    assert not list(Path(cmiexp_env["CMIEXP_OUTPUT_DIR"]).iterdir())


@pytest.mark.parametrize("args", [["--help"], ["--cfg", "job", "task=glue/rte"],
                                  ["--cfg", "hydra", "--resolve", "task=glue/rte", "seed=3"]])
def test_help_and_cfg_do_not_import_torch_or_transformers(cmiexp_env, args):
    """Printing the help or a composed config (run directory resolved) needs no deep-learning library:
    they are imported by the job that uses them (a KD student's run directory still imports its teacher's)."""
    code = ("import runpy, sys\n"
            f"sys.argv = ['cmiexp', *{args!r}]\n"
            "try:\n    runpy.run_module('cmiexp', run_name='__main__')\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print('loaded:', sorted(m for m in ('torch', 'transformers', 'datasets', 'accelerate') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], env=cmiexp_env, cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "loaded: []", proc.stdout[-500:]


@pytest.mark.parametrize("args, error", [
    (["trainer.lr=abc"], "trainer.lr='abc' must be a finite number"),
    (["objective=flownib", "objective.source=/nonexistent/run"],
     "objective.source=/nonexistent/run: no such run directory; give a finished cmiexp run directory"),
    (["objective=flownib", "objective.steps=0"], "objective.steps=0 must be >= 1"),
    (["task=glue/rte", "task.data_dir=/nonexistent/glue"],
     "task.data_dir /nonexistent/glue does not exist or is not a folder: it must hold the standard GLUE layout"),
    (["task=cot/svamp", "model=tiny-t5", "task.data_dir=/"], "task.data_dir: no folder /svamp (expected layout:"),
    (["task=cls/boolq", "task.data_dir=/nonexistent/boolq"], "task.data_dir /nonexistent/boolq does not exist"),
], ids=["training", "probe-source", "probe-setting", "glue-data-dir", "cot-data-dir", "hub-task-data-dir"])
def test_a_bad_setting_is_refused_before_torch_is_imported(cmiexp_env, tmp_path, args, error):
    """A typo in a setting, a probe's source path or a task's data folder costs about a second, not a
    library import: a job's inputs are checked before the training or probing stack is loaded, and
    the failure record is written."""
    run_dir = tmp_path / "run"
    code = ("import runpy, sys\n"
            f"sys.argv = ['cmiexp', *{args!r}, 'hydra.run.dir={run_dir}']\n"
            "try:\n    runpy.run_module('cmiexp', run_name='__main__')\nexcept SystemExit as e:\n    code = e.code\n"
            "print('exit:', code, 'loaded:', sorted(m for m in ('torch', 'transformers', 'datasets', 'accelerate') "
            "if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], env=cmiexp_env, cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout.strip().splitlines()[-1] == "exit: 1 loaded: []", proc.stdout[-500:] + proc.stderr[-2000:]
    assert f"cmiexp: error: {error}" in proc.stderr
    record = json.loads((run_dir / "results.json").read_text())
    assert record["status"] == "failed" and record["error"].startswith(error)


def test_progress_bar_with_live_loss_on_a_terminal(cmiexp_env, output_dir):
    """On a terminal (a pty here) the bar is redrawn in place with loss=...; log lines still appear."""
    import os
    import pty
    import select
    import subprocess
    import sys

    from tests.conftest import REPO

    import fcntl
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a 120-column terminal
    proc = subprocess.Popen([sys.executable, "-m", "cmiexp", "task.num_train=320", "task.num_eval=48",
                             "trainer.max_steps=40", "trainer.batch_size=8"],
                            env=cmiexp_env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], 600)
        if not ready:
            proc.kill()
            break
        try:
            data = os.read(master, 65536)
        except OSError:  # the child closed the pty
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=60) == 0
    text = b"".join(chunks).decode(errors="replace")
    bars = [seg for seg in re.split(r"[\r\n]", text) if seg.startswith("train:")]
    with_loss = [b for b in bars if re.search(r"loss=[0-9.e+-]+", b)]
    assert with_loss and "40/40" in with_loss[-1], bars[-5:]
    assert "\r" in text  # redrawn in place, not one line per update
    assert not re.search(r"train step \d+/40", text)  # no plain progress lines on a terminal
    assert "eval step 40:" in text and "run dir:" in text


def test_log_lines_carry_no_escape_codes_off_a_terminal():
    from cmiexp.train.environment import PlainFormatter

    record = logging.LogRecord("transformers.modeling_utils", logging.WARNING, __file__, 1,
                               "\x1b[1mX LOAD REPORT\x1b[0m from: /m", None, None)
    assert PlainFormatter("%(levelname)s %(message)s").format(record) == "WARNING X LOAD REPORT from: /m"
    # the console formatter keeps them only on a terminal (pytest's stdout is not one)
    assert not ANSI.search(PlainFormatter("%(message)s", keep_on_terminal=True).format(record))
