"""`View`: one view of a circuit as an HTML fragment, shown inline by Jupyter and embeddable in a
report page.

A view that uses circuitsvis components needs the circuitsvis bundle (1.3 MB) on the page.
`html()` and `save()` carry it inline (self-contained); a report includes it once and embeds every
view with `html(standalone=False)`. In a notebook (`_repr_html_`) the bundle is sent once per
kernel: the first view that needs it defines `window.CircuitsVis`, later views reuse it, so four
circuits' views add kilobytes to the notebook, not megabytes. If that first output is cleared (or
the notebook reopened without it), display `sparse_lens.viz.NOTEBOOK_BUNDLE` in a cell: views
waiting for the bundle render as soon as it arrives. Where each output is its own frame (Colab),
every view carries the bundle. Nothing is loaded from a network.
"""

from __future__ import annotations

import html
import sys
from dataclasses import dataclass
from pathlib import Path

from sparse_lens.viz.circuitsvis_inline import bundle_script

PAGE_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px; color: #222; }
.sl-view { margin: 18px 0 30px 0; }
.sl-view h3 { margin: 6px 0; }
.sl-note { color: #555; font-size: 13px; max-width: 60em; }
.sl-warn { color: #a33; font-weight: 600; }
table.sl-table { border-collapse: collapse; font-size: 12px; margin: 8px 0; }
table.sl-table th, table.sl-table td { border: 1px solid #ddd; padding: 2px 6px; text-align: right; }
table.sl-table th { background: #f3f3f3; }
table.sl-table td.sl-text { text-align: left; font-family: ui-monospace, monospace; white-space: pre; }
pre.sl-pre { background: #f7f7f7; padding: 6px 8px; font-size: 12px; white-space: pre-wrap; }
.sl-scroll { overflow: auto; max-height: 820px; border: 1px solid #eee; }
"""


@dataclass(frozen=True)
class View:
    """One view: `title`, `body` (an HTML fragment; every text from the model, tokenizer or
    corpus in it is already escaped) and whether it needs the circuitsvis bundle."""

    title: str
    body: str
    uses_circuitsvis: bool = False

    def html(self, standalone: bool = True) -> str:
        """The view as an HTML fragment. `standalone`: include the circuitsvis bundle (when the
        view needs it) so the fragment renders by itself; a page that already loads the bundle
        passes False."""
        bundle = bundle_script() + "\n" if standalone and self.uses_circuitsvis else ""
        return (f'{bundle}<div class="sl-view"><h3>{html.escape(self.title)}</h3>\n'
                f"{self.body}\n</div>")

    def _repr_html_(self) -> str:
        """The view in a notebook: the bundle only if this kernel has not sent it yet."""
        bundle = NOTEBOOK_BUNDLE.script_once() if self.uses_circuitsvis else ""
        return f"<style>{PAGE_STYLE}</style>\n{bundle}" + self.html(standalone=False)

    def save(self, path: str | Path) -> Path:
        """Write the view as a self-contained HTML page."""
        path = Path(path)
        path.write_text(page(self.title, self.html(standalone=True)), encoding="utf-8")
        return path


class NotebookBundle:
    """Whether this notebook kernel has sent the circuitsvis bundle to its page (module
    docstring). Displaying it sends the bundle (again)."""

    def __init__(self) -> None:
        self.sent = False

    def script_once(self) -> str:
        """The bundle's `<script>` the first time (every time where outputs are separate frames),
        else ""."""
        if self.sent and "google.colab" not in sys.modules:
            return ""
        self.sent = True
        return bundle_script() + "\n"

    def _repr_html_(self) -> str:
        self.sent = True
        return bundle_script()


#: this kernel's record of the bundle (one per Python process, that is per notebook kernel)
NOTEBOOK_BUNDLE = NotebookBundle()


def page(title: str, body: str, head: str = "") -> str:
    """A complete HTML document around `body` (already HTML); `head`: more of `<head>`."""
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{PAGE_STYLE}</style>\n{head}\n</head>\n"
            f"<body>\n{body}\n</body>\n</html>\n")


def status_note(circuit) -> str:
    """A warning paragraph when the circuit is not solved; empty when it is."""
    if circuit.solved:
        return ""
    if circuit.full_model_misses_target:
        return ('<p class="sl-note sl-warn">Not solved: the full model itself misses the target '
                f"task loss ({circuit.losses.get('full_model', float('nan')):.4f} &gt; "
                f"{circuit.config.target_loss}), so no circuit was searched for; the views show the "
                "whole model's nodes, capped, not a circuit.</p>")
    if circuit.n_nodes == circuit.registry.n_nodes:
        return ('<p class="sl-note sl-warn">Not solved: the circuit keeps every node of the model '
                "(pruning found none smaller that meets the target), so this shows the whole "
                "model's nodes, capped, not a circuit.</p>")
    return '<p class="sl-note sl-warn">Not solved: the circuit misses the target task loss.</p>'
