"""The views of a circuit and the offline report, on a tiny untrained model.

The test circuit keeps head 1 of layer 0 (q, k, v channels), one q channel of head 3 of layer 1,
residual read/write channels and one neuron; its hand-made task prompts contain `<` and `&`, and
the embedding weights of those two tokens into a kept channel are set (one positive, one
negative), so escaped token text and both edge signs must show up.
"""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import save_tiny_model_with_means
from sparse_lens import cli
from sparse_lens.circuit import Circuit
from sparse_lens.config import SparseHookedTransformerConfig
from sparse_lens.hooks import NodeRegistry, compute_node_means, masked_nodes
from sparse_lens.model import SparseHookedTransformer
from sparse_lens.pruning import PruneConfig
from sparse_lens.tasks import TaskData
from sparse_lens.viz import (View, attention_view, circuit_graph, neuron_view, tables_view,
                             write_report)
from sparse_lens.viz.report import report_html
from sparse_lens.viz import circuitsvis_inline as cvi
from sparse_lens.viz.activations import head_patterns, node_activations
from sparse_lens.viz.graph import NEGATIVE, POSITIVE

CHROMIUM = Path("/usr/bin/chromium")
READ_CHANNEL = 3
PROMPTS = ["x = '<b> & y", 'z = "a < b &', "w = 'if a<b", 'v = "c & d <']


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    model = SparseHookedTransformer(SparseHookedTransformerConfig.preset("tiny"), tokenizer=tokenizer)
    with torch.no_grad():
        model.embed.W_E[tokenizer.convert_tokens_to_ids("<"), READ_CHANNEL] = 0.5
        model.embed.W_E[tokenizer.convert_tokens_to_ids("&"), READ_CHANNEL] = -0.5
    return model


@pytest.fixture(scope="module")
def means(model):
    stream = torch.randint(1, 2048, (8192,), generator=torch.Generator().manual_seed(0))
    return compute_node_means(model, NodeRegistry.for_model(model), stream, n_tokens=1024)


@pytest.fixture(scope="module")
def task_data(tokenizer):
    return TaskData.from_prompts(
        "lt_amp", PROMPTS, ["'", '"', "'", '"'], ['"', "'", '"', "'"], tokenizer,
        description="close the quote after <tags> & ampersands", labels=[0, 1, 0, 1])


@pytest.fixture(scope="module")
def registry(model):
    return NodeRegistry.for_model(model)


@pytest.fixture(scope="module")
def circuit(model, means, task_data, registry):
    r = registry
    ids = [r.ids_of("attn_read", 0, READ_CHANNEL), r.ids_of("q", 0, (1, 2)), r.ids_of("k", 0, (1, 2)),
           r.ids_of("v", 0, (1, 5)), r.ids_of("attn_write", 0, 7), r.ids_of("q", 1, (3, 0)),
           r.ids_of("mlp_read", 1, 7), r.ids_of("neuron", 1, 11), r.ids_of("mlp_write", 1, 9)]
    return Circuit(model, "lt_amp", ids, torch.linspace(-1, 1, r.n_nodes), means,
                   PruneConfig(target_loss=0.8), {"full_model": 0.7, "circuit": 0.7}, solved=True,
                   data=task_data)


@pytest.fixture(scope="module")
def mlp_only(model, means, task_data, registry):
    ids = [registry.ids_of("mlp_read", 1, 7), registry.ids_of("neuron", 1, 11)]
    return Circuit(model, "lt_amp", ids, None, means, PruneConfig(), {"circuit": 0.7}, data=task_data)


@pytest.fixture(scope="module")
def stream(tokenizer):
    text = "if a < b & c:\n    return '<tag>' & x\nvalue = [i for i in range(3)]\n" * 30
    return torch.tensor(tokenizer.encode(text))


def mounts(html: str) -> list[tuple[str, dict]]:
    """(component, props) of every circuitsvis mount in `html`."""
    found = re.findall(r'draw\("(\w+)", (\{.*?\})\);\n\}\)\(\);</script>', html)
    return [(name, json.loads(props)) for name, props in found]


