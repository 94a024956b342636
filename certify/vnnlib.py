"""Read a VNN-LIB 1.0 local-robustness property as VNN-COMP writes it, and as ``certprune export`` does.

What is read: ``(declare-const X_i Real)`` / ``(declare-const Y_j Real)``; input bounds ``(assert (<= X_i c))`` and
``(assert (>= X_i c))`` (either operand order, or inside one ``(and ...)``), one pair per input; and the UNSAFE
output set as a disjunction of ``Y_j >= Y_label`` over a set of classes ``j``: a single ``(assert (>= Y_j Y_l))``
or ``(assert (<= Y_l Y_j))``, or ``(assert (or ...))`` of such atoms, each bare or in a one-atom ``(and ...)``.
The property proves robust when ``logit_label > logit_j`` for every such ``j`` over the whole box. Anything else
(a conjunction of output atoms, input disjunctions, strict comparisons, other variables) is a one-line ValueError
that names the line.

Decimals are read exactly (``fractions.Fraction``) and rounded to float32, the models' precision, two ways: outward
(``lower``, ``upper``: each lower bound to a float32 <= it, each upper bound to one >= it), the box a proof covers,
never narrower than the file's and wider by at most a float32 ulp per side; and inward (``inner_lower``,
``inner_upper``), the float32 points that lie in the file's exact box, where a counterexample must lie.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from certprune.boxes import spec_of

_TOKEN = re.compile(r"\(|\)|[^\s()]+")
_VARIABLE = re.compile(r"([XY])_(\d+)")
_DECIMAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_exact = functools.lru_cache(maxsize=65536)(Fraction)  # a box has few distinct bounds (256 values in 8-bit images)


@dataclass
class Property:
    """The box ``lower <= x <= upper`` (flat, float32; ``inner_*`` rounded inward) and "``label`` beats every class
    in ``others``"."""
    lower: torch.Tensor
    upper: torch.Tensor
    label: int
    others: tuple[int, ...]
    num_outputs: int
    inner_lower: torch.Tensor
    inner_upper: torch.Tensor

    def spec(self) -> torch.Tensor:
        """The ``(len(others), num_outputs)`` matrix of rows ``e_label - e_j``: a proven lower bound > 0 of
        ``spec @ logits`` over the box proves the property (:func:`certprune.boxes.spec_of` for one input)."""
        return spec_of(torch.tensor([self.label]), [self.others], self.num_outputs)[0]


class _Form(list):
    """A parenthesised form with the line it opens on."""
    line = 0


def _forms(text: str, name: str) -> list:
    stack, top = [_Form()], None
    for number, line in enumerate(text.splitlines(), 1):
        for token in _TOKEN.findall(line.split(";", 1)[0]):
            if token == "(":
                stack.append(_Form())
                stack[-1].line = number
            elif token == ")":
                if len(stack) == 1:
                    raise ValueError(f"{name} line {number}: unbalanced ')'")
                top = stack.pop()
                stack[-1].append(top)
            else:
                stack[-1].append(token)
    if len(stack) > 1:
        raise ValueError(f"{name} line {stack[-1].line}: '(' is never closed")
    return stack[0]


@functools.lru_cache(maxsize=65536)
def _rounded(value: Fraction, down: bool) -> float:
    """The float32 nearest ``value`` that is <= it (``down``) or >= it."""
    candidate, toward = np.float32(float(value)), np.float32(-np.inf if down else np.inf)
    while (Fraction(float(candidate)) > value) if down else (Fraction(float(candidate)) < value):
        candidate = np.nextafter(candidate, toward)
    return float(candidate)


