"""Prediction heads (pooling / masking / generation) on tiny encoders and decoders with ../shared GLUE data."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cmiexp.data import load_task
from cmiexp.data.targets import normalize_task_targets
from cmiexp.data.tokenize import encode_with_suffix, suffix_token_ids, tokenize_split
from cmiexp.errors import ConfigError, DataError
from cmiexp.models.factory import load_tokenizer
from cmiexp.models.heads import (
    InputSuffix,
    PromptHeadClassifier,
    build_classifier,
    causal_position_ids,
    input_suffix,
    last_token_positions,
    load_classifier,
    mask_positions,
)
from cmiexp.objectives.ce import supervised_loss
from tests.conftest import GLUE_DIR, compose_config, find_run_dirs, run_cli

TASKS = {
    "rte": ["task=glue/rte", f"task.data_dir={GLUE_DIR}", "task.max_train_samples=64", "task.max_eval_samples=16",
            "task.max_length=64"],
    "stsb": ["task=glue/stsb", f"task.data_dir={GLUE_DIR}", "task.max_train_samples=64", "task.max_eval_samples=16",
             "task.max_length=64"],
}


@functools.lru_cache(maxsize=None)
def shared_task(name: str):
    task = load_task(compose_config(TASKS[name]).task)
    if task.is_regression:  # the runner does this when task.normalize_targets is set
        normalize_task_targets(task, "zscore")
    return task


def tiny_path(cache_dir, model: str) -> str:
    """One tiny model per architecture for the whole session, built from the RTE subset's text
    (the same texts in every test file, so the build is shared)."""
    from cmiexp.models.tiny import ensure_tiny_model

    spec = compose_config([f"model={model}"]).model.tiny
    return str(ensure_tiny_model(cache_dir, model, spec, list(shared_task("rte").train_texts)))


def setup_model(cache_dir, model: str, head: str, task_name: str = "rte", extra=(), seed: int = 0):
    """(cfg, task, tokenizer, model, tokenised train split) as the runner builds them."""
    cfg = compose_config([*TASKS[task_name], f"model={model}", f"head={head}", *extra])
    task = shared_task(task_name)
    path = tiny_path(cache_dir, model)
    tok = load_tokenizer(path, cfg.model)
    ds = tokenize_split(task.train, task, tok, int(cfg.task.max_length), None, "train", suffix=input_suffix(cfg, tok))
    torch.manual_seed(seed)
    from cmiexp.models.heads import apply_peft

    net = apply_peft(build_classifier(path, cfg, task, tok), cfg)
    return cfg, task, tok, net, ds


def collate(tok, ds, rows, side: str | None = None):
    from transformers import DataCollatorWithPadding

    if side is not None:
        tok.padding_side = side
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in ds.column_names]
    batch = DataCollatorWithPadding(tok)([{k: ds[i][k] for k in keys} for i in rows])
    labels = torch.tensor([ds[i]["labels"] for i in rows])
    return dict(batch), labels


# ----------------------------------------------------------------------------- positions


def test_positions_by_hand_left_and_right_padding():
    M = 4
    ids = torch.tensor([
        [2, 7, 8, M, 3, 0, 0],   # right-padded, 5 tokens: mask at 3, last token at 4
        [0, 0, 2, 9, M, 3, 0],   # padded on both sides (attention decides): mask at 4, last at 5
        [0, 2, M, 8, 9, M, 3],   # left-padded, the text itself holds a mask too: the last one (5) counts
        [2, M, 3, 0, M, 0, 0],   # a mask id inside the padding is ignored: mask at 1, last at 2
    ])
    att = torch.tensor([
        [1, 1, 1, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 1, 0],
        [0, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 0, 0, 0, 0],
    ])
    assert mask_positions(ids, att, M).tolist() == [3, 4, 5, 1]
    assert last_token_positions(att).tolist() == [4, 5, 6, 2]
    assert causal_position_ids(att)[2].tolist() == [0, 0, 1, 2, 3, 4, 5]
    assert causal_position_ids(att)[0].tolist() == [0, 1, 2, 3, 4, 4, 4]
    with pytest.raises(DataError, match=r"no mask token \(id 4\) in batch rows \[1\]"):
        mask_positions(torch.tensor([[2, M, 3], [2, 7, 3]]), torch.ones(2, 3, dtype=torch.long), M)
    with pytest.raises(DataError, match="no attended token"):
        last_token_positions(torch.tensor([[1, 1], [0, 0]]))


def test_positions_in_real_padded_batches(cache_dir):
    """tiny-bert tokenizer, prompt appended, batches of different lengths padded left and right."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_path(cache_dir, "tiny-bert"))
    suffix = InputSuffix(f" The answer is {tok.mask_token}", "before_special", tok.mask_token_id)
    sid = suffix_token_ids(tok, suffix)
    texts = [["a man is here", "the dog ran far away from the house today", "yes"],
             ["he left", "nobody", "the cat sat on the mat all day long"]]
    enc = encode_with_suffix(tok, texts, sid, "before_special", 64)
    lengths = [len(x) for x in enc["input_ids"]]
    assert len(set(lengths)) == 3  # really different lengths
    for row in enc["input_ids"]:  # [CLS] a [SEP] b the answer is [MASK] [SEP]
        assert row[-1] == tok.sep_token_id and row[-2] == tok.mask_token_id and row[-1 - len(sid):-1] == sid
    L = max(lengths)
    for side in ("right", "left"):
        tok.padding_side = side
        batch = tok.pad({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}, return_tensors="pt")
        # by hand: right padding keeps each row's own end, left padding moves every end to L
        want_last = [n - 1 for n in lengths] if side == "right" else [L - 1] * 3
        want_mask = [n - 2 for n in lengths] if side == "right" else [L - 2] * 3
        assert last_token_positions(batch["attention_mask"]).tolist() == want_last
        assert mask_positions(batch["input_ids"], batch["attention_mask"], tok.mask_token_id).tolist() == want_mask


