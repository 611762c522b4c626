#!/usr/bin/env python
"""The per-model table of the README: every hub model of conf/model/ built at its real size on
the meta device (no weights) from cmiexp/models/hub_configs.py, through the runner's own model
code (build_classifier + apply_peft; load_model for T5).

Columns: the published size and its source, our count of the module the publication counts
(the backbone; T5: the whole encoder-decoder), and the trainable parameters of a 2-class
classifier under peft=none / lora (rank 8, all linear layers) / rocoft (3 columns) with the
default head (pooling) and the prompt head (masking for encoders with a mask token, generation
for decoders).

    python scripts/hub_model_table.py               # Markdown table (pasted into README.md)
    python scripts/hub_model_table.py --check-hub   # also compare each entry with the hub's config.json (needs network)
"""

from __future__ import annotations

import argparse
import sys
from types import SimpleNamespace


def _compose(overrides):
    from cmiexp.dry_run import compose

    return compose(overrides)


def rows(num_labels: int = 2):
    from cmiexp.dry_run import build_meta_model, tokenizer_ids
    from cmiexp.models.factory import count_parameters, load_model, without_weights
    from cmiexp.models.hub_configs import MODELS, published_config

    task = SimpleNamespace(num_labels=num_labels, is_regression=False,
                           id2label={i: str(i) for i in range(num_labels)}, train=None, name="stand-in")
    for name, entry in MODELS.items():
        config = published_config(name)
        kind = "seq2seq" if entry.counted == "seq2seq" else "base"
        with without_weights(config):
            ours = count_parameters(load_model("<meta>", _compose([f"model={name}"]).model, kind=kind))[1]
        row = {"name": name, "hub_id": entry.hub_id, "published": entry.published_params, "ours": ours,
               "source": entry.params_source, "note": entry.note, "trainable": {}}
        if entry.family != "seq2seq":
            prompt = "generation" if entry.family == "decoder" else ("masking" if entry.mask_token_id is not None else None)
            for head in ["pooling"] + ([prompt] if prompt else []):
                for peft in ("none", "lora", "rocoft"):
                    cfg = _compose([f"model={name}", f"head={head}", f"peft={peft}"])
                    model = build_meta_model(cfg, task, config, tokenizer_ids(entry))
                    row["trainable"][(head, peft)] = count_parameters(model)[0]
        yield row


def _m(n: int) -> str:
    return f"{n / 1e6:.1f}M"


def _k(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def markdown(table) -> str:
    out = ["| model (hub id) | published | ours | Δ | full FT | LoRA r=8 | RoCoFT r=3 | prompt head: full / LoRA / RoCoFT |",
           "|---|---|---|---|---|---|---|---|"]
    for r in table:
        t = r["trainable"]
        delta = f"{100 * (r['ours'] - r['published']) / r['published']:+.1f}%"
        if t:
            pool = [_k(t[("pooling", p)]) for p in ("none", "lora", "rocoft")]
            prompt_heads = [h for h, _ in t if h != "pooling"]
            prompt = (f"{prompt_heads[0]}: " + " / ".join(_k(t[(prompt_heads[0], p)]) for p in ("none", "lora", "rocoft"))
                      if prompt_heads else "n/a (no mask token)")
        else:
            pool, prompt = ["(seq2seq LM)", "n/a", "n/a"], "n/a"
        out.append(f"| `{r['name']}` ({r['hub_id']}) | {_m(r['published'])} | {_m(r['ours'])} | {delta} | "
                   f"{' | '.join(pool)} | {prompt} |")
    out.append("")
    out.append("Sources of the published sizes:")
    out.append("")
    out += [f"- `{r['name']}`: {r['source']}" for r in table]
    by_note: dict[str, list[str]] = {}
    for r in table:
        if r["note"]:
            by_note.setdefault(r["note"], []).append(f"`{r['name']}`")
    for note, names in by_note.items():
        out.append(f"- {', '.join(names)}: {note}")
    return "\n".join(out)


def check_hub(names=None, cache_dir=None, local_files_only: bool = False) -> int:
    """Compare every stored value with the hub's raw config.json; print the differences."""
    import json

    from huggingface_hub import hf_hub_download

    from cmiexp.models.hub_configs import MODELS

    bad = 0
    for name, entry in MODELS.items():
        if names is not None and name not in names:
            continue
        try:
            path = hf_hub_download(entry.hub_id, "config.json", cache_dir=cache_dir, local_files_only=local_files_only)
            with open(path) as f:
                live = json.load(f)
        except Exception as e:  # noqa: BLE001 - reported per model
            print(f"{name}: cannot read {entry.hub_id}/config.json: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
            bad += 1
            continue
        diffs, absent = [], []
        for key, value in entry.config.items():
            if key not in live:
                absent.append(key)  # the hub file relies on the transformers default
            elif live[key] != value and not (isinstance(value, (int, float)) and isinstance(live[key], (int, float))
                                             and float(live[key]) == float(value)):
                diffs.append(f"{key}: ours {value!r}, hub {live[key]!r}")
        if entry.hub_model_type and live.get("model_type") != entry.hub_model_type:
            diffs.append(f"model_type: expected {entry.hub_model_type!r}, hub {live.get('model_type')!r}")
        status = "matches the hub config.json" if not diffs else "; ".join(diffs)
        print(f"{name}: {status}" + (f" (not in the hub file, defaults apply: {', '.join(absent)})" if absent else ""))
        bad += bool(diffs)
    return 1 if bad else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check-hub", action="store_true", help="compare the stored configs with the hub (network)")
    args = p.parse_args(argv)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    print(markdown(list(rows())))
    return check_hub() if args.check_hub else 0


if __name__ == "__main__":
    sys.exit(main())
