"""Tasks about what a variable or parameter is: its type, which name comes next, and whether a
name is being assigned or compared.

set_or_string, set_or_string_fixedvarname, var_swap, var_if, if_equals, final_kwarg.
"""

from __future__ import annotations

import random

from sparse_lens.tasks.base import Example, register
from sparse_lens.tasks.snippets import (
    FUNC_NAMES, NAMES, TOKEN_NAMES, def_header, filler_statement, indent, join_lines,
    pick, pick_distinct, scalar_literal, target_indent,
)

_STRING_INITS = ('""', "''", "str()")


def _init_line(rng: random.Random, var: str, as_set: bool) -> str:
    return f"{var} = {'set()' if as_set else rng.choice(_STRING_INITS)}"


def _set_or_string(rng: random.Random, label: int, var: str, distractor: bool) -> Example:
    """Shared body of the two set_or_string tasks: `var` starts as a set (label 0: `.add`) or
    a string (label 1: ` +=`), then filler, then a line that starts using `var`. With
    `distractor`, another variable is initialised with the *other* type."""
    as_set = label == 0
    item, seq = pick_distinct(rng, NAMES, 2, exclude=[var])
    lines = [_init_line(rng, var, as_set)]
    lines += [filler_statement(rng, avoid=[var]) for _ in range(rng.randint(0, 2))]
    if distractor:
        other = pick(rng, NAMES, exclude=[var, item, seq])
        lines.insert(rng.randint(0, len(lines)), _init_line(rng, other, not as_set))
    form = rng.randrange(3)
    if form == 0:
        lines += [f"for {item} in {seq}:", indent(1) + var]
    elif form == 1:
        lines += [f"if {item}:", indent(1) + var]
    else:
        lines.append(var)
    wrap = rng.random() < 0.5  # inside a function
    if wrap:
        lines = [def_header(rng, [seq])] + [indent(1) + line for line in lines]
    correct, contrast = (".add", " +=") if as_set else (" +=", ".add")
    prompt = join_lines(lines)[:-1]  # the prompt stops right after `var`
    return Example(prompt, correct, contrast, suffix=f"({item})\n", label=label)


@register("set_or_string",
          "a variable set to set() or to an empty string earlier: continue it with .add or ' +=' "
          "(names vary)",
          hard_adds="half the prompts also initialise another variable with the other type")
def set_or_string(rng: random.Random, label: int, hard: bool = True) -> Example:
    return _set_or_string(rng, label, pick(rng, NAMES), distractor=hard and rng.random() < 0.5)


@register("set_or_string_fixedvarname",
          "like set_or_string with the variable always named x and no distractor variable",
          hard_adds="nothing: the two levels draw from the same generator (no distractors to remove)")
def set_or_string_fixedvarname(rng: random.Random, label: int, hard: bool = True) -> Example:
    return _set_or_string(rng, label, "x", distractor=False)


@register("var_swap",
          "complete a swap `a, b = b, a`: after `a, b = b,` the first name of the left side; "
          "the classes differ in which of the two earlier-defined names is listed first",
          hard_adds="nothing: the two levels draw from the same generator (no distractors to remove)")
def var_swap(rng: random.Random, label: int, hard: bool = True) -> Example:
    a, b = pick_distinct(rng, TOKEN_NAMES, 2)
    lines = [f"{a} = {scalar_literal(rng)}", f"{b} = {scalar_literal(rng)}"]
    lines += [filler_statement(rng, avoid=[a, b]) for _ in range(rng.randint(0, 1))]
    first, second = (a, b) if label == 0 else (b, a)
    swap = f"{first}, {second} = {second},"
    if rng.random() < 0.5:
        lines += [f"if {first} > {second}:", indent(1) + swap]
    else:
        lines.append(swap)
    return Example(join_lines(lines)[:-1], " " + first, " " + second, suffix="\n", label=label)


