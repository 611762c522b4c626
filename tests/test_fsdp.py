"""FSDP through conf/accelerate/fsdp.yaml: what the launcher sets, which layers it shards in the
large models, the FSDP2 wrapping itself on two gloo processes, and the refusal on CPU.

What can and cannot run on CPU (accelerate 1.15, torch 2.14): torch's FSDP2 (``fully_shard``)
works on CPU with gloo, but Accelerate only turns ``ACCELERATE_USE_FSDP`` into
``DistributedType.FSDP`` for accelerator processes; CPU processes become ``MULTI_CPU`` (plain
data parallel). So cmiexp's training loop cannot take its FSDP path on CPU, and it refuses such a
launch (``test_fsdp_launch_on_cpu_is_refused_with_one_line``). What is tested on CPU instead is
Accelerate's own FSDP2 preparation (``fsdp2_prepare_model``, the function ``Accelerator.prepare``
calls under FSDP2) applied with the plugin the launcher's environment describes, on 2 gloo
processes, against one unsharded process. The run loop under FSDP (results.json ``fsdp`` fields,
checkpoint/best through ``Accelerator.get_state_dict``) is exercised by
``benchmarks/gpu_check.sh`` on a GPU only.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import GLUE_DIR, REPO, find_run_dirs

# All of this module's tests on one xdist worker (pyproject: --dist loadgroup): its module-scoped
# fixtures (trained runs) are built once, not once on each worker that draws one of its tests.
pytestmark = pytest.mark.xdist_group("fsdp")

FSDP_CONFIG = REPO / "conf" / "accelerate" / "fsdp.yaml"
# model conf -> (the layer class docs/scaling.md names for it, how many of them the model has)
LARGE_MODELS = {"deberta-v3-large": ("DebertaV2Layer", 24), "gpt2-large": ("GPT2Block", 36),
                "t5-v1_1-large": ("T5Block", 48)}  # T5: 24 encoder + 24 decoder blocks


def _accelerate_launch() -> list[str]:
    exe = Path(sys.executable).with_name("accelerate")
    return [str(exe), "launch"] if exe.exists() else [sys.executable, "-m", "accelerate.commands.launch"]


@pytest.fixture(scope="module")
def launcher_env(tmp_path_factory) -> dict:
    """The FSDP variables `accelerate launch --config_file conf/accelerate/fsdp.yaml` hands its process."""
    d = tmp_path_factory.mktemp("launch")
    script = d / "dump_env.py"
    script.write_text("import json, os, sys\n"
                      "keys = [k for k in os.environ if k.startswith(('FSDP_', 'ACCELERATE_'))]\n"
                      "json.dump({k: os.environ[k] for k in keys}, open(sys.argv[1], 'w'))\n")
    out = d / "env.json"
    proc = subprocess.run([*_accelerate_launch(), "--config_file", str(FSDP_CONFIG), "--num_processes", "1",
                           "--fsdp_transformer_layer_cls_to_wrap", "BertLayer", str(script), str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def _plugin(monkeypatch, env: dict, layer_cls: str | None):
    from accelerate.utils import FullyShardedDataParallelPlugin

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    if layer_cls is None:
        monkeypatch.delenv("FSDP_TRANSFORMER_CLS_TO_WRAP", raising=False)
    else:
        monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", layer_cls)
    return FullyShardedDataParallelPlugin()  # reads the FSDP_* variables, as the Accelerator does


def test_launcher_sets_fsdp2_with_full_state_dict(launcher_env, monkeypatch):
    env = launcher_env
    assert env["ACCELERATE_USE_FSDP"] == "true"
    assert env["FSDP_VERSION"] == "2" and env["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT"
    assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    assert env["FSDP_TRANSFORMER_CLS_TO_WRAP"] == "BertLayer"  # the command-line flag wins over the file
    plugin = _plugin(monkeypatch, env, "BertLayer")
    assert plugin.fsdp_version == 2 and plugin.state_dict_type.name == "FULL_STATE_DICT"
    assert plugin.reshard_after_forward is True and plugin.transformer_cls_names_to_wrap == ["BertLayer"]


def _meta_model(name: str):
    from omegaconf import OmegaConf

    from cmiexp.models.factory import load_model, without_weights
    from cmiexp.models.hub_configs import published_config

    model_cfg = OmegaConf.load(REPO / "conf" / "model" / f"{name}.yaml")
    task = SimpleNamespace(num_labels=2, is_regression=False, id2label={0: "negative", 1: "positive"})
    with without_weights(published_config(name)):  # the real architecture on the meta device
        return load_model(model_cfg.name_or_path, model_cfg, task, kind="classification")


def _units(plugin, model) -> list[str]:
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    plugin.set_auto_wrap_policy(model)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)  # what fsdp2_prepare_model shards one by one
    return [type(m).__name__ for m in model.modules() if policy is not None and policy(m)]


@pytest.mark.parametrize("name", sorted(LARGE_MODELS))
def test_documented_layer_class_shards_every_layer_of_the_large_models(name, launcher_env, monkeypatch):
    layer_cls, n_layers = LARGE_MODELS[name]
    model = _meta_model(name)
    units = _units(_plugin(monkeypatch, launcher_env, layer_cls), model)
    assert units == [layer_cls] * n_layers
    # Without the flag Accelerate falls back to the model's _no_split_modules (docs/scaling.md):
    # GPT-2 and T5 name their block there, DeBERTa-v2 names nothing (one unit: the whole model).
    fallback = _units(_plugin(monkeypatch, launcher_env, None), _meta_model(name))
    assert fallback == ([] if name.startswith("deberta") else [layer_cls] * n_layers)


# --------------------------------------------------------------------- FSDP2 on two gloo processes
STEPS, GLOBAL_BATCH, SEQ = 3, 8, 12


def _tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, num_labels=2)
    return BertForSequenceClassification(cfg)


def _batches():
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        ids = torch.randint(5, 97, (GLOBAL_BATCH, SEQ), generator=g)
        mask = torch.ones_like(ids)
        lengths = torch.randint(4, SEQ + 1, (GLOBAL_BATCH,), generator=g)
        for i, n in enumerate(lengths.tolist()):  # right padding of varying length
            mask[i, n:] = 0
            ids[i, n:] = 0
        out.append({"input_ids": ids, "attention_mask": mask,
                    "labels": torch.randint(0, 2, (GLOBAL_BATCH,), generator=g)})
    return out


def _train(model, batches, on_step=lambda loss: float(loss)):
    """The runner's update: AdamW, clip to 1.0, one step per batch; returns the losses."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    losses = []
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(on_step(loss.detach()))
    return losses


