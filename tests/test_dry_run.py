"""``cmiexp ... --dry-run``: counts, memory and steps without weights, checked against real runs.

The activation figure is a measurement on meta tensors; here the same measurement on a real CPU
forward (real tensors, real weights; CPU autocast for bf16) must give the same bytes, and the
parameter counts and optimizer steps must equal those a real run records in results.json.
"""

from __future__ import annotations

import json

import pytest
import torch

from cmiexp.dry_run import build_meta_model, estimate, main, measure_forward, meta_batch, optimizer_steps
from tests.conftest import GLUE_DIR, compose_config, find_run_dirs, run_cli
from tests.test_heads import setup_model

B, S = 4, 64


def _real_saved_bytes(net, ids, att, autocast: bool) -> int:
    """Bytes autograd keeps for backward in a real forward (distinct storages, parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in params:
            saved[key] = max(saved.get(key, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = net(input_ids=ids, attention_mask=att).logits
        torch.nn.functional.cross_entropy(logits.float(), torch.zeros(ids.shape[0], dtype=torch.long))
    return sum(saved.values())


@pytest.mark.parametrize("model,head,precision", [("tiny-bert", "pooling", "no"), ("tiny-bert", "masking", "bf16"),
                                                  ("tiny-gpt2", "generation", "bf16")])
def test_meta_activation_measure_equals_a_real_forward(cache_dir, model, head, precision):
    cfg, task, tok, net, _ = setup_model(cache_dir, model, head)
    net.train()
    ids = torch.randint(5, 100, (B, S))
    if head == "masking":
        ids[:, -2] = tok.mask_token_id
    real = _real_saved_bytes(net, ids, torch.ones(B, S, dtype=torch.long), autocast=precision == "bf16")
    config = net.backbone.config if hasattr(net, "backbone") else net.config
    meta = build_meta_model(cfg, task, config, tok).train()
    assert all(p.is_meta for p in meta.parameters())

    def forward(m):
        logits = m(**meta_batch(B, S)).logits
        return torch.nn.functional.cross_entropy(logits.float(), torch.empty(B, dtype=torch.long, device="meta"))

    measured = measure_forward(meta, forward, precision, (S,))
    assert abs(measured.total_bytes - real) / real < 0.01, (measured.total_bytes, real)
    # B x heads x S x S fp32 probabilities (autocast keeps softmax in fp32), kept twice per layer (the
    # softmax output and the attention-dropout output); the tiny models have 2 layers of 2 heads
    assert measured.attention_prob_bytes == 2 * 2 * (B * 2 * S * S * 4)


def test_optimizer_steps_count_like_the_runner():
    assert optimizer_steps(2490, 32, 1, 1, 3, -1) == (78, 234, 3)
    assert optimizer_steps(2490, 32, 2, 1, 3, -1) == (39, 117, 3)     # 2 processes
    assert optimizer_steps(2490, 16, 1, 4, 1, -1) == (39, 39, 1)      # ceil(156 / 4)
    assert optimizer_steps(2490, 32, 1, 1, 3, 100) == (78, 100, 2)    # trainer.max_steps wins


def test_dry_run_equals_a_real_run(cache_dir, cmiexp_env, output_dir, monkeypatch):
    overrides = ["task=glue/rte", f"task.data_dir={GLUE_DIR}", "task.max_train_samples=40", "task.max_eval_samples=16",
                 "task.max_length=64", "model=tiny-bert", "head=masking", "peft=rocoft", "trainer.batch_size=8",
                 "trainer.grad_accum=2", "trainer.epochs=2", "trainer.save_best=false", "trainer.progress_bar=false"]
    monkeypatch.setenv("CMIEXP_CACHE_DIR", str(cache_dir))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    e = estimate(compose_config(overrides))
    run_cli(overrides, cmiexp_env)
    (run,) = find_run_dirs(output_dir)
    r = json.loads((run / "results.json").read_text())
    assert r["status"] == "completed"
    assert (e.total_params, e.trainable_params) == (r["total_params"], r["trainable_params"])
    assert e.optimizer_steps == r["global_step"] == 6 and e.epochs == r["epochs"] == 2   # ceil(ceil(40/8)/2) x 2
    assert e.num_train_samples == r["num_train_samples"] == 40
    # RoCoFT keeps every adapted layer's full fp32 weight: 2 layers x (4 x 128x128 + 2 x 128x256) x 4 bytes
    assert e.activations.rebuilt_weight_bytes == 2 * (4 * 128 * 128 + 2 * 128 * 256) * 4


def test_dry_run_cli_for_bert_base_offline(cmiexp_env, output_dir):
    """The README's example: the hub is unreachable here, so the published config is used."""
    proc = run_cli(["task=glue/rte", f"task.data_dir={GLUE_DIR}", "model=bert-base-uncased",
                    "trainer.mixed_precision=bf16", "--dry-run"], cmiexp_env)
    out = proc.stdout
    assert "published values in cmiexp/models/hub_configs.py" in out
    assert "parameters:         109,483,778 (109.5M)" in out
    assert "optimizer steps:    234 (78 per epoch x 3 epoch(s); 2,490 training examples)" in out
    assert "precision:          bf16" in out and "AdamW state           0.82 GiB" in out
    assert not any(output_dir.iterdir())  # a dry run writes nothing


def test_dry_run_bad_input_is_one_line(capsys):
    assert main(["model=bert-base-uncased", "model.name_or_path=/nonexistent/model", "task=glue/rte",
                 f"task.data_dir={GLUE_DIR}"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("cmiexp: error: cannot read the configuration of model '/nonexistent/model'")
    assert "\n" not in err
    assert main(["-m", "seed=1,2"]) == 1
    assert "--dry-run estimates one run" in capsys.readouterr().err
    assert main(["trainer.nonexistent_key=1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("cmiexp: error:") and "nonexistent_key" in err and "\n" not in err


def test_dry_run_t5_two_branches(monkeypatch):
    """DSS trains the label and the rationale branch in one step: both forwards are measured."""
    from tests.conftest import COT_DIR

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    # no network here: fall back to the published config at once instead of retrying the hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    base = ["task=cot/svamp", f"task.data_dir={COT_DIR}", "model=t5-v1_1-small", "trainer.batch_size=4",
            "task.max_input_length=64", "task.max_target_length=16"]
    dss = estimate(compose_config([*base, "objective=dss"]))
    single = estimate(compose_config([*base, "objective=cot_finetune"]))
    assert dss.model_class == "T5ForConditionalGeneration" and dss.total_params == single.total_params
    assert dss.total_params == dss.trainable_params
    assert dss.num_train_samples == 720 and dss.optimizer_steps == 3 * 180    # SVAMP: 720 train rows, batch 4
    assert dss.tokens_per_step == 4 * 2 * (64 + 16) and single.tokens_per_step == 4 * (64 + 16)
    # two graphs are alive at the backward: about twice the activations of one branch
    assert 1.9 < dss.activations.total_bytes / single.activations.total_bytes < 2.1
