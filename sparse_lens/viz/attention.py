"""`attention_view`: the circuit's attention heads on task prompts, with the circuit running.

Only heads in which the circuit keeps a q, k or v channel are shown (their patterns are computed
from the masked q and k, i.e. what the circuit itself attends with). One circuitsvis
`AttentionHeads` widget per prompt, under the prompt, its two candidate answers and the circuit's
logit difference for the correct one.
"""

from __future__ import annotations

import html

import torch

from sparse_lens.viz.activations import head_patterns, kept_heads, token_strings
from sparse_lens.viz.circuitsvis_inline import attention_heads
from sparse_lens.viz.view import View, status_note


def attention_view(circuit, n_prompts: int = 4, split: str = "test", max_heads: int = 24) -> View:
    """The kept heads' attention patterns on `n_prompts` task prompts of `split`. At most
    `max_heads` heads (those with the most kept q/k/v channels); the view says which were left
    out."""
    if n_prompts < 1 or max_heads < 1:
        raise ValueError(f"n_prompts and max_heads must be >= 1; got {n_prompts}, {max_heads}")
    title = f"Attention heads of the circuit ({circuit.task})"
    heads = kept_heads(circuit)
    if not heads:
        return View(title, '<p class="sl-note">The circuit keeps no q, k or v channel: no '
                           "attention head takes part in it.</p>")
    shown = sorted(sorted(heads, key=lambda h: -sum(heads[h].values()))[:max_heads])
    names = [f"L{layer}H{head} (q{heads[layer, head]['q']} k{heads[layer, head]['k']} "
             f"v{heads[layer, head]['v']})" for layer, head in shown]
    data = circuit.task_data(split=split, n=n_prompts)[:n_prompts]  # hand-made data: all of it
    patterns, logits = head_patterns(circuit, data.tokens, shown)
    sink_share = 1 - patterns.sum(-1)  # [batch, head, query_pos]

    parts = [_explanation(circuit, heads, shown)]
    sink_rows = []
    for i in range(len(data)):
        n = int(data.last_pos[i]) + 1
        tokens = token_strings(circuit.model, data.tokens[i, :n])
        final = logits[i, n - 1]
        diff = float(final[data.correct[i]] - final[data.contrast[i]])
        parts.append(
            f'<h4>Prompt {i + 1}</h4><pre class="sl-pre">{html.escape(data.prompts[i])}</pre>'
            f'<p class="sl-note">answer {html.escape(repr(data.correct_str[i]))} vs '
            f"{html.escape(repr(data.contrast_str[i]))}: circuit logit difference "
            f"{diff:+.3f} ({'right' if diff > 0 else 'wrong'})</p>")
        parts.append(attention_heads(patterns[i, :, :n, :n].double().round(decimals=4),
                                     tokens, attention_head_names=names, max_value=1.0,
                                     min_value=0.0, mask_upper_tri=True))
        sink_rows.append(sink_share[i, :, :n].mean(-1))
    if circuit.model.cfg.use_attention_sinks:
        parts.append(_sink_table(names, sink_rows))
    return View(title, "\n".join(parts), uses_circuitsvis=True)


def _explanation(circuit, heads, shown) -> str:
    capped = ""
    if len(shown) < len(heads):
        left = [f"L{layer}H{head}" for layer, head in heads if (layer, head) not in shown]
        capped = (f' <span class="sl-warn">Showing {len(shown)} of {len(heads)} heads (capped); '
                  f"left out: {html.escape(', '.join(left))}.</span>")
    return (f'<p class="sl-note">Attention patterns (query rows, key columns) of the '
            f"{len(heads)} heads in which the circuit keeps a q, k or v channel (counts in "
            "brackets), with every node outside the circuit mean-ablated." + capped + "</p>"
            + status_note(circuit))


def _sink_table(names: list[str], sink_rows) -> str:
    share = torch.stack(sink_rows).mean(0)  # [head]
    cells = "".join(f'<tr><td class="sl-text">{html.escape(n)}</td><td>{s:.3f}</td></tr>'
                    for n, s in zip(names, share.tolist()))
    return ('<p class="sl-note">This model has attention sinks: each pattern row sums to less '
            "than 1, the rest going to the sink (a key with zero value). Mean share of attention "
            "on the sink over the prompts' positions:</p>"
            f'<table class="sl-table"><tr><th>head</th><th>sink share</th></tr>{cells}</table>')