def test_suffix_survives_truncation_and_decoders_append_at_the_end(cache_dir):
    from transformers import AutoTokenizer

    bert = AutoTokenizer.from_pretrained(tiny_path(cache_dir, "tiny-bert"))
    sid = suffix_token_ids(bert, InputSuffix(f" answer {bert.mask_token}", "before_special", bert.mask_token_id))
    long = " ".join(["word"] * 200)
    enc = encode_with_suffix(bert, [[long], [long]], sid, "before_special", 32)
    ids, tt = enc["input_ids"][0], enc["token_type_ids"][0]
    assert len(ids) == 32 and ids[-2] == bert.mask_token_id and ids[-1] == bert.sep_token_id
    assert tt[-1 - len(sid):-1] == [1] * len(sid)  # the prompt joins the second segment
    with pytest.raises(ConfigError, match="leaves no room"):
        encode_with_suffix(bert, [[long]], sid, "before_special", len(sid) + 1)
    with pytest.raises(ConfigError, match="does not end with the mask token"):
        suffix_token_ids(bert, InputSuffix(f"{bert.mask_token} answer", "before_special", bert.mask_token_id))

    gpt = AutoTokenizer.from_pretrained(tiny_path(cache_dir, "tiny-gpt2"))
    gid = suffix_token_ids(gpt, InputSuffix(" The answer is", "end"))
    enc = encode_with_suffix(gpt, [[long]], gid, "end", 40)
    assert len(enc["input_ids"][0]) == 40 and enc["input_ids"][0][-len(gid):] == gid


def test_masking_needs_a_mask_token_and_bad_head_names(cache_dir):
    from transformers import AutoTokenizer

    gpt = AutoTokenizer.from_pretrained(tiny_path(cache_dir, "tiny-gpt2"))
    cfg = compose_config([*TASKS["rte"], "model=tiny-gpt2", "head=masking"])
    with pytest.raises(ConfigError, match="head=masking needs a tokenizer with a mask token.*head=generation"):
        input_suffix(cfg, gpt)
    cfg = compose_config([*TASKS["rte"], "model=tiny-gpt2", "head=generation", "head.name=bogus"])
    with pytest.raises(ConfigError, match="unknown head.name='bogus'; valid choices: pooling, masking, generation"):
        input_suffix(cfg, gpt)
    # the prompt: head.prompt, else the task's prompt
    cfg = compose_config([*TASKS["rte"], "model=tiny-gpt2", "head=generation", "head.prompt=Label:"])
    assert input_suffix(cfg, gpt).text == " Label:"


# ----------------------------------------------------------------------------- heads in forward passes


