"""Tasks about loops and conditionals.

for_while, else_elif, if_ternary, indent_for, while_return_true, enumerate_range.
"""

from __future__ import annotations

import random

from sparse_lens.tasks.base import Example, register
from sparse_lens.tasks.snippets import (
    NAMES, def_header, filler_lines, filler_statement, indent, int_literal, join_lines, pick,
    pick_distinct, scalar_literal, str_literal, target_indent,
)


def _loop_block(rng: random.Random, level: int, kind: str) -> list[str]:
    """A complete two-line `for` or `while` loop at `level` (used as context)."""
    a, b = pick_distinct(rng, NAMES, 2)
    header = f"for {a} in {b}:" if kind == "for" else f"while {a}:"
    return [indent(level) + header, indent(level + 1) + filler_statement(rng)]


def _function_start(rng: random.Random, param: str, loop_prob: float = 0.4,
                    max_filler: int = 2) -> list[str]:
    """A `def` line, 0..max_filler filler statements and sometimes a complete loop of either kind."""
    lines = [def_header(rng, [param])] + filler_lines(rng, 1, 0, max_filler)
    if rng.random() < loop_prob:
        lines += _loop_block(rng, 1, rng.choice(["for", "while"]))
    return lines


def _condition(rng: random.Random) -> str:
    """A loop or if condition that ends with a name, a number or None."""
    a, b = pick_distinct(rng, NAMES, 2)
    return rng.choice([a, f"not {a}", f"{a} < {b}", f"{a} is not None", f"len({a}) > {int_literal(rng)}"])


def _name_condition(rng: random.Random) -> str:
    """A loop condition that ends with a name, as a `for` target does (core for_while: the
    last token then says nothing about the loop kind)."""
    a, b = pick_distinct(rng, NAMES, 2)
    return rng.choice([a, f"not {a}", f"{a} < {b}", f"{a} and {b}", f"{a} != {b}"])


@register("for_while",
          "after `for target` the next token is ' in'; after `while condition` it is ':'",
          hard_adds="a complete loop of either kind earlier in the function; targets like "
          "`i, (a, b)` and conditions ending in a number or None, which give the kind away")
def for_while(rng: random.Random, label: int, hard: bool = True) -> Example:
    seq = rng.choice(NAMES)
    lines = _function_start(rng, seq, loop_prob=0.4 if hard else 0.0)
    if label == 0:
        a, b = pick_distinct(rng, NAMES, 2, exclude=[seq])
        targets = [a, f"{a}, {b}", f"i, ({a}, {b})"] if hard else [a, f"{a}, {b}"]
        lines.append(indent(1) + "for " + rng.choice(targets))
        correct, contrast, suffix = " in", ":", f" {seq}:\n{indent(2)}pass\n"
    else:
        lines.append(indent(1) + "while " + (_condition(rng) if hard else _name_condition(rng)))
        correct, contrast, suffix = ":", " in", f"\n{indent(2)}pass\n"
    return Example(join_lines(lines)[:-1], correct, contrast, suffix, label, contrast_invalid=True)


@register("else_elif",
          "at column 0 after an if block: 'elif' when the if dispatched on a value "
          "(`if mode == \"r\":`), 'else' when it was a yes/no test (`if not items:`)",
          hard_adds="nothing: the two levels draw from the same generator (no distractors to remove)")
def else_elif(rng: random.Random, label: int, hard: bool = True) -> Example:
    var = rng.choice(NAMES)
    literal = lambda: str_literal(rng) if rng.random() < 0.6 else int_literal(rng)  # noqa: E731
    if label == 0:
        condition = f"{var} == {literal()}"
        correct, contrast, suffix = "elif", "else", f" {var} == {literal()}:\n    pass\n"
    else:
        condition = rng.choice([var, f"not {var}", f"{var} is None", f"{var} is not None",
                                f"os.path.exists({var})"])
        correct, contrast, suffix = "else", "elif", ":\n    pass\n"
    lines = filler_lines(rng, 0, 0, 2, avoid=[var]) + [f"if {condition}:"]
    lines += filler_lines(rng, 1, 1, 2)
    return Example(join_lines(lines), correct, contrast, suffix, label)


@register("if_ternary",
          "after `if condition`: ':' when the if starts a statement, ' else' when it is a "
          "conditional expression (`x = a if condition`, `return a if condition`)",
          hard_adds="a complete conditional expression on an earlier line (either class), and "
          "sometimes a complete loop")
