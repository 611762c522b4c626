"""CoT distillation in the runner: DSS / MI-CoT objectives, the seq2seq adapter, the reproduce script.

The math checks use a toy T5 built from a config (no tokenizer, no files) and compare against
Hugging Face's own seq2seq loss and plain numpy loops. The end-to-end check runs the real
``scripts/reproduce_cot_mi.sh --smoke`` (tiny-t5 on ../shared/data/cot) once and inspects what it
wrote, re-deriving accuracy, ECE and the answer confidences independently.
"""

from __future__ import annotations

import json
import math
import os
import subprocess

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from cmiexp.errors import ConfigError
from cmiexp.objectives.base import TrainContext, build_objective
from cmiexp.objectives.cot import cot_data_spec
from cmiexp.train.adapters.cot import answer_log_prob, collate_branches, encode_branches
from tests.conftest import COT_DIR, REPO, compose_config, find_run_dirs

# --------------------------------------------------------------------------------------------
# A fixed toy batch on a toy T5


def _toy_t5(vocab: int = 24):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=vocab, d_model=16, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2, d_kv=8,
                   feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                   dropout_rate=0.0)
    return T5ForConditionalGeneration(cfg).eval()


def _toy_batch():
    g = torch.Generator().manual_seed(1)
    B = 3
    batch = {
        "idx": torch.arange(B),
        "pred_input_ids": torch.randint(2, 24, (B, 6), generator=g),
        "pred_attention_mask": torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 5 + [0]]),
        "pred_labels": torch.tensor([[5, 7, 1], [9, 1, -100], [4, 1, -100]]),
        "expl_input_ids": torch.randint(2, 24, (B, 6), generator=g),
        "expl_attention_mask": torch.tensor([[1] * 6, [1] * 6, [1] * 3 + [0] * 3]),
        "expl_labels": torch.tensor([[3, 8, 8, 2, 1], [6, 1, -100, -100, -100], [2, 11, 12, 1, -100]]),
    }
    batch["pred_input_ids"] *= batch["pred_attention_mask"]  # pad id 0 where masked
    batch["expl_input_ids"] *= batch["expl_attention_mask"]
    return batch


def _objective(name: str, **kw):
    # The objective as composed from conf/objective/<name>.yaml (its defaults live there), then kw.
    base = OmegaConf.to_container(compose_config([f"objective={name}"]).objective)
    cfg = OmegaConf.create({"objective": {**base, **kw}})
    ctx = TrainContext(accelerator=None, model=None, task=None, cfg=cfg, run_dir=None)
    return build_objective(cfg, ctx), ctx


def _np_softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def _np_reference_mi(pred, expl):
    """The public code's term with plain loops: max over ALL positions of softmax rows, then
    cross-entropy with the explain vector as logits (a second softmax) and soft target s."""
    B, _, V = pred.shape
    total = 0.0
    for b in range(B):
        s = np.max([_np_softmax(row) for row in pred[b]], axis=0)
        e = np.max([_np_softmax(row) for row in expl[b]], axis=0)
        log_soft_e = np.log(_np_softmax(e))
        total += -sum(s[v] * log_soft_e[v] for v in range(V))
    return total / B


def test_dss_loss_is_hf_seq2seq_loss_and_cot_mi_beta0_is_dss_exactly():
    model, batch = _toy_t5(), _toy_batch()
    with torch.no_grad():
        # Hugging Face's own seq2seq loss (its label shift and -100 handling), per branch.
        hf_pred = model(input_ids=batch["pred_input_ids"], attention_mask=batch["pred_attention_mask"],
                        labels=batch["pred_labels"]).loss
        hf_expl = model(input_ids=batch["expl_input_ids"], attention_mask=batch["expl_attention_mask"],
                        labels=batch["expl_labels"]).loss
        dss, ctx = _objective("dss", alpha=0.5)
        dss_loss, logs = dss.compute_loss(model, batch, ctx)
        assert math.isclose(float(dss_loss), 0.5 * float(hf_pred) + 0.5 * float(hf_expl), rel_tol=1e-5)
        assert math.isclose(logs["label_loss"], float(hf_pred), rel_tol=1e-5)
        assert math.isclose(logs["rationale_loss"], float(hf_expl), rel_tol=1e-5)
        dss3, _ = _objective("dss", alpha=0.3)
        assert math.isclose(float(dss3.compute_loss(model, batch, ctx)[0]),
                            0.3 * float(hf_pred) + 0.7 * float(hf_expl), rel_tol=1e-5)

        mi0, _ = _objective("cot_mi", alpha=0.5, beta=0.0)
        mi0_loss, mi0_logs = mi0.compute_loss(model, batch, ctx)
        assert torch.equal(mi0_loss, dss_loss), "beta=0 must give the DSS loss exactly"
        assert mi0_logs["mi"] > 0

        # beta=0.1, reference variant: DSS + 0.1 * the numpy reference term on the same logits.
        parts = mi0.branch_losses(model, batch, ctx)
        ref = _np_reference_mi(parts["pred_logits"].double().numpy(), parts["expl_logits"].double().numpy())
        assert math.isclose(mi0_logs["mi"], ref, rel_tol=1e-5)
        mi1, _ = _objective("cot_mi", beta=0.1, mi_variant="reference")
        assert math.isclose(float(mi1.compute_loss(model, batch, ctx)[0]), float(dss_loss) + 0.1 * ref, rel_tol=1e-5)
        # The masked ablation is a different number (padding excluded, no second softmax).
        mim, _ = _objective("cot_mi", beta=0.1, mi_variant="masked")
        assert abs(mim.compute_loss(model, batch, ctx)[1]["mi"] - ref) > 1e-3


