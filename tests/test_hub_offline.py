"""The hub code path, offline: ``from_pretrained(<hub id>)`` and the GLUE hub loader, end to end.

A hub cache is laid out as huggingface_hub writes it (tests/hub_cache.py) with the offline tiny
models saved under the real hub ids (bert-base-uncased, openai-community/gpt2-medium,
google/t5-v1_1-small) and the GLUE RTE files under nyu-mll/glue in the hub's own layout
(README.md with the dataset card's ``configs``/``dataset_info``, ``rte/<split>-00000-of-00001.parquet``).
Then the real ``cmiexp`` command runs with ``model=bert-base-uncased`` etc., ``HF_HUB_OFFLINE=1``
and ``HF_HOME``/``HF_HUB_CACHE`` pointing at the fixture: the unmodified loading code resolves
refs/main -> snapshots/<commit> -> blobs exactly as on a cluster with a warm cache.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import COT_DIR, GLUE_DIR, find_run_dirs, run_cli
from tests.hub_cache import folder_files, repo_folder, write_repo
from tests.test_heads import tiny_path

# All of this module's tests on one xdist worker (pyproject: --dist loadgroup): its module-scoped
# fixture (the fake hub cache) is built once, not once on each worker that draws one of its tests.
pytestmark = pytest.mark.xdist_group("hub_offline")

HUB_MODELS = {"bert-base-uncased": "tiny-bert", "openai-community/gpt2-medium": "tiny-gpt2",
              "google/t5-v1_1-small": "tiny-t5"}

# The RTE part of the nyu-mll/glue dataset card (its YAML header), as on the hub.
GLUE_README = """---
pretty_name: GLUE (General Language Understanding Evaluation benchmark)
dataset_info:
- config_name: rte
  features:
  - name: sentence1
    dtype: string
  - name: sentence2
    dtype: string
  - name: label
    dtype:
      class_label:
        names:
          '0': entailment
          '1': not_entailment
  - name: idx
    dtype: int32
configs:
- config_name: rte
  data_files:
  - split: train
    path: rte/train-*
  - split: validation
    path: rte/validation-*
  - split: test
    path: rte/test-*
---
"""


def glue_rte_files(tmp: Path) -> dict[str, bytes]:
    """README + parquet files of nyu-mll/glue's rte config, from the local GLUE TSVs."""
    import datasets

    from cmiexp.data.glue import get_task_info, read_glue_tsv

    info = get_task_info("rte")
    features = datasets.Features({"sentence1": datasets.Value("string"), "sentence2": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["entailment", "not_entailment"]),
                                  "idx": datasets.Value("int32")})
    files = {"README.md": GLUE_README.encode()}
    for split, fname, role in (("train", "train.tsv", "train"), ("validation", "dev.tsv", "dev"),
                               ("test", "test.tsv", "test")):
        ds = read_glue_tsv(GLUE_DIR / "RTE" / fname, info, role)
        ds = datasets.Dataset.from_dict({k: ds[k][:] for k in features}, features=features)
        out = tmp / f"{split}.parquet"
        ds.to_parquet(str(out))
        files[f"rte/{split}-00000-of-00001.parquet"] = out.read_bytes()
    return files


