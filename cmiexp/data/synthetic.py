"""The embedded offline default task: deterministic synthetic topic classification.

Each example is a short "sentence" of made-up words. Three topics own a small set of cue
words each; a sentence mixes filler words with cue words, most of them from its own topic
and sometimes one from another topic (a distractor). The label is the topic. A model can
learn it because the label is a function of which words occur (a bag-of-words rule with a
majority vote), but it is not trivial: the cue words sit at random positions among
fillers, distractors make single-word shortcuts wrong, and a fraction of labels is
flipped at random (``label_noise``), so the best achievable dev accuracy is about
``1 - label_noise * 2/3``. Everything is generated from ``generator_seed``, so every run,
process and machine sees the same data without files or network.
"""

from __future__ import annotations

import numpy as np

from cmiexp.checks import check_task
from cmiexp.data.base import TaskData
from cmiexp.errors import ConfigError

_CONSONANTS = list("bdfgklmnprstvz")
_VOWELS = list("aeiou")


def _make_words(rng: np.random.Generator, n: int, taken: set[str]) -> list[str]:
    words = []
    while len(words) < n:
        syl = rng.integers(2, 4)
        w = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(syl))
        if w not in taken:
            taken.add(w)
            words.append(w)
    return words


def generate_synthetic(
    num_train: int = 3000,
    num_eval: int = 600,
    num_test: int = 600,
    num_classes: int = 3,
    cue_words_per_class: int = 12,
    filler_words: int = 300,
    label_noise: float = 0.05,
    generator_seed: int = 1234,
) -> dict[str, dict[str, list]]:
    """Return ``{"train"|"validation"|"test": {"sentence": [...], "label": [...], "idx": [...]}}``."""
    rng = np.random.default_rng(generator_seed)
    taken: set[str] = set()
    cues = [_make_words(rng, cue_words_per_class, taken) for _ in range(num_classes)]
    fillers = _make_words(rng, filler_words, taken)

    def make_split(n: int) -> dict[str, list]:
        sentences, labels = [], []
        for _ in range(n):
            y = int(rng.integers(num_classes))
            words = list(rng.choice(fillers, size=int(rng.integers(6, 13))))
            n_cue = int(rng.integers(2, 4))
            words += list(rng.choice(cues[y], size=n_cue))
            if rng.random() < 0.5:  # one distractor from another topic, always outvoted
                other = int((y + rng.integers(1, num_classes)) % num_classes)
                words.append(str(rng.choice(cues[other])))
            rng.shuffle(words)
            if rng.random() < label_noise:
                y = int((y + rng.integers(1, num_classes)) % num_classes)
            sentences.append(" ".join(words))
            labels.append(y)
        return {"sentence": sentences, "label": labels, "idx": list(range(n))}

    return {"train": make_split(num_train), "validation": make_split(num_eval), "test": make_split(num_test)}


def load_synthetic(task_cfg) -> TaskData:
    import datasets

    from cmiexp.data.glue import positive_int_or_none, subsample

    check_task(task_cfg)  # generator sizes, noise and seeds, before anything is generated

    num_classes = int(task_cfg.num_classes)
    splits = generate_synthetic(
        num_train=int(task_cfg.num_train),
        num_eval=int(task_cfg.num_eval),
        num_test=int(task_cfg.num_test),
        num_classes=num_classes,
        label_noise=float(task_cfg.label_noise),
        generator_seed=int(task_cfg.generator_seed),
    )
    ds = {k: datasets.Dataset.from_dict(v) for k, v in splits.items()}
    if task_cfg.get("data_dir") not in (None, ""):
        raise ConfigError(f"task.data_dir={task_cfg.get('data_dir')!r}: task={task_cfg.name} is generated in memory "
                          "and reads no files; leave task.data_dir null or choose a task that reads files")
    seed = int(task_cfg.get("subsample_seed") or 0)
    train = subsample(ds["train"], positive_int_or_none(task_cfg, "max_train_samples"), seed)
    dev = subsample(ds["validation"], positive_int_or_none(task_cfg, "max_eval_samples"), seed)
    return TaskData(
        name=task_cfg.name,
        train=train,
        eval_splits={"validation": dev},
        test=ds["test"],
        text_fields=("sentence",),
        label_names=[f"topic_{i}" for i in range(num_classes)],
        metrics=["accuracy", "macro_f1"],
        primary_metric=task_cfg.primary_metric,
    )