def test_mi_gradient_reaches_only_the_explain_branch():
    model, batch = _toy_t5(), _toy_batch()
    obj, ctx = _objective("cot_mi", beta=0.1)

    # 1) The MI term alone: no gradient path into the predict logits, a real one into explain.
    parts = obj.branch_losses(model, batch, ctx)
    parts["pred_logits"].retain_grad()
    parts["expl_logits"].retain_grad()
    parts["mi"].backward()
    g_pred = parts["pred_logits"].grad
    assert g_pred is None or float(g_pred.abs().max()) == 0.0
    assert float(parts["expl_logits"].grad.abs().max()) > 0
    assert any(p.grad is not None and float(p.grad.abs().max()) > 0 for p in model.parameters())

    # 2) In the full objective: d(loss)/d(predict logits) is the same as for DSS, the explain
    #    logits' gradient differs by the MI term. The lm_head output of each forward is captured.
    def logit_grads(objective):
        model.zero_grad()
        captured = []

        def hook(_module, _inputs, out):
            out.retain_grad()
            captured.append(out)

        h = model.lm_head.register_forward_hook(hook)
        try:
            loss, _ = objective.compute_loss(model, batch, ctx)
            loss.backward()
        finally:
            h.remove()
        assert len(captured) == 2  # predict, then explain
        return [c.grad.clone() for c in captured]

    dss, _ = _objective("dss")
    pred_mi, expl_mi = logit_grads(obj)
    pred_dss, expl_dss = logit_grads(dss)
    assert torch.allclose(pred_mi, pred_dss, atol=1e-7, rtol=0)
    assert float((expl_mi - expl_dss).abs().max()) > 1e-6


def test_objective_config_errors_are_clear():
    with pytest.raises(ConfigError, match="objective.alpha"):
        _objective("dss", alpha=1.5)
    with pytest.raises(ConfigError, match="objective.beta"):
        _objective("cot_mi", beta=-0.1)
    with pytest.raises(ConfigError, match="mi_variant"):
        _objective("cot_mi", mi_variant="exact")
    with pytest.raises(ConfigError, match="objective=ce cannot train a chain-of-thought task"):
        cot_data_spec(OmegaConf.create({"name": "ce"}))
    glue = OmegaConf.create({"objective": {"name": "dss"}, "task": {"name": "glue/rte", "loader": "glue"}})
    with pytest.raises(ConfigError, match="task=glue/rte is not one"):
        build_objective(glue, TrainContext(accelerator=None, model=None, task=None, cfg=glue, run_dir=None))


def test_cot_task_needs_a_seq2seq_model():
    from types import SimpleNamespace

    from cmiexp.train.adapters.cot import CotAdapter
    from tests.conftest import compose_config

    cfg = compose_config(["task=cot/svamp", "objective=dss", f"task.data_dir={COT_DIR}"])  # default model: tiny-bert
    with pytest.raises(ConfigError, match=r"model=tiny-bert \(family encoder\) is not an encoder-decoder"):
        CotAdapter().setup(SimpleNamespace(cfg=cfg, accelerator=None))


