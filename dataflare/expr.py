"""The expression language of ``filter``, ``route`` and ``condition`` settings.

A small, safe language (no Python ``eval``), compiled once into closures::

    amount > 100 and event in ['click', 'purchase'] or not customer.vip
    lower(email) == 'a@b.c'      coalesce(discount, 0) * 2      age >= 7d

Literals (numbers, 'strings', "strings", true, false, null, durations such as ``30s``
read as seconds, lists), dotted paths (a missing path is ``null``), ``== != < <= > >=``,
``in``, ``not in``, ``and or not``, ``+ - * / %``, parentheses, ``if c then a else b``
and functions (:data:`FUNCTIONS`; the text, regex, time, JSON, digest, list and cast
functions live in :mod:`dataflare.expr_functions`).
Ordering against ``null`` is false and arithmetic with ``null`` is ``null``; comparing a
string with a number is a record error (handled by the step's error policy).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dataflare.expr_functions import MORE_FUNCTIONS, REGEX_ARGUMENT, ZONE_ARGUMENT, regex, zone
from dataflare.records import RecordError, exact_number_hint, getter, parse_duration

Fn = Callable[[Any], Any]


class ExpressionError(ValueError):
    """An expression that does not parse; ``column`` is 1-based within the expression."""

    def __init__(self, message: str, column: int) -> None:
        super().__init__(f"{message} at column {column}")
        self.column = column


_TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<duration>\d+(?:\.\d+)?(?:ms|s|m|h|d|w)\b)
  | (?P<number>\d+\.\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|\d+(?:[eE][-+]?\d+)?)
  | (?P<string>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_0-9][A-Za-z0-9_]*)*)
  | (?P<op>==|!=|<=|>=|<|>|\+|-|\*|/|%|\(|\)|\[|\]|,)
    """,
    re.VERBOSE,
)
_KEYWORDS = {"and", "or", "not", "in", "true", "false", "null", "if", "then", "else"}


@dataclass(frozen=True)
class _Tok:
    kind: str
    text: str
    col: int


def _tokenize(text: str) -> list[_Tok]:
    toks, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            msg = f"unexpected character {text[pos]!r}"
            raise ExpressionError(msg, pos + 1)
        kind = m.lastgroup or ""
        if kind != "ws":
            value = m.group()
            if kind == "name" and value in _KEYWORDS:
                kind = value
            toks.append(_Tok(kind, value, pos + 1))
        pos = m.end()
    toks.append(_Tok("end", "", len(text) + 1))
    return toks


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} ({text[:40]})"


def _order(op: str) -> Callable[[Any, Any], bool]:
    import operator as pyop

    cmp = {"<": pyop.lt, "<=": pyop.le, ">": pyop.gt, ">=": pyop.ge}[op]

    def compare(a: Any, b: Any) -> bool:
        if a is None or b is None:
            return False
        if (type(a) is bool) != (type(b) is bool):
            msg = f"cannot compare {_describe(a)} {op} {_describe(b)}"
            raise RecordError(msg)
        try:
            return bool(cmp(a, b))
        except TypeError:
            msg = f"cannot compare {_describe(a)} {op} {_describe(b)}{exact_number_hint(a, b)}"
            raise RecordError(msg) from None

    return compare


_NUMBERS = (int, float)


def _arith(op: str) -> Callable[[Any, Any], Any]:
    import operator as pyop

    fn = {"+": pyop.add, "-": pyop.sub, "*": pyop.mul, "/": pyop.truediv, "%": pyop.mod}[op]

    plus = op == "+"

    def apply(a: Any, b: Any) -> Any:
        if a is None or b is None:
            return None
        # Numbers only (not booleans); + also joins two strings or two lists.
        ta, tb = type(a), type(b)
        if not ((ta in _NUMBERS and tb in _NUMBERS)
                or (plus and ta is tb and (ta is str or ta is list))):
            msg = (f"cannot apply {op} to {_describe(a)} and {_describe(b)}"
                   f"{exact_number_hint(a, b)}")
            raise RecordError(msg)
        try:
            return fn(a, b)
        except ZeroDivisionError:
            msg = f"division by zero ({a!r} {op} {b!r})"
            raise RecordError(msg) from None
        except TypeError:
            msg = f"cannot apply {op} to {_describe(a)} and {_describe(b)}"
            raise RecordError(msg) from None

    return apply