# ------------------------------------------------------------------------ circuitsvis, offline
def test_the_circuitsvis_bundle_is_shipped_and_inlined_script_safe():
    script = cvi.bundle_script()
    assert len(script) > 1_000_000 and "var CircuitsVis=" in script
    assert script.lower().count("</script") == 1 and script.endswith("</script>")  # only its own end
    assert "sourceMappingURL" not in script and "unpkg.com" not in script


@pytest.mark.parametrize("ours, theirs, args", [
    (cvi.attention_heads, "circuitsvis.attention.attention_heads",
     dict(attention=[[[1.0, 0.0], [0.25, 0.75]]], tokens=["<a>", "&"], attention_head_names=["L0H1"],
          max_value=1.0, min_value=0.0, mask_upper_tri=True)),
    (cvi.text_neuron_activations, "circuitsvis.activations.text_neuron_activations",
     dict(tokens=[["x", "<"], ["&"]], activations=[torch.tensor([[[0.5, -1.0]], [[2.0, 0.0]]]),
                                                   torch.tensor([[[1.0, 3.0]]])],
          first_dimension_name="Circuit", second_dimension_name="Node",
          first_dimension_labels=["t"], second_dimension_labels=["L0.neuron[1]", "L1.q[h0.1]"])),
    (cvi.topk_samples, "circuitsvis.topk_samples.topk_samples",
     dict(tokens=[[[["a", "<"]], [["&"]]]], activations=[[[[0.5, 1.0]], [[2.0]]]],
          zeroth_dimension_name="Circuit", first_dimension_name="Node",
          zeroth_dimension_labels=["t"], first_dimension_labels=["n1", "n2"])),
])
def test_offline_components_pass_the_props_circuitsvis_passes(ours, theirs, args):
    import importlib

    module, name = theirs.rsplit(".", 1)
    rendered = str(getattr(importlib.import_module(module), name)(**args))  # CDN html
    component, props = re.search(r'render\(\s*"[^"]+",\s*(\w+),\s*(\{.*\})\s*\)\s*</script>',
                                 rendered, re.DOTALL).groups()
    ((our_component, our_props),) = mounts(ours(**args))
    assert our_component == component and our_props == json.loads(props)


def test_mount_data_cannot_break_out_of_its_script():
    html = cvi.attention_heads([[[1.0]]], ["</script><img src=x onerror=alert(1)>&amp;"])
    assert html.count("</script>") == 1 and "<img" not in html and "&amp;" not in html
    assert mounts(html)[0][1]["tokens"] == ["</script><img src=x onerror=alert(1)>&amp;"]
    with pytest.raises(ValueError, match="component"):
        cvi.mount("Attention); alert(1", {})


# ------------------------------------------------------------------------ what the views read
def test_views_read_the_running_circuit(circuit, model, registry, means, task_data):
    """Patterns and activations are those of the masked model (not of the full model)."""
    tokens = task_data.tokens
    hooks = ["blocks.0.attn.hook_pattern", "blocks.1.attn.hook_pattern", "blocks.1.mlp.hook_post"]
    with masked_nodes(model, registry, circuit.mask, means):
        _, cache = model.run_with_cache(tokens, names_filter=hooks)
    _, full = model.run_with_cache(tokens, names_filter=hooks)
    patterns, logits = head_patterns(circuit, tokens, [(0, 1), (1, 3)])
    torch.testing.assert_close(patterns[:, 0], cache["blocks.0.attn.hook_pattern"][:, 1])
    torch.testing.assert_close(patterns[:, 1], cache["blocks.1.attn.hook_pattern"][:, 3])
    assert not torch.allclose(patterns[:, 1], full["blocks.1.attn.hook_pattern"][:, 3])
    torch.testing.assert_close(logits, circuit.run(tokens))
    acts, _ = node_activations(circuit, tokens, [registry.ids_of("neuron", 1, 11)])
    torch.testing.assert_close(acts[..., 0], cache["blocks.1.mlp.hook_post"][..., 11])
    assert not any(model.hook_dict[s.hook_name].fwd_hooks for s in registry.sites)


