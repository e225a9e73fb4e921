"""Views of a circuit, each displayed inline by Jupyter, and a self-contained HTML report.

    from sparse_lens.viz import circuit_graph, attention_view, neuron_view, tables_view, write_report
    circuit_graph(circuit)           # the circuit as an SVG graph, by layer
    attention_view(circuit)          # its attention heads on task prompts (circuitsvis)
    neuron_view(circuit)             # what its neurons and channels respond to (circuitsvis)
    tables_view(circuit)             # summary, verification, nodes, edges
    roles_view(circuit)              # quote task: which nodes detect / classify, which head carries
    write_report(model, circuits, "report.html")

Everything works offline: the circuitsvis JavaScript shipped in its wheel is inlined (once per
report page), never loaded from its CDN; every text from the corpus or tokenizer is escaped.
"""

from sparse_lens.viz.attention import attention_view
from sparse_lens.viz.graph import circuit_graph
from sparse_lens.viz.neurons import neuron_view
from sparse_lens.viz.report import report_html, write_report
from sparse_lens.viz.roles import marker_roles, roles_view
from sparse_lens.viz.tables import tables_view
from sparse_lens.viz.view import NOTEBOOK_BUNDLE, View

__all__ = ["View", "NOTEBOOK_BUNDLE", "circuit_graph", "attention_view", "neuron_view", "tables_view", "write_report",
           "report_html", "marker_roles", "roles_view"]
