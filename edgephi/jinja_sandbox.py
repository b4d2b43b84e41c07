"""A Jinja sandbox for chat templates that bounds time and size: transformers' chat-template
environment, with every way a template can grow a value checked before it allocates.

Budgets: compiling, and each render, stop after a number of seconds (a sys.settrace tracer on this
thread following the template's code; the caller restores the previous tracer). No value and no
output may exceed a number of characters: operators, `~`, block buffers, printing and the string
methods and filters that can grow their input are checked before they allocate, and are never
folded at compile time (`{{ 10**(10**8) }}` would hang from_string). A guard against runaway
templates, not a process boundary: a C routine reached some other way may still allocate in one call.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from datetime import datetime
from itertools import chain

import jinja2
from jinja2.compiler import CodeGenerator
from jinja2.runtime import markup_join, str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import pass_context

_INT_BITS = 1 << 16  # no template needs more; computing a huge int is one uninterruptible C call
CONTAINERS = (list, tuple, dict, set, frozenset)
# the template's code, jinja's and the chat template's: where the time budget may interrupt
STOPPABLE = ("<template>", os.path.dirname(jinja2.__file__), os.path.dirname(__file__))
_FIELDS = {"%": re.compile(r"%[^a-zA-Z%]*"), "{": re.compile(r"\{[^{}]*:[^{}]*\}")}  # where widths are


class Abort(BaseException):
    """Ends a render: a BaseException, so that no `except Exception` inside jinja swallows it."""


class Budget:
    """One compile or render: a deadline and the characters any value and the output may reach."""

    def __init__(self, limit: int, seconds: float):
        self.limit, self.seconds, self.deadline = limit, seconds, time.monotonic() + seconds
        self.written = 0  # characters written to the output and into block buffers
        self._measured: dict[int, tuple] = {}  # id -> (container, measures): loops re-measure messages

    def measure(self, obj) -> tuple[int, int, int]:
        """Characters str(obj) may take (strings their length, containers one more per item), the
        nesting depth and the number of items in containers; counting stops past the limit."""
        if id(obj) in self._measured:
            return self._measured[id(obj)][1]
        total, depth, items, stack = 0, 0, 0, [(obj, 1)]
        while stack and total <= self.limit:
            x, d = stack.pop()
            if isinstance(x, str):
                total += len(x)
            elif isinstance(x, int):
                total += x.bit_length() // 3 + 1
            elif isinstance(x, CONTAINERS):
                total, depth, items = total + len(x) + 1, max(depth, d), items + len(x)
                stack.extend((y, d + 1) for y in (chain.from_iterable(x.items()) if isinstance(x, dict) else x))
            else:
                total += 1
        if isinstance(obj, CONTAINERS):
            self._measured[id(obj)] = (obj, (total, depth, items))  # holding obj keeps its id unique
        return total, depth, items

    def size(self, obj) -> int:
        return self.measure(obj)[0]

    def check(self, size: int, what: str) -> None:
        if size > self.limit:
            raise Abort(f"{what} would exceed the size budget of {self.limit} characters")

    def wrote(self, n: int) -> None:
        self.written += n
        self.check(self.written, "the template's output")

    def checked(self, value, what: str):
        if isinstance(value, int) and value.bit_length() > _INT_BITS:
            raise Abort(f"{what} gives an integer of more than {_INT_BITS} bits")
        self.check(self.size(value), what)
        return value

    def counted(self, pieces):
        for piece in pieces:
            self.wrote(len(piece))
            yield piece

    def trace(self, frame, event, arg):
        # runs at every call in this thread, and at every line of the template's compiled code; it
        # raises only in code that runs the template, never in (say) a finalizer, which would
        # swallow the error with the tracer unset
        where = frame.f_code.co_filename
        if where.startswith(STOPPABLE) and time.monotonic() > self.deadline:
            raise Abort(f"took longer than the time budget of {self.seconds:g} s")
        return self.trace if where == "<template>" else None


def _format_size(fmt: str, marker: str, args: tuple, budget: Budget) -> int:
    """Bound on fmt % args or fmt.format(*args): each field may print every argument at the widest
    width or precision in a field spec or passed as an int."""
    digits = re.findall(r"\d+", " ".join(_FIELDS[marker].findall(fmt)))
    widest = max([int(d) if len(d) < 19 else 10**19 for d in digits] + [abs(a) for a in args if isinstance(a, int)],
                 default=0)
    return len(fmt) + fmt.count(marker) * (budget.size(args) + widest)


def _growth(name: str, s, args: tuple, kwargs: dict, budget: Budget, method: bool) -> int:
    """Bound on the result of the str methods (s: the string) and filters (s: the value) that can
    grow far beyond their inputs; 0 for all others, whose results only get checked afterwards."""
    arg = lambda i, key, default: args[i] if len(args) > i else kwargs.get(key, default)  # noqa: E731
    size = budget.size(s)
    if name in ("center", "ljust", "rjust", "zfill"):
        return max([size] + [a for a in chain(args, kwargs.values()) if isinstance(a, int)])
    if name == "expandtabs":
        return size + s.count("\t") * max(arg(0, "tabsize", 8), 0)
    if name == "replace" and len(args) >= 2:  # the filter turns old and new into strings
        return size + (str(s).count(str(args[0])) if args[0] != "" else size + 1) * budget.size(args[1])
    if name == "join":
        items, sep = (arg(0, "iterable", ()), s) if method else (s, arg(0, "d", ""))
        return budget.size(items) + len(items) * budget.size(sep)
    if name in ("format", "format_map") and isinstance(s, str):
        return _format_size(s, "{" if method else "%", args + tuple(kwargs.values()), budget)
    if name == "translate" and args and isinstance(args[0], dict):
        return size * max(map(budget.size, args[0].values()), default=1)
    if name == "indent":
        width = arg(0, "width", 4)
        lines = s.count("\n") + 1 if isinstance(s, str) else size
        return size + lines * (width if isinstance(width, int) else budget.size(width))
    if name == "wordwrap":  # a break may follow any character
        return size * (1 + budget.size(arg(2, "wrapstring", "\n") or "\n"))
    if name == "urlize":  # each link repeats the attributes
        return size * (1 + budget.size(args) + budget.size(kwargs))
    if name == "tojson":  # each item is indented by up to depth x indent
        _, depth, items = budget.measure(s)
        indent = arg(1, "indent", None)
        return size + (items + 1) * depth * (indent if isinstance(indent, int) else budget.size(indent))
    if name == "batch":
        return size + arg(0, "linecount", 0)
    return 0


class _Buffer(list):
    """The output of a macro, {% set %} block, filter block or call block, counted as written."""

    def __init__(self, budget: Budget):
        super().__init__()
        self.budget = budget

    def append(self, piece):
        self.budget.wrote(len(piece))
        super().append(piece)

    def extend(self, pieces):  # jinja passes a tuple
        self.budget.wrote(sum(map(len, pieces)))
        super().extend(pieces)


class _CodeGenerator(CodeGenerator):
    def buffer(self, frame):
        frame.buffer = self.temporary_identifier()
        self.writeline(f"{frame.buffer} = environment.buffer()")

    def visit_Concat(self, node, frame):  # `a ~ b`: bounded before the string is built
        self.write("environment.join_checked((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("), context.eval_ctx)")


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):  # transformers'
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    raise Abort(str(message))


class SandboxEnvironment(ImmutableSandboxedEnvironment):
    """transformers' chat-template environment, with every way to grow a value bounded."""

    intercepted_binops = frozenset(("+", "-", "*", "/", "//", "%", "**"))
    code_generator_class = _CodeGenerator

    def __init__(self):
        super().__init__(trim_blocks=True, lstrip_blocks=True, finalize=self._finalize,
                         extensions=["jinja2.ext.loopcontrols"])
        self.local = threading.local()  # .budget: the budget of what runs in this thread
        self.globals.update(raise_exception=_raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
        self.filters["tojson"] = _tojson
        self.filters = {name: self._guarded(name, f) for name, f in self.filters.items()}

    def _guarded(self, name, func):
        kind = getattr(getattr(func, "jinja_pass_arg", None), "name", None)  # what jinja passes first

        @pass_context  # which also keeps jinja from running it on constants when compiling
        def guarded(context, value, *args, **kwargs):
            budget = self.local.budget
            if name == "join" and not isinstance(value, (str, list, tuple)):
                value = list(value)  # a generator is measured once materialized
            budget.check(budget.size(value), f"the value given to '{name}'")
            budget.check(_growth(name, value, args, kwargs, budget, method=False), f"'{name}'")
            first = {"context": (context,), "eval_context": (context.eval_ctx,), "environment": (self,)}
            return budget.checked(func(*first.get(kind, ()), value, *args, **kwargs), f"'{name}'")
        return guarded

    def call_binop(self, context, operator, left, right):
        budget = self.local.budget
        if operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
            if right * left.bit_length() > _INT_BITS:
                raise Abort(f"'**' gives an integer of more than {_INT_BITS} bits")
        elif operator == "*" and isinstance(left, int) != isinstance(right, int):
            seq, n = (right, left) if isinstance(left, int) else (left, right)
            budget.check(budget.size(seq) * max(n, 0), "'*'")
        elif operator == "%" and isinstance(left, str):
            budget.check(_format_size(left, "%", right if isinstance(right, tuple) else (right,), budget), "'%'")
        elif operator == "+":
            budget.check(budget.size(left) + budget.size(right), "'+'")
        return budget.checked(super().call_binop(context, operator, left, right), f"'{operator}'")

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's signature)
        budget = __self.local.budget
        owner = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)  # jinja wraps str.format
        if isinstance(owner, (bytes, bytearray)):  # no template needs them; their center() etc. are unbounded
            raise Abort("chat templates cannot call bytes methods")
        if isinstance(owner, str):
            name = getattr(__obj, "__name__", "")
            if name == "join" and args:
                args = (list(args[0]),) + args[1:]  # a generator is measured once materialized
            budget.check(_growth(name, owner, args, kwargs, budget, method=True), f"'{name}'")
        return budget.checked(super().call(__context, __obj, *args, **kwargs), "a call")

    def join_checked(self, values, eval_ctx):
        self.local.budget.check(sum(map(self.local.budget.size, values)), "'~'")
        return markup_join(values) if eval_ctx.autoescape else str_join(values)

    def buffer(self):
        return _Buffer(self.local.budget)

    def _finalize(self, value):
        # what {{ }} prints: a list holding one long string many times must not reach str()
        self.local.budget.check(self.local.budget.size(value), "a printed value")
        return value