# ------------------------------------------------------------------------ the views
def test_graph_draws_the_circuit_by_layer_with_signed_edges_and_escaped_titles(circuit):
    view = circuit_graph(circuit, max_tokens=40)
    assert isinstance(view, View) and not view.uses_circuitsvis and "<svg" in view.body
    for label in circuit.nodes.label:
        assert f"<title>{label}\n" in view.body
    assert "tau " in view.body and "ablation mean" in view.body
    headers = re.findall(r'font-size="10" fill="#555">([^<]+)</text>', view.body)
    assert headers == ["token embedding", "attn read", "q / k / v", "attn write", "q / k / v",
                       "mlp read", "neurons", "mlp write", "unembedding"]
    assert "embed[&#x27;&lt;&#x27;]" in view.body and "embed['<']" not in view.body
    assert f'stroke="{POSITIVE}"' in view.body and f'stroke="{NEGATIVE}"' in view.body
    assert 'stroke-dasharray="4 3"' in view.body  # the residual link attn_write[7] -> mlp_read[7]
    assert "capped" not in view.body.lower()


@pytest.mark.slow
def test_a_capped_graph_says_so(model, means, registry):
    everything = Circuit(model, "single_double_quote", range(registry.n_nodes), None, means,
                         PruneConfig(), {"full_model": 0.7})
    view = circuit_graph(everything, max_nodes=30, max_edges=50, max_tokens=5)
    kinds = re.findall(r'<g class="sl-node" data-kind="(\w+)"', view.body)
    assert sum(k not in ("embed", "logit") for k in kinds) == 30
    assert len(re.findall(r"<path ", view.body)) <= 50
    assert "capped: showing 30 of 1,408 nodes" in view.body  # in the figure itself
    assert "Capped: showing" in view.body and "the full model itself misses the target" in view.body
    solvable = Circuit(model, "single_double_quote", range(registry.n_nodes), None, means,
                       PruneConfig(), {"full_model": 0.1})  # pruning kept everything
    assert "keeps every node of the model" in circuit_graph(solvable, max_nodes=30, max_edges=50).body


def test_attention_view_shows_the_kept_heads_only(circuit, task_data):
    view = attention_view(circuit, n_prompts=3)
    shown = mounts(view.body)
    assert view.uses_circuitsvis and [c for c, _ in shown] == ["AttentionHeads"] * 3
    for i, (_, props) in enumerate(shown):
        n = int(task_data.last_pos[i]) + 1
        assert props["attentionHeadNames"] == ["L0H1 (q1 k1 v1)", "L1H3 (q1 k0 v0)"]
        assert torch.tensor(props["attention"]).shape == (2, n, n) and len(props["tokens"]) == n
        assert torch.tensor(props["attention"]).sum(-1).max() <= 1 + 1e-3
    assert "<" in shown[0][1]["tokens"] and '"<"' not in view.body and "\\u003c" in view.body
    assert "x = &#x27;&lt;b&gt; &amp; y" in view.body and "<b>" not in view.body
    assert "sink share" in view.body  # the tiny preset has attention sinks


def test_attention_view_of_a_circuit_without_heads(mlp_only):
    view = attention_view(mlp_only)
    assert "keeps no q, k or v channel" in view.body and not mounts(view.body)