def _equal(a: Any, b: Any) -> bool:
    """JSON equality: ``true`` is not ``1`` (Python's ``==`` says it is)."""
    return a == b and (type(a) is bool) == (type(b) is bool)


def _contains(item: Any, container: Any) -> bool:
    if container is None:
        return False
    if isinstance(container, str):
        if not isinstance(item, str):
            return False
        return item in container
    try:
        return item in container
    except TypeError:
        msg = f"cannot test membership in {_describe(container)}"
        raise RecordError(msg) from None


def _str_fn(name: str, fn: Callable[[str], Any]) -> Callable[..., Any]:
    def apply(value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, str):
            msg = f"{name}() expects a string, got {_describe(value)}"
            raise RecordError(msg)
        return fn(value)

    return apply


def _round(value: Any, digits: Any = 0) -> Any:
    return None if value is None else round(value, int(digits))


def _len(value: Any) -> Any:
    return None if value is None else len(value)


FUNCTIONS: dict[str, tuple[Callable[..., Any], int, int]] = {
    "lower": (_str_fn("lower", str.lower), 1, 1),
    "upper": (_str_fn("upper", str.upper), 1, 1),
    "trim": (_str_fn("trim", str.strip), 1, 1),
    "len": (_len, 1, 1),
    "abs": (lambda v: None if v is None else abs(v), 1, 1),
    "round": (_round, 1, 2),
    "floor": (lambda v: None if v is None else math.floor(v), 1, 1),
    "coalesce": (lambda *vs: next((v for v in vs if v is not None), None), 1, 99),
    "contains": (lambda s, sub: s is not None and sub in s, 2, 2),
    "starts_with": (lambda s, p: isinstance(s, str) and s.startswith(p), 2, 2),
    "ends_with": (lambda s, p: isinstance(s, str) and s.endswith(p), 2, 2),
    "now": (time.time, 0, 0),
}
FUNCTIONS.update(MORE_FUNCTIONS)
"""Functions callable in expressions: name -> (function, least and most arguments)."""


