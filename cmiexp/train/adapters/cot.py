"""Adapter for chain-of-thought distillation tasks (``task.loader=cot``) on seq2seq students.

Data (see ``cmiexp.data.cot``) becomes two tokenised branches per training row:

- predict: ``"predict: " + input -> target`` (the label; ``target`` follows the label source)
- explain: ``"explain: " + input -> rationale`` (the teacher's chain of thought)

truncated to ``task.max_input_length`` / ``task.max_target_length`` tokens. A batch holds
``pred_input_ids, pred_attention_mask, pred_labels`` and, when the objective trains the
rationale branch, ``expl_input_ids, expl_attention_mask, expl_labels``, plus ``idx``; inputs
are padded with the pad token, labels with -100. The DSS baselines (``cot_finetune``,
``cot_distill``) get the raw input without prefix and the label branch only; which branches,
prefix and label source an objective uses is ``cmiexp.objectives.cot.cot_data_spec``.

Evaluation is greedy generation from the predict branch (at most ``task.generation_max_length``
new tokens, default 64), scored against the GOLD label with ``answer_correct`` (SVAMP: equation
value through the safe evaluator; others: exact text match). Metrics per split:

- ``accuracy``: fraction of exact matches (the primary metric; model selection uses ``valid``).
- ``ece``: expected calibration error, 10 equal-width bins (``cmiexp.metrics``), with
  confidence = the probability the student gives its whole greedy answer, i.e. the product of
  the softmax probabilities of the generated tokens up to and including the first EOS
  (``exp`` of the summed token log-probabilities; raw logits, no sampling processors), and
  correct = the exact-match result above.
- ``mean_confidence``: mean of that confidence.

At the end (``finalize``) the best checkpoint (``checkpoint/best``; the final model when
``trainer.save_best=false``) is evaluated once on ``test``: ``results["test"]`` gets the test
metrics and ``predictions.jsonl`` one line per test row (idx, input, gold, prediction, correct,
confidence). The test split never influences training or model selection.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from pathlib import Path

import torch

from cmiexp.checks import POSITIVE_INT, check_number
from cmiexp.errors import ConfigError, DataError

log = logging.getLogger("cmiexp")

IGNORE_INDEX = -100
PREDICTIONS = "predictions.jsonl"
ECE_BINS = 10


# ---------------------------------------------------------------------------------------------
# Pure helpers (tested on their own)


def encode_branches(rows: dict, tokenizer, predict_prefix: str, with_rationale: bool, with_targets: bool,
                    max_input_length: int, max_target_length: int) -> dict[str, list]:
    """Tokenise a column dict (``input``, ``target``, ``rationale``, ``idx``) into branch columns."""
    from cmiexp.data.cot import EXPLAIN_PREFIX

    def enc(texts, max_len):
        return tokenizer(list(texts), truncation=True, max_length=max_len)

    out: dict[str, list] = {"idx": list(rows["idx"])}
    pred = enc([predict_prefix + x for x in rows["input"]], max_input_length)
    out["pred_input_ids"], out["pred_attention_mask"] = pred["input_ids"], pred["attention_mask"]
    if with_targets:
        out["pred_labels"] = enc(rows["target"], max_target_length)["input_ids"]
    if with_rationale:
        expl = enc([EXPLAIN_PREFIX + x for x in rows["input"]], max_input_length)
        out["expl_input_ids"], out["expl_attention_mask"] = expl["input_ids"], expl["attention_mask"]
        out["expl_labels"] = enc(rows["rationale"], max_target_length)["input_ids"]
    return out


def collate_branches(features: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad every branch to its longest row in the batch: ids with ``pad_token_id``,
    attention masks with 0, labels with -100 (ignored by the loss)."""
    batch: dict[str, torch.Tensor] = {"idx": torch.tensor([int(f["idx"]) for f in features], dtype=torch.long)}
    for key in features[0]:
        if key == "idx":
            continue
        pad = IGNORE_INDEX if key.endswith("_labels") else 0 if key.endswith("_attention_mask") else pad_token_id
        seqs = [list(f[key]) for f in features]
        width = max(len(s) for s in seqs)
        batch[key] = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], dtype=torch.long)
    return batch


