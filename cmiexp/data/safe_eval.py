"""A bounded arithmetic evaluator for SVAMP equation strings.

DSS scores SVAMP by calling Python ``eval`` on the generated equation, which runs arbitrary
model output as code (``__import__('os')...``) and can hang on ``9**9**9``. This module
replaces it with a tiny tokenizer plus recursive-descent parser over exactly this grammar::

    expr    := term (('+' | '-') term)*
    term    := unary (('*' | '/') unary)*
    unary   := ('+' | '-') unary | primary
    primary := NUMBER | '(' expr ')'
    NUMBER  := digits ['.' digits] | '.' digits      (no exponent, no sign)

Accepted operator spellings: ``*`` and ``×`` multiply, ``/`` and ``÷`` divide, ``-`` and the
Unicode minus ``−`` subtract. There are no names, calls, attributes, powers or exponents.

Every input is bounded before and during parsing, so evaluation is O(length) and cannot blow
the Python stack: at most ``MAX_CHARS`` characters, ``MAX_DIGITS`` digits per literal,
``MAX_TOKENS`` tokens and ``MAX_DEPTH`` nested parentheses/unary signs. Any rejection,
division by zero or non-finite result gives ``None``; ``safe_eval`` never raises.
"""

from __future__ import annotations

import math

MAX_CHARS = 200
MAX_DIGITS = 15  # float64 holds 15 significant decimal digits exactly
MAX_TOKENS = 128
MAX_DEPTH = 32

_OPS = {"+": "+", "-": "-", "\u2212": "-", "*": "*", "\u00d7": "*", "/": "/", "\u00f7": "/"}
_PARENS = {"(", ")"}


class _Reject(Exception):
    """Internal: the input is outside the grammar or the bounds."""


def _tokenize(text: str) -> list[tuple[str, float | None]]:
    """Split into ("num", value) / (op, None) / (paren, None) tokens, or raise _Reject."""
    tokens: list[tuple[str, float | None]] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch in " \t\n\r":
            i += 1
            continue
        if ch in _OPS:
            tokens.append((_OPS[ch], None))
            i += 1
        elif ch in _PARENS:
            tokens.append((ch, None))
            i += 1
        elif ch.isascii() and (ch.isdigit() or ch == "."):
            j = i
            while j < n and text[j].isascii() and text[j].isdigit():
                j += 1
            int_digits = j - i
            frac_digits = 0
            if j < n and text[j] == ".":
                j += 1
                k = j
                while j < n and text[j].isascii() and text[j].isdigit():
                    j += 1
                frac_digits = j - k
            if int_digits + frac_digits == 0:  # a lone "."
                raise _Reject
            if int_digits + frac_digits > MAX_DIGITS:
                raise _Reject
            # A literal must not run straight into another "." or a digit ("1.2.3").
            if j < n and text[j] == ".":
                raise _Reject
            tokens.append(("num", float(text[i:j])))
            i = j
        else:
            raise _Reject  # letters, "_", quotes, "**" parts other than "*", etc.
        if len(tokens) > MAX_TOKENS:
            raise _Reject
    return tokens


class _Parser:
    def __init__(self, tokens: list[tuple[str, float | None]]):
        self.tokens = tokens
        self.pos = 0
        self.depth = 0

    def _peek(self) -> str | None:
        return self.tokens[self.pos][0] if self.pos < len(self.tokens) else None

    def _enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _Reject

    def parse(self) -> float:
        if not self.tokens:
            raise _Reject
        value = self._expr()
        if self.pos != len(self.tokens):
            raise _Reject  # trailing tokens, e.g. "2 3" or "(1))"
        return value

    def _expr(self) -> float:
        value = self._term()
        while self._peek() in ("+", "-"):
            op = self._peek()
            self.pos += 1
            rhs = self._term()
            value = value + rhs if op == "+" else value - rhs
            _check_finite(value)
        return value

    def _term(self) -> float:
        value = self._unary()
        while self._peek() in ("*", "/"):
            op = self._peek()
            self.pos += 1
            rhs = self._unary()
            if op == "*":
                value = value * rhs
            else:
                if rhs == 0.0:
                    raise _Reject
                value = value / rhs
            _check_finite(value)
        return value

    def _unary(self) -> float:
        tok = self._peek()
        if tok in ("+", "-"):
            self._enter()
            self.pos += 1
            value = self._unary()
            self.depth -= 1
            return -value if tok == "-" else value
        return self._primary()

    def _primary(self) -> float:
        if self.pos >= len(self.tokens):
            raise _Reject
        kind, value = self.tokens[self.pos]
        if kind == "num":
            self.pos += 1
            return float(value)
        if kind == "(":
            self._enter()
            self.pos += 1
            inner = self._expr()
            if self._peek() != ")":
                raise _Reject
            self.pos += 1
            self.depth -= 1
            return inner
        raise _Reject


def _check_finite(value: float) -> None:
    if not math.isfinite(value):
        raise _Reject


def safe_eval(expr: str) -> float | None:
    """Value of an arithmetic expression, or None if it is rejected (never raises)."""
    try:
        if not isinstance(expr, str) or len(expr) > MAX_CHARS:
            return None
        value = _Parser(_tokenize(expr)).parse()
        return value if math.isfinite(value) else None
    except (_Reject, ArithmeticError, ValueError):
        return None


def svamp_correct(pred_text: str, gold_equation: str, tol: float = 1e-4) -> bool:
    """True when the predicted equation evaluates to the gold equation's value.

    Both sides go through ``safe_eval``; a trailing period (``"(84 / 2)."``, as the teacher
    writes it) is dropped from the prediction first. Values match when
    ``|pred - gold| <= tol * max(1, |gold|)`` (absolute below 1, relative above), which
    absorbs float rounding of chained divisions. An unparsable prediction or gold is wrong.
    """
    if not isinstance(pred_text, str) or not isinstance(gold_equation, str):
        return False
    pred = safe_eval(pred_text.strip().rstrip("."))
    gold = safe_eval(gold_equation.strip())
    if pred is None or gold is None:
        return False
    return abs(pred - gold) <= tol * max(1.0, abs(gold))
