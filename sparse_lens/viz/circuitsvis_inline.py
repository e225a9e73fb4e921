"""circuitsvis components that render offline: the bundle inlined once, the data made script-safe.

circuitsvis 1.43's own HTML (`str(view)`, `show_code()`) imports its JavaScript from a CDN, which
is a blank page offline; its `local_src` inlines the whole 1.3 MB bundle again in every view, and
its data goes into a `<script>` unescaped (a token containing `</script>` breaks out of it). The
wheel does ship that bundle (`circuitsvis/dist/cdn/iife.js`, which defines the global
`CircuitsVis` with `render` and every component), so here:

- `bundle_script()` is the bundle as one classic `<script>` (a page includes it once);
- `attention_heads`, `text_neuron_activations` and `topk_samples` take the arguments of the
  circuitsvis functions of the same names and return a `<div>` plus a small `<script>` calling
  `CircuitsVis.render(id, CircuitsVis.<Component>, props)`, with exactly the props those
  functions pass (tests compare them) written as JSON with `<`, `>` and `&` escaped.

The component's React code shows tokens as text nodes, so the browser never parses them as markup.
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import numpy as np
import torch

BUNDLE_RELATIVE_PATH = ("dist", "cdn", "iife.js")
#: the window event the bundle's script fires once `CircuitsVis` is defined
READY_EVENT = "sparse-lens-circuitsvis-ready"
#: characters that must not appear raw inside a <script> element's data
_SCRIPT_UNSAFE = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def bundle_path() -> Path:
    """The circuitsvis JavaScript bundle shipped in its wheel."""
    import circuitsvis

    path = Path(circuitsvis.__file__).parent.joinpath(*BUNDLE_RELATIVE_PATH)
    if not path.is_file():
        raise FileNotFoundError(
            f"circuitsvis {getattr(circuitsvis, '__version__', '?')} has no JavaScript bundle at "
            f"{path}; the offline views need the wheel's dist/cdn/iife.js")
    return path


def bundle_script() -> str:
    """The circuitsvis bundle as one inline classic `<script>` (it defines `window.CircuitsVis`).

    `</script` inside the bundle (one string literal in React) becomes `<\\/script`, the same string
    to JavaScript; the source-map comment is dropped so no browser asks for the missing map."""
    import circuitsvis

    js = bundle_path().read_text(encoding="utf-8")
    js = re.sub(r"^//# sourceMappingURL=.*$", "", js, flags=re.MULTILINE)
    js = re.sub(r"</(script)", r"<\\/\1", js, flags=re.IGNORECASE).replace("<!--", "<\\!--")
    version = getattr(circuitsvis, "__version__", "unknown")
    # views mounted before the bundle arrived (a notebook whose first output was cleared) wait
    # for this event
    ready = (f'if (typeof window !== "undefined" && window.dispatchEvent) '
             f'{{ window.dispatchEvent(new Event("{READY_EVENT}")); }}')
    return f'<script data-sparse-lens-bundle="circuitsvis {version}">\n{js}\n{ready}\n</script>'


def script_safe_json(value) -> str:
    """`value` as JSON (tensors and arrays as nested lists) that is safe inside `<script>`."""
    text = json.dumps(_plain(value))
    for char, escaped in _SCRIPT_UNSAFE.items():
        text = text.replace(char, escaped)
    return text


def _plain(value):
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def mount(component: str, props: dict) -> str:
    """A `<div>` and the `<script>` that renders circuitsvis's `component` into it (the page must
    load `bundle_script()` first). Props that are None are left out, as circuitsvis does."""
    if not re.fullmatch(r"[A-Za-z]+", component):
        raise ValueError(f"not a circuitsvis component name: {component!r}")
    element_id = f"sparse-lens-cv-{uuid.uuid4().hex[:16]}"
    data = script_safe_json({k: v for k, v in props.items() if v is not None})
    return (
        f'<div id="{element_id}" class="sl-cv" data-component="{component}" style="margin: 12px 0;"></div>\n'
        "<script>(function () {\n"
        f'  var el = document.getElementById("{element_id}");\n'
        "  function draw(component, props) {\n"
        '    if (typeof CircuitsVis === "undefined") {  // wait for the bundle (a notebook)\n'
        '      el.textContent = "(the circuitsvis bundle is not loaded on this page; in a notebook, '
        'display sparse_lens.viz.NOTEBOOK_BUNDLE)";\n'
        '      if (typeof window !== "undefined" && window.addEventListener) {\n'
        f'        window.addEventListener("{READY_EVENT}", function () {{\n'
        '          el.textContent = ""; draw(component, props); }, {once: true});\n'
        "      }\n"
        "      return;\n"
        "    }\n"
        f'    CircuitsVis.render("{element_id}", CircuitsVis[component], props);\n'
        "  }\n"
        f'  draw("{component}", {data});\n'
        "})();</script>")


# ---------------------------------------------------------------------------- components
def attention_heads(attention, tokens: list[str], attention_head_names: list[str] | None = None,
                    max_value: float | None = None, min_value: float | None = None,
                    mask_upper_tri: bool | None = None) -> str:
    """`circuitsvis.attention.attention_heads`: `attention` [n_heads, dest, src], one heatmap
    per head, `tokens` one string per position."""
    return mount("AttentionHeads", {
        "attention": attention, "attentionHeadNames": attention_head_names,
        "maxValue": max_value, "minValue": min_value, "tokens": tokens,
        "maskUpperTri": mask_upper_tri})


def text_neuron_activations(tokens: list[list[str]], activations: list,
                            first_dimension_name: str = "Layer", second_dimension_name: str = "Neuron",
                            first_dimension_labels: list[str] | None = None,
                            second_dimension_labels: list[str] | None = None) -> str:
    """`circuitsvis.activations.text_neuron_activations` for several texts: `activations[i]`
    is [tokens of text i, first dimension, second dimension]."""
    return mount("TextNeuronActivations", {
        "tokens": tokens, "activations": [_plain(a) for a in activations],
        "firstDimensionName": first_dimension_name, "secondDimensionName": second_dimension_name,
        "firstDimensionLabels": first_dimension_labels,
        "secondDimensionLabels": second_dimension_labels})


def topk_samples(tokens: list, activations: list, zeroth_dimension_name: str = "Layer",
                 first_dimension_name: str = "Neuron", zeroth_dimension_labels: list[str] | None = None,
                 first_dimension_labels: list[str] | None = None) -> str:
    """`circuitsvis.topk_samples.topk_samples`: `tokens` and `activations` nested as
    [zeroth dimension][first dimension][sample][token], samples in descending order."""
    return mount("TopkSamples", {
        "tokens": tokens, "activations": activations,
        "zerothDimensionName": zeroth_dimension_name, "firstDimensionName": first_dimension_name,
        "zerothDimensionLabels": zeroth_dimension_labels,
        "firstDimensionLabels": first_dimension_labels})