def test_neuron_view_shows_roles_prompts_and_corpus_snippets(circuit, stream):
    view = neuron_view(circuit, corpus_tokens=stream, n_prompts=2, n_rank_prompts=4, n_windows=8,
                       window_len=16, n_snippets=3)
    (_, prompts), (_, snippets) = mounts(view.body)
    labels = list(circuit.nodes.label)
    assert prompts["secondDimensionLabels"] == labels and snippets["firstDimensionLabels"] == labels
    assert len(prompts["tokens"]) == 2 and len(snippets["tokens"][0]) == len(labels)
    assert all(len(node) == 3 for node in snippets["tokens"][0])
    for node_tokens, node_acts in zip(snippets["tokens"][0], snippets["activations"][0]):
        peaks = [max(abs(a) for a in sample) for sample in node_acts]
        assert peaks == sorted(peaks, reverse=True)  # highest snippet first
        assert [len(s) for s in node_tokens] == [len(a) for a in node_acts]
    for label in labels:
        assert f'<td class="sl-text">{label}</td>' in view.body  # the role table
    assert "answer &quot;&#x27;&quot;" in view.body  # class columns, escaped
    assert '"<"' not in view.body and '" <"' not in view.body and "\\u003c" in view.body


def test_neuron_view_caps_the_nodes_and_without_a_corpus_loads_none(circuit, monkeypatch):
    import sparse_lens.data

    def no_loading(*args, **kwargs):
        raise AssertionError("the view must not load a corpus itself")

    monkeypatch.setattr(sparse_lens.data, "load_corpus", no_loading)
    view = neuron_view(circuit, max_nodes=3, n_prompts=1, n_rank_prompts=4, n_windows=4)
    assert "Showing 3 of the circuit's 9 nodes (capped)" in view.body
    assert "No corpus snippets: no corpus was given" in view.body
    (_, prompts), = mounts(view.body)  # the prompts' activations only
    assert len(prompts["secondDimensionLabels"]) == 3


def test_the_capped_neuron_view_picks_the_nodes_that_tell_the_answers_apart(task_data, tokenizer):
    from sparse_lens.viz.neurons import node_scores

    labels = task_data.labels.float()  # 0, 1, 0, 1
    finals = torch.stack([
        torch.tensor([10.0, 10.0, 10.1, 10.1]),  # far from its ablation value (0), varies, not by class
        labels * 2 - 1,       # -1 / +1: carries the answer
        torch.full((4,), 3.0),  # constant
    ], dim=1)
    score, by = node_scores(finals, torch.zeros(3), task_data)
    assert score.argsort(descending=True).tolist() == [1, 0, 2] and "separates" in by
    # without classes: the distance from the ablation value decides
    no_classes = TaskData.from_prompts("one", PROMPTS[:2], ["'", "'"], ['"', '"'], tokenizer)
    score, by = node_scores(finals[:2], torch.zeros(3), no_classes)
    assert score.argmax().item() == 0 and "ablation value" in by


def test_tables_view_verifies_and_escapes(model, means, task_data, registry):
    fresh = Circuit(model, "lt_amp", [registry.ids_of("attn_read", 0, READ_CHANNEL)], None, means,
                    PruneConfig(), {"circuit": 0.7}, data=task_data)
    assert fresh.verification is None
    view = tables_view(fresh, verify_n=4, n_random=2)
    assert fresh.verification is not None
    for condition in fresh.verification.condition:
        assert f">{condition}</td>" in view.body
    assert "L0.attn_read[3]" in view.body and "embed[&#x27;&lt;&#x27;]" in view.body
    assert "embed['<']" not in view.body and "Showing" not in view.body
    capped = tables_view(fresh, max_edges=2)
    assert f"Showing 2 of {len(fresh.edges):,} edges (capped" in capped.body


def test_views_of_an_empty_circuit(model, means, task_data):
    empty = Circuit(model, "lt_amp", [], None, means, PruneConfig(), {}, data=task_data)
    assert "keeps no node" in circuit_graph(empty).body
    assert "keeps no node" in neuron_view(empty).body
    assert "keeps no q, k or v" in attention_view(empty).body


