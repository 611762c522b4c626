"""The bounded SVAMP equation evaluator: values on real equations, and rejection of anything else."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from cmiexp.data.safe_eval import MAX_CHARS, MAX_DEPTH, safe_eval, svamp_correct

SVAMP_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cot" / "svamp"


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# --- values ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "expr, value",
    [
        ("( 84.0 / 2.0 )", 42.0),  # first rows of svamp_train.json, worked by hand
        ("( 7.0 * 30.0 )", 210.0),
        ("( ( 17.0 + 15.0 ) + 2.0 )", 34.0),
        ("2 + 3 * 4", 14.0),  # precedence
        ("(2 + 3) * 4", 20.0),
        ("10 - 4 - 3", 3.0),  # left associative
        ("64 / 4 / 2", 8.0),
        ("-3 + 5", 2.0),
        ("- (2 - 5)", 3.0),
        ("3 * -2", -6.0),
        ("--2", 2.0),
        ("+7", 7.0),
        ("2 \u00d7 3 \u00f7 4", 1.5),  # × ÷
        ("7 \u2212 10", -3.0),  # unicode minus
        (".5 + 1.", 1.5),
        ("999999999999999", 999999999999999.0),  # 15 digits: the longest literal accepted
        ("0.25*(8-4)/2", 0.5),
    ],
)
def test_values(expr, value):
    assert safe_eval(expr) == value


def test_every_svamp_test_label_matches_the_source_answer():
    # svamp_test.json rows are SVAMP.json problems; match by content and compare with "Answer".
    source = json.loads((SVAMP_DIR / "SVAMP.json").read_text(encoding="utf-8"))
    answer_of = {f"{p['Body']}\n{p['Question']}": p["Answer"] for p in source}
    rows = _jsonl(SVAMP_DIR / "svamp_test.json")
    assert len(rows) == 200
    for row in rows:
        got = safe_eval(row["label"])
        assert got is not None, row["label"]
        assert got == pytest.approx(answer_of[row["input"]], rel=1e-9, abs=1e-9), row["label"]


def test_every_svamp_source_equation_matches_its_answer():
    source = json.loads((SVAMP_DIR / "SVAMP.json").read_text(encoding="utf-8"))
    mismatched = []
    for p in source:
        got = safe_eval(p["Equation"])
        assert got is not None, p["Equation"]
        if got != pytest.approx(p["Answer"], rel=1e-9, abs=1e-9):
            mismatched.append(p["ID"])
    # chal-680 is an error in SVAMP itself: (4 - 2) + 3 is 5 by hand, the file says 1.0.
    assert mismatched == ["chal-680"]
    assert safe_eval("( ( 4.0 - 2.0 ) + 3.0 )") == 5.0


def _random_tree(rng: random.Random, depth: int):
    """(string, value) of a random fully parenthesised expression, evaluated independently."""
    if depth == 0 or rng.random() < 0.3:
        v = rng.randint(0, 99) if rng.random() < 0.7 else rng.randint(0, 9999) / 100
        return repr(float(v)) if isinstance(v, float) else str(v), float(v)
    op = rng.choice("+-*/")
    ls, lv = _random_tree(rng, depth - 1)
    rs, rv = _random_tree(rng, depth - 1)
    if lv is None or rv is None:
        value = None
    elif op == "+":
        value = lv + rv
    elif op == "-":
        value = lv - rv
    elif op == "*":
        value = lv * rv
    else:
        value = None if rv == 0 else lv / rv
    return f"({ls} {op} {rs})", value


def test_random_parenthesised_expressions_match_tree_evaluation():
    rng = random.Random(1234)
    checked = 0
    for _ in range(400):
        text, value = _random_tree(rng, 3)
        if len(text) > MAX_CHARS:
            continue
        checked += 1
        assert safe_eval(text) == value, text
    assert checked > 300


# --- rejections --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "expr",
    [
        "__import__('os')",
        "__import__('os').system('echo pwned')",
        "2**10**10",
        "2 ** 3",
        "1" * 16,  # 16-digit literal
        "1234567890.1234567",  # 17 digits
        "1e10",  # no exponents
        "1" + "+1" * 150,  # longer than MAX_CHARS
        "1+" * 90 + "1",  # 181 tokens: over the token budget
        "(" * (MAX_DEPTH + 1) + "1" + ")" * (MAX_DEPTH + 1),  # too deep
        "-" * (MAX_DEPTH + 1) + "1",  # unary chain too deep
        "",
        "   ",
        "1/0",
        "1 / (2 - 2)",
        "x + 1",
        "abs(-1)",
        "True",
        "(1 + 2",
        "1 + 2)",
        "()",
        "1 +",
        "* 2",
        "2 3",
        "1..2",
        "1.2.3",
        ".",
        "\u0663 + 1",  # Arabic-Indic digit
        "1; 2",
        "[1]",
    ],
)
def test_rejected(expr):
    assert safe_eval(expr) is None


@pytest.mark.parametrize("value", [None, 42, 4.2, b"1+1", ["1"]])
def test_non_strings_rejected(value):
    assert safe_eval(value) is None


def test_nesting_at_the_limit_still_evaluates():
    expr = "(" * MAX_DEPTH + "6" + ")" * MAX_DEPTH
    assert safe_eval(expr) == 6.0


def test_random_garbage_never_raises():
    rng = random.Random(7)
    alphabet = "0123456789.+-*/() \u00d7\u00f7\u2212eax_'\"[]"
    results = []
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 260)))
        out = safe_eval(text)  # must not raise
        assert out is None or isinstance(out, float)
        results.append(out)
    assert any(r is None for r in results)


# --- svamp_correct -----------------------------------------------------------------------------


def test_svamp_correct():
    assert svamp_correct("(84 / 2)", "( 84.0 / 2.0 )")
    assert svamp_correct("(84 / 2).", "( 84.0 / 2.0 )")  # teacher-style trailing period
    assert svamp_correct("(2 * 21)", "( 84.0 / 2.0 )")  # different equation, same value
    assert svamp_correct("( 0.3333333 )", "( 1.0 / 3.0 )")  # within tol=1e-4
    assert not svamp_correct("( 33.3 )", "( 100.0 / 3.0 )")  # 0.033 off: beyond 1e-4 * 33.3
    assert not svamp_correct("(84 * 2)", "( 84.0 / 2.0 )")
    assert not svamp_correct("", "( 84.0 / 2.0 )")
    assert not svamp_correct("__import__('os').system('echo hi')", "( 84.0 / 2.0 )")
    assert not svamp_correct("(1 / 0)", "( 84.0 / 2.0 )")
    assert not svamp_correct("(84 / 2)", "not an equation")
    assert not svamp_correct(None, "( 84.0 / 2.0 )")
