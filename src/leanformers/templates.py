"""Chat templates: Jinja code that ships with model files, rendered in a sandbox with limits.

jinja2's ImmutableSandboxedEnvironment already keeps a template away from Python internals and from
mutating its inputs; it does not stop a template from running for ever or exhausting memory
(`{% for %}` over nested `range(99999)`, `99999999**99999999`, a string doubled in a loop).
`BoundedEnvironment` adds limits that scale with the size of the conversation, so that real templates
over long conversations render as before while hostile ones fail fast with TemplateLimitError:

- time: a render may take TIME_LIMIT seconds. A trace function, installed on the rendering thread only
  for the duration of the render, checks the clock at every Python line executed under it (template code,
  jinja's runtime and filters), so any Python-level loop ends;
- size: every operation that can build a big value in one C call is checked *before* it runs: `**`
  (result bits), `*` (repetition), `+`, `%` and `~` (concatenation), turning a value into text (`{{ x }}`,
  `|string`, `|join`, `|tojson`, ...), the str methods that grow (center, ljust, rjust, zfill, expandtabs,
  join, replace, format, translate) and split/list/slice/batch (item counts). A single string may not
  exceed `max_chars` = 1 Mi + 4 x the conversation's size; all strings built by these operations together
  may not exceed 32 x that; the output neither. `range()` is capped by the sandbox (100000 items) and
  `lipsum` by small bounds;
- compiling: a template has at most MAX_TEMPLATE_CHARS characters and is compiled within the same time
  limit, with jinja's constant folding turned off, so no expression is evaluated outside a render's limits.

The trace function stands in for any debugger or coverage tracer of the thread while a template renders
(the previous one is restored afterwards): template code is not traced by them.

Failures surface as TemplateLimitError (or the template's own errors), which the tokenizer turns into a
TokenizerError naming the template's file.
"""

from __future__ import annotations

import json
import re
import string
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from itertools import islice
from typing import Any, Callable

import jinja2
import jinja2.ext
from jinja2 import filters as jinja_filters
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace, generate_lorem_ipsum

TIME_LIMIT = 5.0  # seconds per render
BASE_CHARS = 1 << 20  # a single string may be this long plus 4 x the conversation's size
MAX_NODES = 1 << 20  # containers walked when estimating the text of a value
MAX_TEMPLATE_CHARS = 1 << 20  # real chat templates are a few KB
_MAX_INT_BITS = 1 << 16


class TemplateLimitError(Exception):
    """A chat template went over a time or size limit."""


class TemplateRaised(Exception):
    """The template called raise_exception(message)."""


class _Limits:
    """The budget of one render: a deadline, a per-string size and a total of characters built."""

    def __init__(self, input_chars: int, seconds: float = TIME_LIMIT):  # the default: hooks outside a render
        self.deadline = time.monotonic() + seconds
        self.seconds = seconds
        self.max_chars = BASE_CHARS + 4 * input_chars
        self.left = 32 * self.max_chars

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateLimitError(f"the template took more than {self.seconds:g} s")

    def build(self, n: int, what: str) -> None:
        """Account for a value of `n` characters (or items) about to be built."""
        if n > self.max_chars:
            raise TemplateLimitError(f"{what} would be {n} characters or items long (limit {self.max_chars})")
        self.left -= n
        if self.left < 0:
            raise TemplateLimitError(f"the template built more than {32 * self.max_chars} characters in all")


_state = threading.local()


def _limits() -> _Limits:
    """The current render's limits (a fresh default budget outside renders, e.g. constant folding)."""
    return getattr(_state, "limits", None) or _Limits(0)


def text_size(value: Any, limit: int | None = None) -> int:
    """An upper estimate of len(str(value)), walking containers iteratively (at most MAX_NODES nodes) and
    stopping as soon as `limit` is exceeded; shared references count every time they are reached."""
    total, nodes, stack = 0, 0, [value]
    while stack:
        v = stack.pop()
        nodes += 1
        if isinstance(v, str):
            total += len(v) + 2  # quotes when inside a container
        elif isinstance(v, (bool, type(None), float)):
            total += 24
        elif isinstance(v, int):
            total += v.bit_length() // 3 + 2
        elif isinstance(v, (list, tuple, set, frozenset, dict, Namespace)):
            if isinstance(v, Namespace):
                v = object.__getattribute__(v, "_Namespace__attrs")
            items = [*v.keys(), *v.values()] if isinstance(v, dict) else v
            nodes += len(items)
            if nodes > MAX_NODES:
                raise TemplateLimitError(f"a value with more than {MAX_NODES} elements was turned into text")
            total += 2 + 2 * len(items)
            stack.extend(items)
        else:  # macros, loop objects, undefined, cyclers: short reprs
            total += 64
        if limit is not None and total > limit:
            break
    return total