def answer_log_prob(token_logprobs: torch.Tensor, tokens: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Sum of the generated tokens' log-probabilities up to and including the first EOS.

    ``token_logprobs [B, S]``: log p of the token generated at each step; ``tokens [B, S]``:
    those tokens. Steps after the first EOS (padding added by ``generate``) are left out; a
    sequence that never emits EOS counts all S steps."""
    is_eos = (tokens == eos_token_id).long()
    # Steps strictly after the first EOS have at least one EOS before them.
    eos_before = torch.cumsum(is_eos, dim=1) - is_eos
    keep = eos_before == 0
    return (token_logprobs * keep).sum(dim=1)


# ---------------------------------------------------------------------------------------------


def _length(task_cfg, key: str) -> int:
    """A CoT length setting; conf/task/cot/*.yaml is its one home (no default here)."""
    if key not in task_cfg:
        raise ConfigError(f"task.{key} is not set (conf/task/cot/*.yaml sets it for every chain-of-thought task)")
    return check_number(f"task.{key}", task_cfg[key], POSITIVE_INT)


class CotAdapter:
    """Seq2seq chain-of-thought distillation: two-branch batches, generation-based evaluation."""

    task_type = "generation"

    # ------------------------------------------------------------------ setup
    def setup(self, run):
        from omegaconf import OmegaConf

        from cmiexp.data import load_task
        from cmiexp.models.factory import default_cache_dir, load_model, load_tokenizer, resolve_model_path
        from cmiexp.objectives.cot import cot_data_spec
        from cmiexp.train.init_from import load_init_weights, resolve_init

        cfg, acc = run.cfg, run.accelerator
        family = cfg.model.get("family")
        if family != "seq2seq":
            raise ConfigError(f"model={cfg.model.name} (family {family}) is not an encoder-decoder; chain-of-thought tasks need "
                              "a seq2seq model (model=tiny-t5, t5-v1_1-small, t5-v1_1-base or t5-v1_1-large)")
        peft = str(cfg.peft.name or "none")
        if peft != "none":  # this adapter trains every weight; do not record a PEFT run that is not one
            raise ConfigError(f"peft={peft} is not implemented for chain-of-thought (seq2seq) tasks; use peft=none")
        self.spec = cot_data_spec(cfg.objective)
        task_cfg = cfg.task
        if self.spec.label_source is not None:
            if task_cfg.get("label_source") != self.spec.label_source:
                log.info("objective=%s trains on %s labels (task.label_source=%s is overridden)",
                         cfg.objective.name, self.spec.label_source, task_cfg.get("label_source"))
            task_cfg = OmegaConf.merge(task_cfg, {"label_source": self.spec.label_source})
        self.max_input = _length(cfg.task, "max_input_length")
        self.max_target = _length(cfg.task, "max_target_length")
        self.gen_len = _length(cfg.task, "generation_max_length")
        cache_dir = default_cache_dir(cfg.paths)
        with acc.main_process_first():  # rank 0 builds the tiny model (if any) first
            task = load_task(task_cfg)
            if task.train is None or len(task.train) == 0:
                raise DataError(f"task={task.name} has no training data (task.data_dir={cfg.task.get('data_dir')})")
            path = resolve_model_path(cfg.model, task, cache_dir)
            init = resolve_init(cfg, task, kind="seq2seq")  # trainer.init_from, checked before training
            tokenizer = load_tokenizer(str(init.checkpoint_dir) if init else path, cfg.model)
        for alias in ("valid", "test"):
            if len(getattr(task, alias)) == 0:
                raise DataError(f"task={task.name} split {alias!r} is empty")
        if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
            raise ConfigError(f"model={cfg.model.name}: its tokenizer needs EOS and pad tokens for generation")

        enc = dict(tokenizer=tokenizer, predict_prefix=self.spec.predict_prefix,
                   max_input_length=self.max_input, max_target_length=self.max_target)
        train = self._dataset(encode_branches(task.train[:], with_rationale=self.spec.rationale,
                                              with_targets=True, **enc))
        self.raw = {alias: {int(i): (x, g) for i, x, g in zip(d["idx"][:], d["input"][:], d["label"][:])}
                    for alias, d in (("valid", task.valid), ("test", task.test))}
        evals = {alias: self._dataset(encode_branches(getattr(task, alias)[:], with_rationale=False,
                                                      with_targets=False, **enc))
                 for alias in ("valid", "test")}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(cfg.seed))
            model = load_model(path, cfg.model, task, kind="seq2seq", tokenizer=tokenizer)
        if init is not None:
            load_init_weights(model, init, lambda d: load_model(d, cfg.model, task, kind="seq2seq"))
        run.task, run.tokenizer, run.model_path = task, tokenizer, path
        run.train_ds = train
        run.eval_ds = {"valid": evals["valid"]}  # model selection: valid only, never test
        self.test_ds = evals["test"]
        run.model = model
        run.input_keys = {"pred_input_ids", "pred_attention_mask", "pred_labels"}

    @staticmethod
    def _dataset(columns: dict):
        from datasets import Dataset

        return Dataset.from_dict(columns)

    def loaders(self, run):
        from torch.utils.data import DataLoader

        t = run.cfg.trainer
        pad = run.tokenizer.pad_token_id

        def make(ds, shuffle, bs):
            g = torch.Generator()
            g.manual_seed(int(run.cfg.seed))
            return DataLoader(ds, batch_size=bs, shuffle=shuffle, collate_fn=lambda f: collate_branches(f, pad),
                              num_workers=int(t.num_workers), generator=g)

        run.train_loader = make(run.train_ds, True, int(t.batch_size))
        run.full_train_loader = make(run.train_ds, False, int(t.eval_batch_size))
        run.eval_loaders = {a: make(d, False, int(t.eval_batch_size)) for a, d in run.eval_ds.items()}
        self.test_loader = make(self.test_ds, False, int(t.eval_batch_size))

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def predict(self, run, model, loader) -> list[dict]:
        """Greedy answers of ``model`` on every row of ``loader`` (gathered over processes, in order)."""
        acc, tok = run.accelerator, run.tokenizer
        net = acc.unwrap_model(model)
        was_training = net.training
        net.eval()
        rows: list[dict] = []
        for batch in loader:
            out = net.generate(input_ids=batch["pred_input_ids"], attention_mask=batch["pred_attention_mask"],
                               max_new_tokens=self.gen_len, do_sample=False, num_beams=1,
                               return_dict_in_generate=True, output_logits=True,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            tokens = out.sequences[:, -len(out.logits):]  # drop the decoder start token
            # Per-step log-softmax keeps memory at [B, V] (full vocab x 64 steps is large for T5).
            token_lp = torch.stack([step.float().log_softmax(-1).gather(1, tokens[:, i:i + 1]).squeeze(1)
                                    for i, step in enumerate(out.logits)], dim=1)
            logp = answer_log_prob(token_lp, tokens, tok.eos_token_id)
            tokens = acc.pad_across_processes(tokens.contiguous(), dim=1, pad_index=tok.pad_token_id)
            tokens, logp, idx = acc.gather_for_metrics((tokens, logp, batch["idx"]))
            texts = tok.batch_decode(tokens.cpu().tolist(), skip_special_tokens=True)
            for i, text, lp in zip(idx.cpu().tolist(), texts, logp.cpu().tolist()):
                rows.append({"idx": int(i), "prediction": text.strip(), "confidence": min(1.0, math.exp(lp))})
        net.train(was_training)
        return rows

    def score(self, run, alias: str, rows: list[dict]) -> dict:
        """Attach input/gold/correct to prediction rows (in place) and return the split's metrics."""
        from cmiexp.metrics import expected_calibration_error

        if not rows:
            raise DataError(f"task={run.task.name}: no predictions on split {alias!r}")
        raw = self.raw[alias]
        for r in rows:
            x, gold = raw[r["idx"]]
            r.update(input=x, gold=gold, correct=bool(run.task.is_correct(r["prediction"], gold)))
        correct = [r["correct"] for r in rows]
        conf = [r["confidence"] for r in rows]
        # The share of the most common generated text: near 1 the model writes one answer for every
        # input (a collapsed run, flagged by the runner like a one-class classifier).
        top = Counter(r["prediction"] for r in rows).most_common(1)[0][1]
        return {"accuracy": sum(correct) / len(rows),
                "ece": expected_calibration_error(conf, correct, ECE_BINS),
                "mean_confidence": sum(conf) / len(conf),
                "top_prediction_share": top / len(rows),
                "num_samples": len(rows)}

    def evaluate(self, run, model, eval_loaders) -> dict:
        out: dict = {}
        for i, (alias, loader) in enumerate(eval_loaders.items()):
            m = self.score(run, alias, self.predict(run, model, loader))
            prefix = "" if i == 0 else f"{alias}_"
            out.update({f"{prefix}{k}": v for k, v in m.items()})
        return out

    def finalize(self, run, model, results: dict) -> None:
        """Test-set evaluation of the selected model; writes predictions.jsonl and results["test"]."""
        from transformers import AutoModelForSeq2SeqLM

        from cmiexp.io import atomic_write_text

        acc = run.accelerator
        best_dir = Path(run.run_dir) / "checkpoint" / "best"
        which, net = "final", model
        if run.cfg.trainer.save_best and (best_dir / "config.json").exists():
            # A separate copy: the trained model stays as it is for the final checkpoint.
            which, net = "best", AutoModelForSeq2SeqLM.from_pretrained(str(best_dir)).to(acc.device)
            best_step = json.loads((best_dir / "best_info.json").read_text()).get("step") \
                if (best_dir / "best_info.json").exists() else None
        loader = acc.prepare(self.test_loader)
        rows = self.predict(run, net, loader)
        metrics = self.score(run, "test", rows)
        if net is not model:
            del net
        results["test"] = {**metrics, "model": which,
                           **({"step": best_step} if which == "best" else {})}
        results["cot"] = {"label_source": run.task.label_source, "task_prefix": self.spec.task_prefix,
                          "rationale_branch": self.spec.rationale, "generation_max_length": self.gen_len,
                          "teacher_accuracy": dict(run.task.teacher_accuracy),
                          "parse_failures": dict(run.task.parse_failures)}
        if acc.is_main_process:
            keys = ("idx", "input", "gold", "prediction", "correct", "confidence")
            text = "".join(json.dumps({k: r[k] for k in keys}, ensure_ascii=False) + "\n" for r in rows)
            atomic_write_text(Path(run.run_dir) / PREDICTIONS, text)
        log.info("test (%s model): accuracy=%.4f ece=%.4f (%d rows)", which, metrics["accuracy"], metrics["ece"],
                 metrics["num_samples"])