def test_a_view_shown_alone_carries_the_bundle_and_saves_as_a_page(circuit, tmp_path, monkeypatch):
    from sparse_lens.viz import view as view_module

    monkeypatch.setattr(view_module, "NOTEBOOK_BUNDLE", view_module.NotebookBundle())  # a new kernel
    graph = circuit_graph(circuit)
    assert "CircuitsVis" not in graph._repr_html_()
    attention = attention_view(circuit, n_prompts=1)
    html = attention._repr_html_()
    assert html.count("data-sparse-lens-bundle") == 1 and html.index("var CircuitsVis=") < html.index(
        "CircuitsVis.render(")
    assert "data-sparse-lens-bundle" not in attention.html(standalone=False)
    page = attention.save(tmp_path / "attention.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "data-sparse-lens-bundle" in page


# ------------------------------------------------------------------------ the report
@pytest.fixture(scope="module")
def report(model, circuit, mlp_only, stream, tmp_path_factory):
    path = tmp_path_factory.mktemp("report") / "report.html"
    assert write_report(model, [circuit, mlp_only], path, title="A <test> & report", n_prompts=2,
                        corpus_tokens=stream, verify_n=4) == path
    return path


def test_report_has_one_section_per_circuit_with_every_view(report):
    html = report.read_text(encoding="utf-8")
    sections = re.split(r'<section class="sl-circuit"', html)[1:]
    assert len(sections) == 2
    for section in sections:
        for title in ("Circuit graph", "Tables of the circuit", "Attention heads of the circuit",
                      "Neurons and channels of the circuit"):
            assert f"<h3>{title} (lt_amp)</h3>" in section
        assert "close the quote after &lt;tags&gt; &amp; ampersands" in section
    assert "<title>A &lt;test&gt; &amp; report</title>" in html and "<tags>" not in html
    assert [c for c, _ in mounts(sections[0])] == ["AttentionHeads"] * 2 + ["TextNeuronActivations",
                                                                             "TopkSamples"]


def test_report_is_offline(report):
    html = report.read_text(encoding="utf-8")
    assert html.count("data-sparse-lens-bundle") == 1  # the bundle, once
    assert not re.search(r"<script[^>]*\ssrc\s*=", html, re.IGNORECASE)
    assert not re.search(r"<link\b", html, re.IGNORECASE)
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.IGNORECASE)
    assert not re.search(r"""(@import|url\()\s*["']?\s*(https?:)?//""", html, re.IGNORECASE)
    assert not re.search(r"""import\s*(\{[^}]*\}\s*from\s*)?["']https?:""", html)
    assert "unpkg.com" not in html and 'type="module"' not in html


def test_a_task_the_full_model_misses_gets_a_section_without_views(model, circuit, means, registry, stream):
    missed = Circuit(model, "single_double_quote", range(registry.n_nodes), None, means,
                     PruneConfig(), {"full_model": 0.7})  # above the 0.15 target: nothing searched
    html = report_html(model, [circuit, missed], n_prompts=1, corpus_tokens=stream, verify_n=4)
    solved_part, missed_part = re.split(r'<section class="sl-circuit"', html)[1:]
    assert "no circuit was searched for" in missed_part and "(task loss 0.7000 &gt; 0.15)" in missed_part
    assert "No circuit, so no graph" in missed_part
    assert "<h3>" not in missed_part and "<svg" not in missed_part and not mounts(missed_part)
    assert "<h3>Circuit graph" in solved_part and mounts(solved_part)
    overview = html[:html.index('<section class="sl-circuit"')]
    assert "no (the full model misses the target)" in overview and "<td>0.7</td>" in overview