def test_generation_head_same_logits_for_left_and_right_padding(cache_dir):
    """Positions (and decoder position ids) come from each example's attention mask."""
    _, _, tok, net, ds = setup_model(cache_dir, "tiny-gpt2", "generation")
    net.eval()
    rows = [0, 5, 9]
    assert len({len(ds[i]["input_ids"]) for i in rows}) == 3
    with torch.no_grad():
        right = net(**collate(tok, ds, rows, "right")[0]).logits
        left = net(**collate(tok, ds, rows, "left")[0]).logits
        alone = torch.cat([net(**collate(tok, ds, [i], "right")[0]).logits for i in rows])
    assert right.shape == (3, 2)
    torch.testing.assert_close(left, right, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(alone, right, atol=1e-5, rtol=1e-4)


def test_masking_head_batched_equals_one_by_one(cache_dir):
    """Mask positions are found per example: a right-padded batch of different lengths gives each row
    the logits it gets alone (nothing cached from the first batch)."""
    _, _, tok, net, ds = setup_model(cache_dir, "tiny-bert", "masking")
    net.eval()
    rows = [3, 1, 7, 2]
    with torch.no_grad():
        alone = torch.cat([net(**collate(tok, ds, [i], "right")[0]).logits for i in rows])
        batched = net(**collate(tok, ds, rows, "right")[0]).logits
        first_two = net(**collate(tok, ds, rows[:2], "right")[0]).logits  # another length first
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(first_two, alone[:2], atol=1e-5, rtol=1e-4)


CASES = [("tiny-bert", "pooling"), ("tiny-bert", "masking"), ("tiny-gpt2", "pooling"), ("tiny-gpt2", "generation")]


@pytest.mark.parametrize("task_name", ["rte", "stsb"])
@pytest.mark.parametrize("model,head", CASES, ids=[f"{m}-{h}" for m, h in CASES])
def test_each_head_trains_and_loss_goes_down(cache_dir, model, head, task_name):
    _, task, tok, net, ds = setup_model(cache_dir, model, head, task_name)
    batch, labels = collate(tok, ds, list(range(16)), "right")
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=2e-3)
    net.train()
    losses = []
    for _ in range(20):  # fitting one batch of 16 ../shared examples
        out = net(**batch)
        assert out.logits.shape == (16, task.num_labels)
        loss = supervised_loss(out.logits, labels, task.is_regression)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.5 * losses[0], losses


def test_prompt_head_checkpoint_roundtrip(cache_dir, tmp_path):
    _, _, tok, net, ds = setup_model(cache_dir, "tiny-bert", "masking", "stsb")
    batch, _ = collate(tok, ds, [0, 1, 2], "right")
    with torch.no_grad():  # move the head off its initialisation
        for p in net.head.parameters():
            p.add_(0.01)
    net.eval()
    net.save_pretrained(tmp_path / "best")
    meta = json.loads((tmp_path / "best" / "cmiexp_head.json").read_text())
    assert meta["kind"] == "masking" and meta["num_labels"] == 1 and meta["mask_token_id"] == tok.mask_token_id
    assert (tmp_path / "best" / "backbone" / "config.json").is_file()
    assert not (tmp_path / "best" / "config.json").exists()  # AutoModel* on the folder fails loudly
    back = load_classifier(tmp_path / "best")
    assert isinstance(back, PromptHeadClassifier)
    back.eval()
    with torch.no_grad():
        torch.testing.assert_close(back(**batch).logits, net(**batch).logits)
        # probes read per-layer states: embeddings + one per layer of tiny-bert's 2
        hidden = back(**batch, output_hidden_states=True).hidden_states
    assert len(hidden) == 3 and hidden[-1].shape[:2] == batch["input_ids"].shape


# ----------------------------------------------------------------------------- end to end (CLI)