def _none_check(rng: random.Random, name: str) -> str:
    return rng.choice([f"if {name} is None:", f"if not {name}:"])


@register("var_if",
          "after `if p is None:` (or `if not p:`) in a function with two optional parameters, "
          "the body's first token is the tested parameter, not the other one",
          hard_adds="half the prompts first test and assign the other parameter")
def var_if(rng: random.Random, label: int, hard: bool = True) -> Example:
    a, b = pick_distinct(rng, TOKEN_NAMES, 2)
    required = pick(rng, NAMES, exclude=[a, b])
    tested, other = (a, b) if label == 0 else (b, a)
    lines = [def_header(rng, [required, f"{a}=None", f"{b}=None"])]
    if hard and rng.random() < 0.5:  # the other parameter was handled first
        lines += [indent(1) + _none_check(rng, other), indent(2) + f"{other} = {scalar_literal(rng)}"]
    lines.append(indent(1) + _none_check(rng, tested))
    prompt = join_lines(lines) + target_indent(2)
    suffix = f" = {scalar_literal(rng)}\n{indent(1)}return {required}\n"
    return Example(prompt, " " + tested, " " + other, suffix, label=label)


def _assignable(rng: random.Random) -> str:
    """Something that can be assigned or compared: `count`, `self.state`, `table[key]`."""
    form = rng.randrange(3)
    name = rng.choice(NAMES)
    if form == 0:
        return name
    if form == 1:
        return f"self.{name}"
    return f"{name}[{pick(rng, NAMES, exclude=[name])}]"


@register("if_equals",
          "after a name, ' ==' when it is being tested (if/while/assert) vs ' =' when a statement "
          "starts with it (an assignment)",
          hard_adds="half the prompts sit inside an `if name:` block, so an assignment follows an if")
def if_equals(rng: random.Random, label: int, hard: bool = True) -> Example:
    lhs, value = _assignable(rng), scalar_literal(rng)
    level = rng.choice([1, 2]) if hard else 1
    lines = [def_header(rng, ["self", rng.choice(NAMES)])]
    lines += [indent(1) + filler_statement(rng) for _ in range(rng.randint(0, 2))]
    if level == 2:
        lines.append(indent(1) + f"if {rng.choice(NAMES)}:")
    if label == 0:
        keyword = rng.choice(["if", "while", "assert"])
        lines.append(indent(level) + f"{keyword} {lhs}")
        body = "\n" if keyword == "assert" else f":\n{indent(level + 1)}pass\n"
        return Example(join_lines(lines)[:-1], " ==", " =", f" {value}{body}", label,
                       contrast_invalid=True)
    lines.append(indent(level) + lhs)
    return Example(join_lines(lines)[:-1], " =", " ==", f" {value}\n", label)


@register("final_kwarg",
          "calling a function whose parameters (no defaults) are passed by keyword in order: "
          "after a keyword argument, ) if it was the last parameter, else ','",
          max_prompt_tokens=72,
          hard_adds="nothing: the two levels draw from the same generator (no distractors to remove)")
def final_kwarg(rng: random.Random, label: int, hard: bool = True) -> Example:
    func = rng.choice(FUNC_NAMES)
    params = pick_distinct(rng, NAMES, rng.randint(2, 4))
    signature = (["*"] if rng.random() < 0.3 else []) + params
    lines = [def_header(rng, signature, name=func), indent(1) + f"return {params[0]}", ""]
    passed = len(params) if label == 0 else rng.randint(1, len(params) - 1)
    kwargs = [f"{p}={scalar_literal(rng)}" for p in params]
    result = pick(rng, NAMES, exclude=params)
    prompt = join_lines(lines) + f"{result} = {func}(" + ", ".join(kwargs[:passed])
    if label == 0:
        return Example(prompt, ")", ",", "\n", label, contrast_invalid=True)
    return Example(prompt, ",", ")", " " + ", ".join(kwargs[passed:]) + ")\n", label,
                   contrast_invalid=True)