NODE_CHECK = r"""
// Runs a report's inline scripts in node without a DOM: the bundle must evaluate and define
// CircuitsVis; every mount script must call CircuitsVis.render with one of its components.
const fs = require('fs'); const vm = require('vm');
const html = fs.readFileSync(process.argv[1], 'utf8');
const scripts = [...html.matchAll(/<script([^>]*)>([\s\S]*?)<\/script>/g)].map(m => m[2]);
const ctx = {console, setTimeout, clearTimeout};
ctx.self = ctx;
vm.createContext(ctx);
vm.runInContext(scripts[0], ctx, {filename: 'circuitsvis-bundle.js'});
const CV = vm.runInContext('CircuitsVis = Object.assign({}, CircuitsVis)', ctx);
const calls = [];
ctx.document = {getElementById: id => ({id, textContent: ''})};
CV.render = (id, component, props) => calls.push(
  [id, Object.keys(CV).find(k => CV[k] === component) || null, typeof props]);
for (const body of scripts.slice(1)) vm.runInContext(body, ctx);
console.log(JSON.stringify(calls));
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_report_scripts_evaluate_in_node(report):
    out = subprocess.run(["node", "-e", NODE_CHECK, str(report)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    calls = json.loads(out.stdout)
    html = report.read_text(encoding="utf-8")
    assert [c[0] for c in calls] == re.findall(r'<div id="(sparse-lens-cv-\w+)"', html)
    assert all(c[1] in ("AttentionHeads", "TextNeuronActivations", "TopkSamples") and c[2] == "object"
               for c in calls)


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium to render the report headless")
def test_report_renders_in_headless_chromium(report, tmp_path):
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=15000"]
    url = report.resolve().as_uri()
    dom = subprocess.run([str(CHROMIUM), *flags, "--dump-dom", url], capture_output=True, text=True,
                         timeout=180).stdout
    # the artifacts: the rendered DOM and a screenshot, in test-artifacts/ (or $SPARSE_LENS_ARTIFACTS)
    artifacts = Path(os.environ.get("SPARSE_LENS_ARTIFACTS", Path(__file__).parents[1] / "test-artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    (artifacts / "report_dom.html").write_text(dom, encoding="utf-8")
    subprocess.run([str(CHROMIUM), *flags, "--window-size=1400,4000",
                    f"--screenshot={artifacts / 'report.png'}", url], capture_output=True, timeout=180)
    assert (artifacts / "report.png").stat().st_size > 10_000  # a real picture, not an empty page
    sections = re.split(r'<section class="sl-circuit"', dom)[1:]
    assert len(sections) == 2
    for section in sections:
        rendered = re.sub(r"<script[\s\S]*?</script>", "", section)  # the DOM, not the sources
        assert "<svg" in rendered and "not loaded on this page" not in rendered
        # every circuitsvis mount was rendered into (React filled the div)
        assert not re.search(r'<div id="sparse-lens-cv-\w+"[^>]*>\s*</div>', rendered)
        assert len(re.findall(r'class="sl-cv"', rendered)) >= 2  # the neuron view's two widgets


# ------------------------------------------------------------------------ the command
@pytest.fixture(scope="module")
def model_dir(tokenizer, tmp_path_factory):
    """A saved tiny model with one saved circuit for a generated task."""
    path = tmp_path_factory.mktemp("model") / "tiny"
    model, means = save_tiny_model_with_means(tokenizer, path)
    reg = NodeRegistry.for_model(model)
    ids = [reg.ids_of("attn_read", 0, 1), reg.ids_of("v", 0, (2, 3)), reg.ids_of("neuron", 1, 4)]
    Circuit(model, "single_double_quote", ids, None, means, PruneConfig(), {"circuit": 0.69}).save(
        path / "circuits" / "single_double_quote")
    return path


@pytest.mark.slow
def test_cli_report_writes_the_report_of_the_saved_circuits(model_dir, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("SPARSE_LENS_CACHE", str(tmp_path / "cache"))
    assert cli.main(["report", "--model", str(model_dir), "--prompts", "1", "--corpus-files", "3",
                     "--verify-prompts", "8"]) == 0
    out = model_dir / "report.html"
    assert str(out) in capsys.readouterr().out
    html = out.read_text(encoding="utf-8")
    assert html.count('<section class="sl-circuit"') == 1 and 'data-task="single_double_quote"' in html
    assert "L0H2 (q0 k0 v1)" in html


def test_cli_report_without_circuits_is_a_clear_error(model_dir, tmp_path, capsys):
    assert cli.main(["report", "--model", str(model_dir), "--circuits", str(tmp_path)]) == 2
    assert "no saved circuits" in capsys.readouterr().err