def _fsdp_worker(rank: int, world: int, port: int, env: dict, out_dir: str) -> None:
    import torch.distributed as dist
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from accelerate.utils import DistributedType

    from cmiexp.train.distributed import distributed_fields

    os.environ.update(env)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        plugin = FullyShardedDataParallelPlugin()
        # Everything fsdp2_prepare_model reads from an Accelerator (mixed precision off, no device mesh).
        stand_in = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), mixed_precision="no",
                                   is_main_process=rank == 0, device=torch.device("cpu"), torch_device_mesh=None,
                                   distributed_type=DistributedType.FSDP)
        model = fsdp2_prepare_model(stand_in, _tiny_bert())
        fields = distributed_fields(stand_in, model)  # what results.json records for an FSDP run
        shard = GLOBAL_BATCH // world
        local = [{k: v[rank * shard:(rank + 1) * shard] for k, v in b.items()} for b in _batches()]

        def global_loss(loss):
            dist.all_reduce(loss, op=dist.ReduceOp.AVG)
            return float(loss)

        losses = _train(model, local, global_loss)
        local_numel = sum(p.to_local().numel() for p in model.parameters())
        # What Accelerator.get_state_dict does under FSDP2 with FULL_STATE_DICT (a collective).
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        sizes = [None] * world
        dist.all_gather_object(sizes, local_numel)
        if rank == 0:
            model.save_pretrained(Path(out_dir) / "best", state_dict=full, safe_serialization=True)
            (Path(out_dir) / "fsdp.json").write_text(json.dumps(
                {"losses": losses, "fields": fields, "world": dist.get_world_size(), "local_numel": sizes}))
        # Both ranks leave together: a rank that tore its gloo group down while rank 0 was still saving
        # was once aborted by gloo ("terminate called without an active exception", SIGABRT).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_fsdp2_on_two_gloo_processes_matches_one_process_and_its_checkpoint_loads_back(launcher_env, tmp_path):
    import torch.multiprocessing as mp
    from safetensors.torch import load_file
    from transformers import BertForSequenceClassification

    env = {k: v for k, v in launcher_env.items() if k.startswith("FSDP_")}
    mp.spawn(_fsdp_worker, args=(2, _free_port(), env, str(tmp_path)), nprocs=2, join=True)
    rec = json.loads((tmp_path / "fsdp.json").read_text())

    # FSDP was active on 2 processes: each BertLayer, the (untied) word embedding and the root are
    # units, and the parameters are split in two.
    assert rec["world"] == 2
    assert rec["fields"] == {"distributed_type": "FSDP", "fsdp": {
        "version": 2, "state_dict_type": "FULL_STATE_DICT", "num_units": 4,
        "unit_classes": ["BertForSequenceClassification", "BertLayer", "Embedding"]}}
    reference = _tiny_bert()
    total = sum(p.numel() for p in reference.parameters())
    assert sum(rec["local_numel"]) == total and max(rec["local_numel"]) < 0.6 * total

    # The same training on one unsharded process: same losses and final weights.
    ref_losses = _train(reference, _batches())
    assert rec["losses"] == pytest.approx(ref_losses, abs=1e-5)
    assert rec["losses"][-1] != pytest.approx(rec["losses"][0], abs=1e-4)  # training moved the model

    # The full state dict gathered on rank 0 went out as safetensors and loads back as that model.
    assert (tmp_path / "best" / "model.safetensors").is_file()
    saved = load_file(str(tmp_path / "best" / "model.safetensors"))
    loaded, info = BertForSequenceClassification.from_pretrained(str(tmp_path / "best"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ref_state = reference.state_dict()
    for k, v in loaded.state_dict().items():
        assert torch.allclose(v, ref_state[k], atol=1e-5), k
    assert set(saved) <= set(ref_state)


# --------------------------------------------------------------------- the run loop on CPU
@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="this machine has CUDA: FSDP is applied there, so there is no CPU refusal to check")
def test_fsdp_launch_on_cpu_is_refused_with_one_line(cmiexp_env, tmp_path):
    """Accelerate 1.15 runs CPU processes unsharded whatever the FSDP config says. If this test
    fails because the run completed, Accelerate has started applying FSDP on CPU: replace this
    test by a real 2-process FSDP run of cmiexp (results.json distributed_type FSDP)."""
    env = dict(cmiexp_env, CMIEXP_OUTPUT_DIR=str(tmp_path))
    cmd = [*_accelerate_launch(), "--config_file", str(FSDP_CONFIG), "--num_processes", "2",
           "--fsdp_transformer_layer_cls_to_wrap", "BertLayer", "-m", "cmiexp", "task=glue/rte",
           f"task.data_dir={GLUE_DIR}", "task.max_train_samples=16", "task.max_eval_samples=8",
           "task.max_length=32", "trainer.epochs=1", "trainer.progress_bar=false"]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0, "an FSDP launch on CPU completed: " + proc.stdout[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("cmiexp: error:")]
    assert errors and all("FSDP needs GPUs" in e and "MULTI_CPU" in e for e in errors), proc.stderr[-3000:]
    (run_dir,) = find_run_dirs(tmp_path)
    record = json.loads((run_dir / "results.json").read_text())
    assert record["status"] == "failed" and "conf/accelerate/fsdp.yaml" in record["error"]