def _as_text(value: Any, what: str) -> Any:
    limits = _limits()
    if not isinstance(value, str):
        limits.build(text_size(value, limits.max_chars), what)
    return value


# --- operators ----------------------------------------------------------------------------------------------

def _check_binop(op: str, left: Any, right: Any) -> None:
    limits = _limits()
    limits.check_time()
    ints = isinstance(left, int) and isinstance(right, int)
    if op == "**" and ints and right > 0 and abs(left) > 1:
        if right * left.bit_length() > _MAX_INT_BITS:
            raise TemplateLimitError(f"{left} ** {right} would have more than {_MAX_INT_BITS} bits")
    elif op == "*" and ints:
        if left.bit_length() + right.bit_length() > _MAX_INT_BITS:
            raise TemplateLimitError(f"a product of more than {_MAX_INT_BITS} bits")
    elif op == "*":
        seq, n = (left, right) if isinstance(right, int) else (right, left)
        if isinstance(n, int) and isinstance(seq, (str, list, tuple)) and n > 0:
            unit = len(seq) if isinstance(seq, str) else text_size(seq, limits.max_chars)
            limits.build(unit * n, "a repeated string or list")
    elif op == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
        if isinstance(left, str) and isinstance(right, str):
            limits.build(len(left) + len(right), "a concatenated string")
        else:
            limits.build(text_size(left, limits.max_chars) + text_size(right, limits.max_chars), "a concatenated list")
    elif op == "%" and isinstance(left, str):
        _check_printf(left, right)


_PRINTF_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")


def _check_printf(fmt: str, args: Any) -> None:
    limits = _limits()
    for width, precision in _PRINTF_SPEC.findall(fmt):
        for number in (width, precision):
            if number == "*" or (number and int(number) > limits.max_chars):
                raise TemplateLimitError(f"format {fmt[:40]!r} asks for a field width over {limits.max_chars}")
    limits.build(len(fmt) + text_size(args, limits.max_chars), "a formatted string")


def _check_format(fmt: str, args: tuple, kwargs: dict) -> None:
    limits = _limits()
    try:
        fields = list(string.Formatter().parse(fmt))
    except ValueError:
        return  # str.format raises the same error itself
    for _, _, spec, _ in fields:
        if spec and "{" in spec:
            raise TemplateLimitError(f"format {fmt[:40]!r}: nested replacement fields in a format spec")
        for number in re.findall(r"\d+", spec or ""):
            if int(number) > limits.max_chars:
                raise TemplateLimitError(f"format {fmt[:40]!r} asks for a field width over {limits.max_chars}")
    limits.build(len(fmt) + text_size((args, kwargs), limits.max_chars), "a formatted string")


def _items(value: Any, what: str) -> list:
    """An iterable as a list of at most max_chars items."""
    limits = _limits()
    if isinstance(value, str):
        limits.build(len(value), what)
        return list(value)
    items = list(islice(iter(value), limits.max_chars + 1))
    limits.build(len(items), what)
    return items


# --- str methods called from templates ---------------------------------------------------------------------

