"""A small, safe arithmetic parser for model-written expressions (Countdown answers).

Model text is never handed to `eval`: this recursive-descent parser accepts only non-negative
integer literals, `+ - * /` (and `×`, `÷`), and parentheses, evaluates exactly with `Fraction`,
and returns the value together with the literals it used, so the caller can check TinyZero's
"each number exactly once" rule. Size limits keep it cheap on hostile input: at most
`max_chars` characters, `max_depth` nested parentheses, and literals of at most
`max_digits` digits (so no operation can build a huge number: there is no power operator).

Grammar:  expr := term (('+'|'-') term)* ;  term := factor (('*'|'/') factor)* ;
          factor := INT | '(' expr ')'
Unary minus is not accepted: Countdown combines the given numbers with binary operations only.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction


class ExpressionError(ValueError):
    """The text is not an acceptable arithmetic expression (syntax, limits, division by zero)."""


@dataclass(frozen=True)
class Evaluated:
    value: Fraction
    numbers: tuple[int, ...]  # the integer literals, in order of appearance


_OPS = {"×": "*", "÷": "/"}


def _tokenize(text: str, max_digits: int) -> list[str]:
    tokens: list[str] = []
    i = 0
    while i < len(text):
        ch = _OPS.get(text[i], text[i])
        if ch.isspace():
            i += 1
        elif ch in "+-*/()":
            tokens.append(ch)
            i += 1
        elif ch.isdigit() and ch.isascii():
            j = i
            while j < len(text) and text[j].isascii() and text[j].isdigit():
                j += 1
            if j - i > max_digits:
                raise ExpressionError(f"number longer than {max_digits} digits")
            tokens.append(text[i:j])
            i = j
        else:
            raise ExpressionError(f"character {text[i]!r} is not allowed")
    return tokens


def evaluate(text: str, max_chars: int = 200, max_depth: int = 16, max_digits: int = 6) -> Evaluated:
    """Parse and evaluate `text` exactly; raise ExpressionError on anything else."""
    if len(text) > max_chars:
        raise ExpressionError(f"expression longer than {max_chars} characters")
    tokens = _tokenize(text, max_digits)
    if not tokens:
        raise ExpressionError("empty expression")
    pos = 0
    numbers: list[int] = []

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def take() -> str:
        nonlocal pos
        pos += 1
        return tokens[pos - 1]

    def factor(depth: int) -> Fraction:
        tok = peek()
        if tok is None:
            raise ExpressionError("expression ends early")
        if tok == "(":
            if depth >= max_depth:
                raise ExpressionError(f"parentheses nested deeper than {max_depth}")
            take()
            value = expr(depth + 1)
            if peek() != ")":
                raise ExpressionError("missing ')'")
            take()
            return value
        if tok.isdigit():
            take()
            numbers.append(int(tok))
            return Fraction(int(tok))
        raise ExpressionError(f"unexpected {tok!r}")

    def term(depth: int) -> Fraction:
        value = factor(depth)
        while peek() in ("*", "/"):
            op, rhs = take(), factor(depth)
            if op == "/" and rhs == 0:
                raise ExpressionError("division by zero")
            value = value * rhs if op == "*" else value / rhs
        return value

    def expr(depth: int) -> Fraction:
        value = term(depth)
        while peek() in ("+", "-"):
            op, rhs = take(), term(depth)
            value = value + rhs if op == "+" else value - rhs
        return value

    value = expr(0)
    if pos != len(tokens):
        raise ExpressionError(f"unexpected {tokens[pos]!r} after the expression")
    return Evaluated(value=value, numbers=tuple(numbers))


def safe_evaluate(text: str, **limits) -> Evaluated | None:
    """`evaluate`, but None instead of an error."""
    try:
        return evaluate(text, **limits)
    except ExpressionError:
        return None