def if_ternary(rng: random.Random, label: int, hard: bool = True) -> Example:
    lines = _function_start(rng, rng.choice(NAMES), loop_prob=0.2 if hard else 0.0,
                            max_filler=1 if hard else 2)
    if hard and rng.random() < 0.3:  # a complete ternary as context, whatever the label
        lines.append(indent(1) + f"{rng.choice(NAMES)} = {scalar_literal(rng)} if {_condition(rng)} "
                                 f"else {scalar_literal(rng)}")
    condition = _condition(rng)
    if label == 0:
        lines.append(indent(1) + f"if {condition}")
        correct, contrast, suffix = ":", " else", f"\n{indent(2)}pass\n"
    else:
        head = rng.choice([f"{rng.choice(NAMES)} =", "return"])
        lines.append(indent(1) + f"{head} {scalar_literal(rng)} if {condition}")
        correct, contrast, suffix = " else", ":", f" {scalar_literal(rng)}\n"
    return Example(join_lines(lines)[:-1], correct, contrast, suffix, label, contrast_invalid=True)


def _comprehension_statement(rng: random.Random, seq: str) -> str:
    """A plain statement that still contains `for`: `names = [x.name for x in items]`."""
    target, var = pick_distinct(rng, NAMES, 2, exclude=[seq])
    return rng.choice([
        f"{target} = [{var} * 2 for {var} in {seq}]",
        f"{target} = sum({var} for {var} in {seq})",
        f"{target} = {{{var}: len({var}) for {var} in {seq}}}",
        f"{target} = {scalar_literal(rng)}",
    ])


@register("indent_for",
          "the indentation token of the line after a `for ...:` header (one level deeper) vs "
          "after a plain statement at the same depth",
          hard_adds="the plain statement is often a comprehension that itself contains `for`")
def indent_for(rng: random.Random, label: int, hard: bool = True) -> Example:
    seq, cond, item = pick_distinct(rng, NAMES, 3)
    level = rng.choice([1, 2])
    lines = [def_header(rng, [seq])]
    if level == 2:
        lines.append(indent(1) + rng.choice([f"if {cond}:", f"while {cond}:", f"with {cond}:"]))
    lines += filler_lines(rng, level, 0, 1)
    if label == 0:
        lines.append(indent(level) + f"for {item} in {seq}:")
        correct, contrast = target_indent(level + 1), target_indent(level)
    else:
        plain = _comprehension_statement(rng, seq) if hard else filler_statement(rng, avoid=[seq])
        lines.append(indent(level) + plain)
        correct, contrast = target_indent(level), target_indent(level + 1)
    return Example(join_lines(lines), correct, contrast, " pass\n", label, contrast_invalid=True)


def _search_loop(rng: random.Random) -> tuple[list[str], str]:
    """A `while` loop that searches for a match, and the parameter list of its function."""
    seq, target, i = pick_distinct(rng, NAMES, 3)
    if rng.random() < 0.5:
        test = rng.choice([f"{seq}[{i}] == {target}", f"{seq}[{i}].startswith({target})",
                           f"{target} in {seq}[{i}]"])
        return [indent(1) + f"{i} = 0", indent(1) + f"while {i} < len({seq}):",
                indent(2) + f"if {test}:", "RETURN", indent(2) + f"{i} += 1"], f"{seq}, {target}"
    node = pick(rng, NAMES, exclude=[seq, target])
    return [indent(1) + f"{node} = {seq}", indent(1) + f"while {node} is not None:",
            indent(2) + f"if {node}.value == {target}:", "RETURN",
            indent(2) + f"{node} = {node}.next"], f"{seq}, {target}"


@register("while_return_true",
          "in a function searching with a while loop: 'return' inside the found-it branch is "
          "followed by ' True', the 'return' after the loop by ' False'",
          hard_adds="nothing: the two levels draw from the same generator (no distractors to remove)")
def while_return_true(rng: random.Random, label: int, hard: bool = True) -> Example:
    body, params = _search_loop(rng)
    found = indent(3) + "return"
    lines = [def_header(rng, [params], name=f"has_{rng.choice(NAMES)}")]
    if label == 0:  # stop inside the loop
        lines += body[:body.index("RETURN")] + [found]
        correct, contrast = " True", " False"
    else:
        lines += [found + " True" if line == "RETURN" else line for line in body]
        lines.append(indent(1) + "return")
        correct, contrast = " False", " True"
    return Example(join_lines(lines)[:-1], correct, contrast, "\n", label)


@register("enumerate_range",
          "after `for i, item in` the next token is ' enumerate', after `for i in` it is "
          "' range' (index-style names in both)",
          hard_adds="nothing: the two levels draw from the same generator (no distractors to remove)")
def enumerate_range(rng: random.Random, label: int, hard: bool = True) -> Example:
    seq = rng.choice(NAMES)
    lines = _function_start(rng, seq)
    index = rng.choice(["i", "j", "k", "n", "idx", "index", "pos", "lineno"])
    item = pick(rng, NAMES, exclude=[seq, index])
    if label == 0:
        lines.append(indent(1) + f"for {index}, {item} in")
        correct, contrast, call = " enumerate", " range", f"({seq})"
    else:
        lines.append(indent(1) + f"for {index} in")
        correct, contrast, call = " range", " enumerate", f"(len({seq}))"
    return Example(join_lines(lines)[:-1], correct, contrast, f"{call}:\n{indent(2)}pass\n", label)