class _Reader:
    def __init__(self, name: str):
        self.name, self.sizes, self.lines = name, {"X": 0, "Y": 0}, {}
        self.lower, self.upper, self.terms, self.output_line = {}, {}, None, None

    def fail(self, where, message: str):
        """A ValueError naming the line ``where`` (a number, or a form that knows its line)."""
        raise ValueError(f"{self.name} line {where if isinstance(where, int) else getattr(where, 'line', '?')}: "
                         f"{message}")

    def variable(self, token, form):
        match = _VARIABLE.fullmatch(token) if isinstance(token, str) else None
        if match is None:
            return None
        kind, index = match.group(1), int(match.group(2))
        if (kind, index) not in self.lines:
            self.fail(form, f"{token} is used before its declare-const")
        return kind, index

    def number(self, token, form) -> Fraction | None:
        if isinstance(token, list):  # SMT-LIB's negative literal: (- c)
            return -self.number(token[1], form) if len(token) == 2 and token[0] == "-" else None
        return _exact(token) if isinstance(token, str) and _DECIMAL.fullmatch(token) else None

    def declare(self, form):
        if len(form) != 3 or form[2] != "Real" or not _VARIABLE.fullmatch(str(form[1])):
            self.fail(form, f"expected (declare-const X_i Real) or (declare-const Y_j Real), got {_text(form)}")
        kind, index = form[1][0], int(form[1][2:])
        self.lines[kind, index] = form.line
        self.sizes[kind] = max(self.sizes[kind], index + 1)

    def atom(self, form, parent):
        """``("X", i, lower, upper)`` for an input bound, ``("Y", j, label)`` for ``Y_j >= Y_label``."""
        if not (isinstance(form, list) and len(form) == 3 and form[0] in ("<=", ">=")):
            self.fail(getattr(form, "line", parent.line), f"expected (<= a b) or (>= a b), got {_text(form)}")
        greater = form[0] == ">="
        left, right = (self.variable(t, form) for t in form[1:])
        if left and right and left[0] == right[0] == "Y":
            return ("Y", left[1], right[1]) if greater else ("Y", right[1], left[1])
        for variable, value, at_least in ((left, form[2], greater), (right, form[1], not greater)):
            if variable and variable[0] == "X" and (number := self.number(value, form)) is not None:
                return ("X", variable[1], number if at_least else None, None if at_least else number)
        self.fail(form, f"only X_i <= c, X_i >= c and Y_i <= Y_j, Y_i >= Y_j are supported, got {_text(form)}")

    def bound(self, atom):
        _, index, low, high = atom
        if low is not None:  # several bounds on one input: their conjunction
            self.lower[index] = low if index not in self.lower else max(self.lower[index], low)
        if high is not None:
            self.upper[index] = high if index not in self.upper else min(self.upper[index], high)

    def assertion(self, form):
        if len(form) != 2:
            self.fail(form, "assert takes one term")
        body = form[1]
        head = body[0] if isinstance(body, list) and body else None
        if head == "and" and all(self.atom(term, body)[0] == "X" for term in body[1:]):
            for term in body[1:]:
                self.bound(self.atom(term, body))
            return
        if head == "or":
            if any(isinstance(term, list) and term[:1] == ["and"] and len(term) != 2 for term in body[1:]):
                self.fail(body, "each disjunct must be one output comparison; conjunctions inside the disjunction "
                          "are not supported")
            terms = [term[1] if isinstance(term, list) and term[:1] == ["and"] else term for term in body[1:]]
        else:
            terms = [body[1]] if head == "and" and len(body) == 2 else [body]
        atoms = [self.atom(term, form) for term in terms]
        if len(atoms) == 1 and atoms[0][0] == "X":
            return self.bound(atoms[0])
        if any(atom[0] != "Y" for atom in atoms) or not atoms:
            self.fail(body, "the output property must be a disjunction of Y_j >= Y_label (one conjunct each)")
        if self.terms is not None:
            self.fail(form, f"a second output assertion (the first is on line {self.output_line}): a conjunction "
                      "of output constraints is not a 'label beats every j' property")
        self.terms, self.output_line = atoms, form.line

    def property(self, forms) -> Property:
        for form in forms:
            if not isinstance(form, list) or not form or form[0] not in ("declare-const", "assert"):
                self.fail(form, f"expected declare-const or assert, got {_text(form)}")
            (self.declare if form[0] == "declare-const" else self.assertion)(form)
        if self.terms is None:
            raise ValueError(f"{self.name}: no output property (assert over Y_j)")
        labels = sorted({atom[2] for atom in self.terms})
        if len(labels) != 1:
            self.fail(self.output_line, f"the disjunction compares against several outputs "
                      f"({', '.join(f'Y_{i}' for i in labels)}); one label is supported")
        label, others = labels[0], tuple(sorted({atom[1] for atom in self.terms}))
        if label in others:
            self.fail(self.output_line, f"Y_{label} >= Y_{label} always holds: the property is trivially sat")
        for kind in ("X", "Y"):
            missing = [i for i in range(self.sizes[kind]) if (kind, i) not in self.lines]
            if missing:
                raise ValueError(f"{self.name}: {kind}_{missing[0]} is never declared (declared up to "
                                 f"{kind}_{self.sizes[kind] - 1})")
        for i in range(self.sizes["X"]):
            if i not in self.lower or i not in self.upper:
                self.fail(self.lines["X", i], f"X_{i} needs both a lower and an upper bound")
            if self.lower[i] > self.upper[i]:
                self.fail(self.lines["X", i], f"X_{i}'s bounds are empty ({self.lower[i]} > {self.upper[i]})")
        lower, upper = ([bounds[i] for i in range(self.sizes["X"])] for bounds in (self.lower, self.upper))
        return Property(_float32(lower, down=True), _float32(upper, down=False), label, others, self.sizes["Y"],
                        _float32(lower, down=False), _float32(upper, down=True))


def _float32(values: list[Fraction], down: bool) -> torch.Tensor:
    return torch.tensor([_rounded(value, down) for value in values], dtype=torch.float32)


def _text(form) -> str:
    text = form if isinstance(form, str) else "(" + " ".join(_text(t) for t in form) + ")"
    return text if len(text) <= 60 else text[:57] + "..."


def parse_vnnlib(text: str, name: str = "<vnnlib>") -> Property:
    """The property that ``text`` states; ``name`` prefixes error messages."""
    return _Reader(name).property(_forms(text, name))


def read_vnnlib(path: str | Path) -> Property:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"VNN-LIB file {path} does not exist")
    return parse_vnnlib(path.read_text(), str(path))