@pytest.mark.slow
def test_stsb_end_to_end_reports_regression_metrics_in_original_scale(cmiexp_env, output_dir):
    from transformers import AutoTokenizer

    from cmiexp.data.targets import denormalize

    args = ["experiment=flownib_reg", "task=glue/stsb", f"task.data_dir={GLUE_DIR}", "task.max_train_samples=48",
            "task.max_eval_samples=24", "task.max_length=64", "model=tiny-bert", "head=masking",
            "trainer.max_steps=3", "trainer.batch_size=16", "trainer.warmup_steps=0", "trainer.lr=1e-3",
            "trainer.progress_bar=false"]
    run_cli(args, cmiexp_env)
    (run_dir,) = find_run_dirs(output_dir)
    res = json.loads((run_dir / "results.json").read_text())
    assert res["status"] == "completed" and res["task_type"] == "regression" and res["primary_metric"] == "mse"
    best = res["best"]["metrics"]
    assert {"mse", "mae", "pearson", "spearman", "loss"} <= set(best) and best["num_samples"] == 24
    # RoCoFT column rank 3 on tiny-bert (hidden 128, intermediate 256, 2 layers) + the MLP head (128 -> 128 -> 1)
    assert res["trainable_params"] == 2 * (4 * 3 * 128 + 3 * 256 + 3 * 128) + (128 * 128 + 128 + 128 + 1)
    scale = res["target_scale"]
    assert scale["method"] == "zscore" and scale["scale"] > 0

    # Independent check of the reported numbers: predict the dev subset with checkpoint/best, map back to
    # the 0-5 scale with the recorded statistics, and compare with the raw STS-B labels.
    best_dir = run_dir / "checkpoint" / "best"
    model = load_classifier(best_dir).eval()
    tok = AutoTokenizer.from_pretrained(str(best_dir))
    cfg = compose_config(args[:1] + args[1:])
    raw = load_task(cfg.task)  # not normalised: original units
    dev = tokenize_split(raw.eval_splits["validation"], raw, tok, 64, None, "dev", suffix=input_suffix(cfg, tok))
    batch, labels = collate(tok, dev, list(range(len(dev))), "right")
    with torch.no_grad():
        pred = denormalize(model(**batch).logits.squeeze(-1).double(), scale).numpy()
    y = labels.double().numpy()
    assert 0.0 <= y.min() and y.max() <= 5.0
    assert best["mse"] == pytest.approx(float(np.mean((pred - y) ** 2)), rel=1e-4, abs=1e-5)
    assert best["mae"] == pytest.approx(float(np.mean(np.abs(pred - y))), rel=1e-4, abs=1e-5)
    assert best["pearson"] == pytest.approx(float(np.corrcoef(pred, y)[0, 1]), abs=1e-4)


# ----------------------------------------------------------------------------- reproduction script

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "reproduce_flownib_tables.sh"


def test_reproduce_script_dry_run_lists_the_grid(tmp_path):
    import subprocess

    out = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(tmp_path)], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    sweeps = [l for l in out if l.startswith("cmiexp -m")]
    # 9 classification + 6 regression tasks, each swept for encoders and for decoders
    assert len(sweeps) == (9 + 6) * 2
    assert any("experiment=flownib_cls task=cls/hellaswag model=roberta-base" in l and "head=pooling\\,masking" in l
               for l in sweeps)
    assert any("experiment=flownib_reg task=reg/wassa model=gpt2-medium" in l and "head=pooling\\,generation" in l
               for l in sweeps)
    reports = [l for l in out if l.startswith("cmiexp-report")]
    assert len(reports) == 3 and all("--group-by head" in r for r in reports)
    assert any("flownib_probe" in r and "--primary" in r for r in reports)


@pytest.mark.slow
def test_reproduce_script_smoke_mode_writes_both_reports(cmiexp_env, tmp_path):
    import subprocess

    out = tmp_path / "smoke"
    proc = subprocess.run(["bash", str(SCRIPT), "--smoke", "--out", str(out)], env=cmiexp_env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = find_run_dirs(out / "runs")
    # (RTE, STS-B) x (tiny-bert, tiny-gpt2) x (pooling, masking|generation), each trained and then probed
    assert len(runs) == 16
    results = [json.loads((r / "results.json").read_text()) for r in runs]
    assert all(r["status"] == "completed" for r in results)
    probes = [r for r in results if r["objective"] == "flownib"]
    assert len(probes) == 8 and {p["head"] for p in probes} == {"pooling", "masking", "generation"}
    cls = (out / "reports" / "flownib_cls" / "report.md").read_text()
    reg = (out / "reports" / "flownib_reg" / "report.md").read_text()
    for head in ("head=pooling", "head=masking", "head=generation"):
        assert head in cls and head in reg
    assert "RTE" in cls and "STS-B" in reg and "STS-B = mse" in reg and "mae" in reg
    assert (out / "reports" / "flownib_reg" / "report.csv").is_file()
    probe_report = (out / "reports" / "flownib_probe" / "report.md").read_text()
    assert "flownib" in probe_report and "RTE" in probe_report and "STS-B" in probe_report