class _Parser:
    def __init__(self, text: str) -> None:
        self.toks = _tokenize(text)
        self.i = 0
        self.paths: list[str] = []

    def peek(self) -> _Tok:
        return self.toks[self.i]

    def take(self, kind: str | None = None) -> _Tok:
        tok = self.toks[self.i]
        if kind is not None and tok.kind != kind and tok.text != kind:
            want = "end of expression" if kind == "end" else repr(kind)
            got = "end of expression" if tok.kind == "end" else repr(tok.text)
            msg = f"expected {want}, found {got}"
            raise ExpressionError(msg, tok.col)
        self.i += 1
        return tok

    def at(self, *texts: str) -> bool:
        tok = self.toks[self.i]
        return tok.kind in texts or (tok.kind == "op" and tok.text in texts)

    def parse(self) -> Fn:
        fn = self.or_()
        self.take("end")
        return fn

    def or_(self) -> Fn:
        left = self.and_()
        while self.at("or"):
            self.take()
            right = self.and_()
            left = (lambda a, b: lambda r: bool(a(r)) or bool(b(r)))(left, right)
        return left

    def and_(self) -> Fn:
        left = self.not_()
        while self.at("and"):
            self.take()
            right = self.not_()
            left = (lambda a, b: lambda r: bool(a(r)) and bool(b(r)))(left, right)
        return left

    def not_(self) -> Fn:
        if self.at("not"):
            self.take()
            inner = self.not_()
            return lambda r: not inner(r)
        return self.comparison()

    def comparison(self) -> Fn:
        left = self.additive()
        if self.at("==", "!=", "<", "<=", ">", ">="):
            op = self.take().text
            right = self.additive()
            a, b = left, right
            if op == "==":
                return lambda r: _equal(a(r), b(r))
            if op == "!=":
                return lambda r: not _equal(a(r), b(r))
            cmp = _order(op)
            return lambda r: cmp(a(r), b(r))
        if self.at("in"):
            self.take()
            right = self.additive()
            return lambda r: _contains(left(r), right(r))
        if self.at("not") and self.toks[self.i + 1].kind == "in":
            self.take()
            self.take()
            right = self.additive()
            return lambda r: not _contains(left(r), right(r))
        return left

    def additive(self) -> Fn:
        left = self.multiplicative()
        while self.at("+", "-"):
            fn = _arith(self.take().text)
            right = self.multiplicative()
            left = (lambda f, a, b: lambda r: f(a(r), b(r)))(fn, left, right)
        return left

    def multiplicative(self) -> Fn:
        left = self.unary()
        while self.at("*", "/", "%"):
            fn = _arith(self.take().text)
            right = self.unary()
            left = (lambda f, a, b: lambda r: f(a(r), b(r)))(fn, left, right)
        return left

    def unary(self) -> Fn:
        if self.at("-"):
            self.take()
            inner = self.unary()
            neg = _arith("*")
            return lambda r: neg(inner(r), -1)
        return self.primary()

    def primary(self) -> Fn:
        tok = self.take()
        if tok.kind == "number":
            num: Any = float(tok.text) if any(c in tok.text for c in ".eE") else int(tok.text)
            return lambda r: num
        if tok.kind == "duration":
            secs = parse_duration(tok.text)
            return lambda r: secs
        if tok.kind == "string":
            text = _unquote(tok.text)
            return lambda r: text
        if tok.kind in ("true", "false", "null"):
            const = {"true": True, "false": False, "null": None}[tok.kind]
            return lambda r: const
        if tok.kind == "name":
            if self.at("("):
                return self.call(tok)
            self.paths.append(tok.text)
            return getter(tok.text)
        if tok.kind == "if":
            return self.conditional()
        if tok.text == "(":
            inner = self.or_()
            self.take(")")
            return inner
        if tok.text == "[":
            items: list[Fn] = []
            if not self.at("]"):
                items.append(self.or_())
                while self.at(","):
                    self.take()
                    items.append(self.or_())
            self.take("]")
            return lambda r: [f(r) for f in items]
        got = "end of expression" if tok.kind == "end" else repr(tok.text)
        msg = f"unexpected {got}"
        raise ExpressionError(msg, tok.col)

    def conditional(self) -> Fn:
        """``if c then a else b`` (``else`` optional: ``null``); one branch is evaluated."""
        cond = self.or_()
        self.take("then")
        then = self.or_()
        otherwise: Fn = lambda r: None  # noqa: E731
        if self.at("else"):
            self.take()
            otherwise = self.or_()
        return lambda r: then(r) if cond(r) else otherwise(r)

    def argument(self, function: str, index: int) -> Fn:
        """One argument; a literal pattern or time zone is checked and prepared here, once."""
        first = self.peek()
        fn = self.or_()
        if first.kind != "string" or self.toks[self.i - 1] is not first:
            return fn
        text = _unquote(first.text)
        try:
            if REGEX_ARGUMENT.get(function) == index:
                pattern = regex(text)
                return lambda r: pattern
            if ZONE_ARGUMENT.get(function) == index:
                zone(text)
        except ValueError as exc:
            raise ExpressionError(str(exc), first.col) from None
        return fn

    def call(self, name_tok: _Tok) -> Fn:
        from dataflare.dsl_compiler.problems import did_you_mean

        entry = FUNCTIONS.get(name_tok.text)
        if entry is None:
            hint = did_you_mean(name_tok.text, list(FUNCTIONS))
            msg = f"unknown function {name_tok.text!r}{hint}"
            raise ExpressionError(msg, name_tok.col)
        fn, least, most = entry
        self.take("(")
        args: list[Fn] = []
        if not self.at(")"):
            args.append(self.argument(name_tok.text, 0))
            while self.at(","):
                self.take()
                args.append(self.argument(name_tok.text, len(args)))
        self.take(")")
        if not least <= len(args) <= most:
            msg = f"{name_tok.text}() takes {least}-{most} arguments, got {len(args)}"
            raise ExpressionError(msg, name_tok.col)
        return _call(fn, args)