def _check_str_method(s: str, name: str, args: tuple, kwargs: dict) -> None:
    limits = _limits()
    first = args[0] if args else None
    if name in ("center", "ljust", "rjust", "zfill") and isinstance(first, int):
        limits.build(max(len(s), first), f"str.{name}()")
    elif name == "expandtabs":
        size = kwargs.get("tabsize", first if first is not None else 8)
        if isinstance(size, int):
            limits.build(len(s) + s.count("\t") * max(size, 0), "str.expandtabs()")
    elif name == "join" and args:
        parts = _items(first, "str.join()")
        limits.build(text_size(parts, limits.max_chars) + len(s) * len(parts), "str.join()")
    elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        n = s.count(args[0]) if args[0] else len(s) + 1
        if len(args) > 2 and isinstance(args[2], int) and args[2] >= 0:
            n = min(n, args[2])
        limits.build(len(s) + n * max(len(args[1]) - len(args[0]), 0), "str.replace()")
    elif name == "translate" and isinstance(first, dict):
        longest = max((len(v) for v in first.values() if isinstance(v, str)), default=1)
        limits.build(len(s) * max(longest, 1), "str.translate()")
    elif name in ("split", "rsplit", "splitlines"):
        limits.build(len(s) // 2 + 1, f"str.{name}()")


# --- filters ------------------------------------------------------------------------------------------------

def _bounded_filters() -> dict[str, Callable]:
    """Wrappers of the jinja filters that can build big values, checking sizes before they run."""
    f = jinja_filters

    def center(value: Any, width: int = 80) -> str:
        if isinstance(width, int):
            _limits().build(max(len(str(_as_text(value, "center"))), width), "|center")
        return f.do_center(value, width)

    def indent(s: Any, width: int | str = 4, first: bool = False, blank: bool = False) -> str:
        s = str(_as_text(s, "|indent"))
        unit = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
        _limits().build(len(s) + (s.count("\n") + 2) * max(unit, 0), "|indent")
        return f.do_indent(s, width, first, blank)

    @jinja2.pass_environment
    def wordwrap(env: Any, s: Any, width: int = 79, break_long_words: bool = True, wrapstring: str | None = None,
                 break_on_hyphens: bool = True) -> str:
        s = str(_as_text(s, "|wordwrap"))
        sep = len(wrapstring) if isinstance(wrapstring, str) else 1
        if isinstance(width, int) and width > 0:
            _limits().build(len(s) + (len(s) // width + s.count("\n") + 1) * sep, "|wordwrap")
        return f.do_wordwrap(env, s, width, break_long_words, wrapstring, break_on_hyphens)

    @jinja2.pass_eval_context
    def join(ctx: Any, value: Any, d: str = "", attribute: Any = None) -> str:
        items = _items(value, "|join")
        limits = _limits()
        limits.build(text_size(items, limits.max_chars) + len(str(d)) * len(items), "|join")
        return f.sync_do_join(ctx, items, d, attribute)

    def format_(value: Any, *args: Any, **kwargs: Any) -> str:
        _check_printf(str(_as_text(value, "|format")), kwargs or args)
        return f.do_format(value, *args, **kwargs)

    @jinja2.pass_eval_context
    def replace(ctx: Any, s: Any, old: Any, new: Any, count: int | None = None) -> str:
        s, old, new = str(_as_text(s, "|replace")), str(old), str(new)
        n = s.count(old) if old else len(s) + 1
        if isinstance(count, int) and count >= 0:
            n = min(n, count)
        _limits().build(len(s) + n * max(len(new) - len(old), 0), "|replace")
        return f.do_replace(ctx, s, old, new, count)

    def string_(value: Any) -> str:
        return f.do_string(_as_text(value, "|string"))

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        if indent is not None and (not isinstance(indent, int) or not 0 <= indent <= 16):
            raise TemplateLimitError(f"|tojson indent must be an integer in [0, 16], got {indent!r:.40}")
        limits = _limits()
        limits.build(text_size(value, limits.max_chars) * (1 + (indent or 0)), "|tojson")
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def pprint(value: Any) -> str:
        limits = _limits()
        limits.build(2 * text_size(value, limits.max_chars), "|pprint")
        return f.do_pprint(value)

    @jinja2.pass_environment
    def sum_(env: Any, iterable: Any, attribute: Any = None, start: Any = 0) -> Any:
        if isinstance(start, bool) or not isinstance(start, (int, float)):
            raise TemplateLimitError("|sum only adds numbers (start must be a number)")
        return f.sync_do_sum(env, _items(iterable, "|sum"), attribute, start)

    def list_(value: Any) -> list:
        return _items(value, "|list")

    def slice_(value: Any, slices: int, fill_with: Any = None) -> Any:
        items = _items(value, "|slice")
        if isinstance(slices, int) and slices > len(items) + 1:
            _limits().build(slices, "|slice")
        return f.sync_do_slice(items, slices, fill_with)

    def batch(value: Any, linecount: int, fill_with: Any = None) -> Any:
        items = _items(value, "|batch")
        if isinstance(linecount, int) and fill_with is not None:
            _limits().build(linecount, "|batch")
        return f.do_batch(items, linecount, fill_with)

    return {"center": center, "indent": indent, "wordwrap": wordwrap, "join": join, "format": format_,
            "replace": replace, "string": string_, "tojson": tojson, "pprint": pprint, "sum": sum_, "list": list_,
            "slice": slice_, "batch": batch}


def _lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:  # noqa: A002
    if not all(isinstance(v, int) and 0 <= v <= 1000 for v in (n, min, max)) or n > 100:
        raise TemplateLimitError("lipsum(): n must be at most 100 and min/max at most 1000")
    return generate_lorem_ipsum(n, html, min, max)


# --- the environment ----------------------------------------------------------------------------------------

class _BoundedCodeGenerator(CodeGenerator):
    """Compiles `a ~ b` into a call that checks the size of the joined string before building it."""

    def visit_Concat(self, node: jinja2.nodes.Concat, frame: Any) -> None:
        self.write("environment.bounded_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (assistant-mask marker): renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message: Any) -> None:
    raise TemplateRaised(str(message)[:1000])


@jinja2.pass_context
def _finalize(context: Any, value: Any) -> Any:
    return _as_text(value, "an expression's text")


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The immutable sandbox plus size checks on operators, concatenation, output, str methods and filters."""

    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset({"**", "*", "+", "%"})

    def __init__(self, **kwargs: Any):
        # optimized=False and a context-taking finalize: nothing is evaluated while compiling (jinja would
        # fold constant expressions and filter calls into the compiled code, outside any render's limits)
        super().__init__(finalize=_finalize, optimized=False, **kwargs)
        self.filters.update(_bounded_filters())
        self.globals.update(lipsum=_lipsum, raise_exception=_raise_exception,
                            strftime_now=lambda fmt: datetime.now().strftime(str(_as_text(fmt, "strftime_now"))))

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _check_binop(operator, left, right)
        return super().call_binop(context, operator, left, right)

    def bounded_concat(self, parts: tuple) -> str:
        texts = [p if isinstance(p, str) else str(_as_text(p, "a ~ operand")) for p in parts]
        _limits().build(sum(map(len, texts)), "a string joined with ~")
        return "".join(texts)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        _limits().check_time()
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str) and not isinstance(__obj, type):
            _check_str_method(owner, getattr(__obj, "__name__", ""), args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        fmt = value.__self__

        def checked(*args: Any, **kwargs: Any) -> str:
            _check_format(fmt, args, kwargs)
            return wrapped(*args, **kwargs)

        return checked


ENVIRONMENT = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                 extensions=[jinja2.ext.loopcontrols, _GenerationTag])


@contextmanager
def _bounded(limits: _Limits, doing: str) -> Iterator[None]:
    """Run the body under `limits`: its deadline checked at every Python line (a trace function on this thread
    only, the previous one restored afterwards) and the size checks of this module reading `limits`."""

    def trace(frame: Any, event: str, arg: Any) -> Any:
        if time.monotonic() > limits.deadline:
            raise TemplateLimitError(f"{doing} took more than {limits.seconds:g} s")
        return trace

    previous_limits, previous_trace = getattr(_state, "limits", None), sys.gettrace()
    _state.limits = limits
    sys.settrace(trace)
    try:
        yield
    finally:
        sys.settrace(previous_trace)
        _state.limits = previous_limits


def render(template: jinja2.Template, context: dict[str, Any], *, seconds: float | None = None) -> str:
    """Render under the limits of the module docstring (TIME_LIMIT seconds unless `seconds` is given);
    budgets scale with the text size of `context`."""
    limits = _Limits(text_size(context), TIME_LIMIT if seconds is None else seconds)
    with _bounded(limits, "rendering"):
        out: list[str] = []
        size = 0
        for piece in template.generate(**context):
            size += len(piece)
            if size > limits.max_chars:
                raise TemplateLimitError(f"the output exceeds {limits.max_chars} characters")
            out.append(piece)
        return "".join(out)


def compile_template(source: str, *, seconds: float | None = None) -> jinja2.Template:
    """Compile a chat template (at most MAX_TEMPLATE_CHARS characters) in the bounded environment, under the
    same time limit as a render (jinja's lexer and parser are Python; nothing is evaluated while compiling)."""
    if len(source) > MAX_TEMPLATE_CHARS:
        raise TemplateLimitError(f"the template is {len(source)} characters long (limit {MAX_TEMPLATE_CHARS})")
    with _bounded(_Limits(0, TIME_LIMIT if seconds is None else seconds), "compiling"):
        return ENVIRONMENT.from_string(source)