@pytest.fixture(scope="module")
def hub(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("hf")
    home, cache = root / "home", root / "home" / "hub"
    snapshots = {hub_id: write_repo(cache, hub_id, folder_files(Path(tiny_path(cache_dir, tiny))))
                 for hub_id, tiny in HUB_MODELS.items()}
    snapshots["nyu-mll/glue"] = write_repo(cache, "nyu-mll/glue", glue_rte_files(root), repo_type="dataset")
    return SimpleNamespace(home=home, cache=cache, snapshots=snapshots)


def hub_env(cmiexp_env: dict, hub) -> dict:
    env = dict(cmiexp_env)
    env.update(HF_HOME=str(hub.home), HF_HUB_CACHE=str(hub.cache), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_DATASETS_CACHE=str(hub.home / "datasets"))
    env.pop("TRANSFORMERS_CACHE", None)
    return env


def test_fixture_is_a_hub_cache(hub):
    """huggingface_hub itself reads the fixture: every repo, its main ref, its files as blobs."""
    from huggingface_hub import scan_cache_dir, try_to_load_from_cache

    info = scan_cache_dir(hub.cache)
    assert not info.warnings
    repos = {r.repo_id: r for r in info.repos}
    assert set(repos) == set(HUB_MODELS) | {"nyu-mll/glue"}
    for repo_id, snap in hub.snapshots.items():
        repo = repos[repo_id]
        (rev,) = repo.revisions
        assert set(rev.refs) == {"main"} and rev.commit_hash == snap.name
        assert all(f.blob_path.parent.name == "blobs" for f in rev.files)
        first = "README.md" if repo_id == "nyu-mll/glue" else "config.json"
        kind = "dataset" if repo_id == "nyu-mll/glue" else "model"
        assert Path(try_to_load_from_cache(repo_id, first, cache_dir=hub.cache, repo_type=kind)) == snap / first
    weights = repos["bert-base-uncased"]
    (rev,) = weights.revisions
    st = next(f for f in rev.files if f.file_name == "model.safetensors")
    assert len(st.blob_path.name) == 64  # LFS file: named by its sha256


def _count(snapshot: Path, num_labels: int) -> int:
    from transformers import AutoModelForSequenceClassification

    m = AutoModelForSequenceClassification.from_pretrained(str(snapshot), num_labels=num_labels)
    return sum(p.numel() for p in m.parameters())


QUICK = ["trainer.max_steps=2", "trainer.batch_size=8", "trainer.eval_batch_size=16", "trainer.save_best=false",
         "trainer.progress_bar=false"]


def test_encoder_and_decoder_hub_ids_train_offline(hub, cmiexp_env, output_dir):
    """model=bert-base-uncased and model=gpt2-medium through from_pretrained(<hub id>), GLUE through
    cmiexp's hub loader reading the nyu-mll/glue snapshot; roberta-base, absent from the cache,
    fails alone with the one-line hub error while the sweep goes on."""
    glue = hub.snapshots["nyu-mll/glue"]
    proc = run_cli(["-m", "task=glue/rte", f"task.hub_path={glue}", "task.max_train_samples=32",
                    "task.max_eval_samples=16", "task.max_length=64",
                    "model=bert-base-uncased,gpt2-medium,roberta-base", *QUICK], hub_env(cmiexp_env, hub), check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    runs = {json.loads((d / "results.json").read_text())["model"]: json.loads((d / "results.json").read_text())
            for d in find_run_dirs(output_dir)}
    assert set(runs) == {"bert-base-uncased", "gpt2-medium", "roberta-base"}
    for name, hub_id in (("bert-base-uncased", "bert-base-uncased"), ("gpt2-medium", "openai-community/gpt2-medium")):
        r = runs[name]
        assert r["status"] == "completed", r.get("error")
        assert r["global_step"] == 2 and r["num_train_samples"] == 32 and r["num_eval_samples"] == {"validation": 16}
        # the weights came from the snapshot of that hub id (the tiny model's exact size)
        assert r["total_params"] == _count(hub.snapshots[hub_id], 2)
        assert 0.0 <= r["final"]["metrics"]["accuracy"] <= 1.0
    failed = runs["roberta-base"]
    assert failed["status"] == "failed"
    assert "cannot load 'FacebookAI/roberta-base' from the Hugging Face hub" in failed["error"]
    assert "\n" not in failed["error"]


def test_t5_hub_id_trains_offline(hub, cmiexp_env, output_dir):
    proc = run_cli(["task=cot/svamp", f"task.data_dir={COT_DIR}", "model=t5-v1_1-small", "objective=dss",
                    "task.max_train_samples=16", "task.max_eval_samples=8", "task.max_input_length=64",
                    "task.max_target_length=32", "task.generation_max_length=8", *QUICK], hub_env(cmiexp_env, hub))
    (run,) = find_run_dirs(output_dir)
    r = json.loads((run / "results.json").read_text())
    assert r["status"] == "completed" and r["global_step"] == 2, proc.stdout[-2000:]
    assert r["test"]["num_samples"] == 8 and 0.0 <= r["test"]["accuracy"] <= 1.0
    from transformers import AutoModelForSeq2SeqLM

    snap = AutoModelForSeq2SeqLM.from_pretrained(str(hub.snapshots["google/t5-v1_1-small"]))
    assert r["total_params"] == sum(p.numel() for p in snap.parameters())


_DATASETS_PROBE = r"""
import json, sys
from huggingface_hub import hf_hub_download
import datasets
out = {"readme": hf_hub_download("nyu-mll/glue", "README.md", repo_type="dataset")}
try:
    datasets.load_dataset("nyu-mll/glue", "rte")
    out["load_dataset"] = "ok"
except Exception as e:
    out["load_dataset"] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""


def test_load_dataset_does_not_read_a_hub_snapshot_offline(hub, cmiexp_env):
    """Why the GLUE test above passes the snapshot folder as ``task.hub_path``.

    With ``HF_HUB_OFFLINE=1``, ``datasets`` (5.2 here) never looks at the hub cache:
    ``dataset_module_factory`` calls ``_raise_if_offline_mode_is_enabled()`` before its
    ``hf_hub_download`` of the dataset card, and its fallback, ``CachedDatasetModuleFactory``, reads
    only prepared Arrow data under ``HF_DATASETS_CACHE`` (``nyu-mll___glue/rte/...``, written by an
    earlier online ``load_dataset``). So ``load_dataset("nyu-mll/glue", "rte")`` fails offline even
    with the snapshot in place, while huggingface_hub finds the same files. The nearest real path,
    used above, is ``load_dataset(<snapshot folder>, "rte")``: the same dataset card ``configs``,
    ``data_files`` patterns, parquet reader and ClassLabel features, then cmiexp's unmodified hub
    loader (split names, column and label-order checks)."""
    proc = subprocess.run([sys.executable, "-c", _DATASETS_PROBE], env=hub_env(cmiexp_env, hub), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(out["readme"]) == hub.snapshots["nyu-mll/glue"] / "README.md"
    assert out["load_dataset"].startswith("ConnectionError"), out["load_dataset"]
    assert repo_folder(hub.cache, "nyu-mll/glue", "dataset").is_dir()