def test_data_spec_of_each_objective():
    spec = {n: cot_data_spec(OmegaConf.create({"name": n})) for n in ("dss", "cot_mi", "cot_finetune", "cot_distill")}
    assert spec["dss"].rationale and spec["dss"].predict_prefix == "predict: " and spec["dss"].label_source is None
    assert spec["cot_mi"] == spec["dss"]
    assert not spec["cot_finetune"].rationale and spec["cot_finetune"].predict_prefix == ""
    assert spec["cot_finetune"].label_source == "gold" and spec["cot_distill"].label_source == "llm"
    assert not spec["cot_distill"].rationale and spec["cot_distill"].predict_prefix == ""


# --------------------------------------------------------------------------------------------
# Batches and confidences


class _WordTokenizer:
    """Stand-in tokenizer: one id per whitespace word (its length + 2), EOS=1 appended."""

    def __call__(self, texts, truncation=True, max_length=None):
        ids = [[len(w) + 2 for w in t.split()][: max_length - 1] + [1] for t in texts]
        return {"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids]}


def test_encode_and_collate_two_branches_and_the_baseline():
    rows = {"idx": [4, 9], "input": ["a bb", "ccc"], "target": ["x", "yy zz"], "rationale": ["r", ""]}
    both = encode_branches(rows, _WordTokenizer(), "predict: ", True, True, max_input_length=8, max_target_length=2)
    # "predict:" has 8 letters -> id 10; "explain:" -> 10 as well; a -> 3, bb -> 4, ccc -> 5.
    assert both["pred_input_ids"] == [[10, 3, 4, 1], [10, 5, 1]]
    assert both["expl_input_ids"] == [[10, 3, 4, 1], [10, 5, 1]]
    assert both["pred_labels"] == [[3, 1], [4, 1]]  # truncated to 2 tokens, EOS kept
    assert both["expl_labels"] == [[3, 1], [1]]  # an empty rationale is just EOS
    batch = collate_branches([{k: v[i] for k, v in both.items()} for i in range(2)], pad_token_id=0)
    assert batch["idx"].tolist() == [4, 9]
    assert batch["pred_input_ids"].tolist() == [[10, 3, 4, 1], [10, 5, 1, 0]]
    assert batch["pred_attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch["expl_labels"].tolist() == [[3, 1], [1, -100]]
    assert batch["pred_labels"].dtype == torch.long

    base = encode_branches(rows, _WordTokenizer(), "", False, True, max_input_length=8, max_target_length=4)
    assert set(base) == {"idx", "pred_input_ids", "pred_attention_mask", "pred_labels"}
    assert base["pred_input_ids"] == [[3, 4, 1], [5, 1]]  # no prefix
    evals = encode_branches(rows, _WordTokenizer(), "predict: ", False, False, max_input_length=8, max_target_length=4)
    assert set(evals) == {"idx", "pred_input_ids", "pred_attention_mask"}


def test_answer_log_prob_stops_at_the_first_eos():
    lp = torch.tensor([[-0.5, -0.25, -3.0, -4.0], [-0.1, -0.2, -0.3, -0.4], [-1.0, -2.0, -0.5, -0.5]])
    tokens = torch.tensor([[7, 1, 0, 0], [5, 6, 7, 8], [1, 1, 1, 9]])  # EOS = 1
    got = answer_log_prob(lp, tokens, eos_token_id=1)
    # row 0: -0.5 + -0.25 (EOS included, padding after it left out); row 1: no EOS, all four;
    # row 2: EOS first, so only that step.
    assert torch.allclose(got, torch.tensor([-0.75, -1.0, -1.0]))


# --------------------------------------------------------------------------------------------
# End to end: the reproduce script's smoke mode


def _np_ece(conf, correct, n_bins=10):
    """Equal-width ECE with plain loops: bin k holds ((k-1)/n, k/n], 0 goes to the first bin."""
    total = 0.0
    for k in range(1, n_bins + 1):
        members = [i for i, c in enumerate(conf) if (k - 1) / n_bins < c <= k / n_bins or (k == 1 and c == 0)]
        if members:
            acc = sum(correct[i] for i in members) / len(members)
            avg = sum(conf[i] for i in members) / len(members)
            total += len(members) * abs(acc - avg)
    return total / len(conf)


def _read_jsonl_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@torch.no_grad()
def _recompute_confidences(run_dir, inputs):
    """Greedy answers and their probabilities from checkpoint/best, independently of the adapter:
    HF generate for the tokens, then a teacher-forced forward pass over them for the
    probabilities (product over generated tokens up to and including the first EOS)."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    best = run_dir / "checkpoint" / "best"
    tok = AutoTokenizer.from_pretrained(best)
    model = AutoModelForSeq2SeqLM.from_pretrained(best).eval()
    enc = tok(["predict: " + x for x in inputs], truncation=True, max_length=96, padding=True, return_tensors="pt")
    seqs = model.generate(**enc, max_new_tokens=12, do_sample=False, num_beams=1)
    gen = seqs[:, 1:]
    logits = model(**enc, decoder_input_ids=seqs[:, :-1]).logits.double()
    logp = torch.log_softmax(logits, dim=-1)
    texts, confs = tok.batch_decode(gen, skip_special_tokens=True), []
    for b in range(gen.shape[0]):
        s = 0.0
        for t in range(gen.shape[1]):
            s += float(logp[b, t, gen[b, t]])
            if int(gen[b, t]) == tok.eos_token_id:
                break
        confs.append(math.exp(s))
    return [t.strip() for t in texts], confs


@pytest.mark.slow
def test_reproduce_script_smoke_end_to_end(cmiexp_env, output_dir):
    from cmiexp.data.cot import answer_correct, read_rows

    env = dict(cmiexp_env, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(REPO / "scripts" / "reproduce_cot_mi.sh"), "--smoke",
                           "--out", str(output_dir)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # The report table: one row per objective, one column per task.
    for row in ("tiny-t5 / dss", "tiny-t5 / cot_mi", "tiny-t5 / cot_finetune", "tiny-t5 / cot_distill"):
        assert any(line.startswith(f"| {row} |") for line in proc.stdout.splitlines()), row
    assert "| Method | cot/cqa | cot/svamp |" in proc.stdout
    assert (output_dir / "runs" / "cot_mi_smoke" / "report.md").is_file()

    runs = find_run_dirs(output_dir / "runs" / "cot_mi_smoke")
    assert len(runs) == 8
    svamp_test = read_rows(COT_DIR / "svamp" / "svamp_test.json")
    for run_dir in runs:
        res = json.loads((run_dir / "results.json").read_text())
        assert res["status"] == "completed" and res["primary_metric"] == "accuracy", run_dir
        assert res["task_type"] == "generation" and res["global_step"] == 8
        dataset = res["task"].split("/")[1]
        best = res["best"]["metrics"]
        assert 0.0 <= best["accuracy"] <= 1.0 and 0.0 <= best["ece"] <= 1.0 and best["num_samples"] == 12
        test = res["test"]
        assert test["model"] == "best" and test["step"] == res["best"]["step"] and test["num_samples"] == 12
        expect = {"dss": ("llm", True, True), "cot_mi": ("llm", True, True),
                  "cot_finetune": ("gold", False, False), "cot_distill": ("llm", False, False)}[res["objective"]]
        assert (res["cot"]["label_source"], res["cot"]["task_prefix"], res["cot"]["rationale_branch"]) == expect

        preds = _read_jsonl_rows(run_dir / "predictions.jsonl")
        assert len(preds) == 12 and [p["idx"] for p in preds] == list(range(12))
        assert set(preds[0]) == {"idx", "input", "gold", "prediction", "correct", "confidence"}
        for p in preds:
            assert p["correct"] == answer_correct(dataset, p["prediction"], p["gold"])
            assert 0.0 <= p["confidence"] <= 1.0
            if dataset == "svamp":  # gold labels are the test file's rows, in order (never the teacher's)
                assert p["gold"] == svamp_test[p["idx"]]["label"]
        correct = [int(p["correct"]) for p in preds]
        conf = [p["confidence"] for p in preds]
        assert math.isclose(test["accuracy"], sum(correct) / 12)
        assert math.isclose(test["ece"], _np_ece(conf, correct), abs_tol=1e-12)
        assert math.isclose(test["mean_confidence"], sum(conf) / 12)

    # The confidences and answers match an independent recomputation from the saved best model.
    (svamp_dss,) = [r for r in runs if r.parts[-5:-1] == ("cot", "svamp", "tiny-t5", "dss")]
    preds = _read_jsonl_rows(svamp_dss / "predictions.jsonl")
    texts, confs = _recompute_confidences(svamp_dss, [p["input"] for p in preds])
    assert [p["prediction"] for p in preds] == texts
    for p, c in zip(preds, confs):
        assert math.isclose(p["confidence"], c, rel_tol=1e-4, abs_tol=1e-7)
    assert os.path.isfile(svamp_dss / "checkpoint" / "latest" / "trainer_state.json")