def _call(fn: Callable[..., Any], args: list[Fn]) -> Fn:
    """``fn`` of the values of ``args``; up to three arguments without a generator."""
    if not args:
        return lambda r: fn()
    if len(args) == 1:
        (a,) = args
        return lambda r: fn(a(r))
    if len(args) == 2:
        a, b = args
        return lambda r: fn(a(r), b(r))
    if len(args) == 3:
        a, b, c = args
        return lambda r: fn(a(r), b(r), c(r))
    return lambda r: fn(*[a(r) for a in args])


def _unquote(text: str) -> str:
    body = text[1:-1]
    # \n and \t are control characters, \\ \' \" the character; any other backslash stays
    # (a regex such as '\d+' needs no doubling).
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group()), body)


_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\", "'": "'", '"': '"'}


@dataclass(frozen=True)
class Expression:
    """A compiled expression: ``expr(record)`` evaluates it, ``expr.test(record)`` as a bool."""

    text: str
    fn: Fn
    paths: tuple[str, ...]

    def __call__(self, record: Any) -> Any:
        """The expression's value for ``record``."""
        return self.fn(record)

    def test(self, record: Any) -> bool:
        """The expression's truth value for ``record``."""
        return bool(self.fn(record))


def check_expression(value: str | None) -> str | None:
    """Validate an expression setting; ``ValueError`` (for pydantic) names the column."""
    if value is not None:
        try:
            compile_expression(value)
        except ExpressionError as exc:
            msg = f"invalid expression {value!r}: {exc}"
            raise ValueError(msg) from None
    return value


def compile_expression(text: str) -> Expression:
    """Parse ``text``; raises :class:`ExpressionError` with the column of the problem."""
    parser = _Parser(str(text))
    fn = parser.parse()
    return Expression(str(text), fn, tuple(parser.paths))


_NUMERIC_OPS = {"<", "<=", ">", ">=", "+", "-", "*", "/", "%"}
_TEXT_FUNCTIONS = {"lower", "upper", "trim"}


def expression_reads(text: str) -> list[tuple[str, str | None, int]]:
    """The paths an expression reads: each with the kind it needs (or ``None``), its column.

    A path next to an arithmetic or ordering operator whose other operand is a number
    literal (``amount > 10``, ``2 * qty``) needs a number; the one argument of ``lower``,
    ``upper`` or ``trim`` a string. Raises :class:`ExpressionError` when it does not parse.
    """
    compile_expression(text)
    toks = _tokenize(str(text))
    out: list[tuple[str, str | None, int]] = []
    for i, tok in enumerate(toks):
        if tok.kind != "name" or toks[i + 1].text == "(":
            continue
        want: str | None = None
        before = toks[i - 1] if i else None
        after = toks[i + 1]
        if after.kind == "op" and after.text in _NUMERIC_OPS and toks[i + 2].kind in (
                "number", "duration"):
            want = "number"
        elif (before is not None and before.kind == "op" and before.text in _NUMERIC_OPS
              and i >= 2 and toks[i - 2].kind in ("number", "duration")):
            want = "number"
        elif (i >= 2 and before is not None and before.text == "("
              and toks[i - 2].text in _TEXT_FUNCTIONS and after.text == ")"):
            want = "string"
        out.append((tok.text, want, tok.col))
    return out
