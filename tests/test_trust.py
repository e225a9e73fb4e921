"""Issue 13 (trustworthy in a notebook), items 6-9 and 11-14: clear errors where users hit them,
what TransformerLens users type, one circuitsvis bundle per notebook kernel, node means from the
model's own corpus."""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import save_tiny_model_with_means
from sparse_lens import cli, pretrained
from sparse_lens.checkpoint import CheckpointError
from sparse_lens.circuit import CIRCUIT_FILE, TENSORS_FILE, Circuit
from sparse_lens.config import SparseHookedTransformerConfig
from sparse_lens.hooks import MEANS_FILE, NodeRegistry, compute_node_means, node_means_for, save_node_means
from sparse_lens.model import SparseHookedTransformer
from sparse_lens.pruning import PruneConfig, prune
from sparse_lens.tasks import TaskData, get_task

ROOT = Path(__file__).parents[1]
LONG_PROMPT = "x = [" + ", ".join(str(i) for i in range(40))  # 110 tokens; tiny's n_ctx is 64


@pytest.fixture(scope="module")
def tiny(tokenizer):
    torch.manual_seed(0)
    return SparseHookedTransformer(SparseHookedTransformerConfig.preset("tiny"), tokenizer=tokenizer)


@pytest.fixture
def model_dir(tokenizer, tmp_path):
    path = tmp_path / "tiny"
    model, means = save_tiny_model_with_means(tokenizer, path)
    return path, model, means


# ------------------------------------------------------------ item 6: prompts longer than n_ctx
def test_prompts_longer_than_the_context_are_refused_where_they_enter(tiny, tokenizer):
    with pytest.raises(ValueError, match=r"'long_list'.*110 tokens.*n_ctx=64"):
        TaskData.from_prompts("long_list", [LONG_PROMPT], ["]"], [")"], tokenizer, n_ctx=64)
    with pytest.raises(ValueError, match=r"'single_double_quote'.*tokens.*n_ctx=4"):
        get_task("single_double_quote", tokenizer, n=4, n_ctx=4)
    long = TaskData.from_prompts("long_list", [LONG_PROMPT, "x = [1"], ["]", "]"], [")", ")"], tokenizer)
    means = torch.zeros(NodeRegistry.for_model(tiny).n_nodes)
    with pytest.raises(ValueError, match=r"'long_list'.*110 tokens.*n_ctx=64"):
        prune(tiny, long, means=means, steps=1, progress=False)


def test_circuit_run_refuses_inputs_longer_than_the_context_instead_of_cutting_them(tiny):
    circuit = Circuit(tiny, "single_double_quote", [0, 1], None,
                      torch.zeros(NodeRegistry.for_model(tiny).n_nodes), PruneConfig(), {})
    assert circuit.run("x = [1").shape[1] == len(tiny.tokenizer.encode("x = [1"))
    with pytest.raises(ValueError, match=r"'single_double_quote'.*110 tokens.*n_ctx=64"):
        circuit.run(LONG_PROMPT)
    with pytest.raises(ValueError, match=r"70 tokens.*n_ctx=64"):
        circuit.run(torch.zeros(1, 70, dtype=torch.long))


# ------------------------------------------------------------ item 7: every load path names the field
@pytest.mark.parametrize("field", ["node_ids", "model_fingerprint", "losses", "task"])
def test_a_circuit_file_missing_a_field_is_a_clear_error_in_python_and_the_cli(model_dir, field, capsys):
    path, model, means = model_dir
    saved = Circuit(model, "single_double_quote", [0, 3], None, means, PruneConfig(),
                    {"circuit": 0.5}).save(path / "circuits" / "quote")
    doc = json.loads((saved / CIRCUIT_FILE).read_text())
    del doc[field]
    (saved / CIRCUIT_FILE).write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=rf"{CIRCUIT_FILE}.*{field}"):
        Circuit.load(saved, model)
    assert cli.main(["report", "--model", str(path)]) == 2
    err = capsys.readouterr().err
    assert CIRCUIT_FILE in err and field in err and "Traceback" not in err


def test_circuit_tensors_and_config_missing_fields_are_clear_errors(model_dir):
    path, model, means = model_dir
    saved = Circuit(model, "t", [0], None, means, PruneConfig(), {}).save(path / "c")
    save_file({"tau": torch.zeros(3)}, str(saved / TENSORS_FILE))
    with pytest.raises(ValueError, match=rf"{TENSORS_FILE}.*'means'"):
        Circuit.load(saved, model)
    saved = Circuit(model, "t", [0], None, means, PruneConfig(), {}).save(path / "c")
    doc = json.loads((saved / CIRCUIT_FILE).read_text())
    doc["config"]["no_such_field"] = 1
    (saved / CIRCUIT_FILE).write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=rf"{CIRCUIT_FILE}.*config.*no_such_field"):
        Circuit.load(saved, model)


def test_node_means_and_model_configs_missing_fields_are_clear_errors(model_dir):
    path, model, _ = model_dir
    save_file({"other": torch.zeros(3)}, str(path / MEANS_FILE))
    with pytest.raises(ValueError, match=rf"{MEANS_FILE}.*'means'"):
        node_means_for(model, path)
    header = json.loads((path / "config.json").read_text())
    del header["config"]["d_model"]
    (path / "config.json").write_text(json.dumps(header))
    with pytest.raises(CheckpointError, match=r"config\.json.*d_model"):
        SparseHookedTransformer.from_pretrained(path)


def test_a_packed_checkpoint_missing_a_tensor_is_a_clear_error(tmp_path):
    tensors = {"a": torch.zeros(4, 4), "b": torch.ones(3)}
    pretrained.save_packed(tensors, tmp_path / "w.safetensors")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as f:
        metadata = f.metadata()
        kept = {k: f.get_tensor(k) for k in f.keys() if k != "b"}
    save_file(kept, str(tmp_path / "w.safetensors"), metadata=metadata)
    with pytest.raises(CheckpointError, match=r"w\.safetensors.*'b'"):
        pretrained.load_packed(tmp_path / "w.safetensors")


# ------------------------------------------------------------ item 8: tokenizer files, recorded digest
def test_loading_a_model_without_tokenizer_files_warns(tmp_path, tokenizer):
    torch.manual_seed(0)
    SparseHookedTransformer(SparseHookedTransformerConfig.preset("tiny")).save_pretrained(tmp_path / "bare")
    with pytest.warns(UserWarning, match="no tokenizer"):
        model = SparseHookedTransformer.from_pretrained(tmp_path / "bare")
    assert model.tokenizer is None
    SparseHookedTransformer(SparseHookedTransformerConfig.preset("tiny"), tokenizer=tokenizer).save_pretrained(
        tmp_path / "full")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert SparseHookedTransformer.from_pretrained(tmp_path / "full").tokenizer is not None


def test_a_recorded_weights_digest_is_checked_on_every_load(model_dir):
    path, model, _ = model_dir
    tensors = load_file(str(path / "model.safetensors"))
    record = {"command": "test", "weights_sha256": pretrained.weights_digest(tensors)}
    (path / "provenance.json").write_text(json.dumps(record))
    SparseHookedTransformer.from_pretrained(path)  # the recorded weights: loads
    tensors["unembed.b_U"] = tensors["unembed.b_U"] + 1.0
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"provenance\.json"):
        SparseHookedTransformer.from_pretrained(path)


# ------------------------------------------------------------ item 9
@pytest.mark.parametrize("target", [float("inf"), float("nan"), -float("inf")])
def test_non_finite_target_losses_are_refused(target):
    with pytest.raises(ValueError, match="target_loss"):
        PruneConfig(target_loss=target)


# ------------------------------------------------------------ item 11: shipped checkpoints by name
def test_from_pretrained_opens_a_shipped_checkpoint_by_name_and_still_takes_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no directory called "small" here
    model = SparseHookedTransformer.from_pretrained("small")
    reference = pretrained.load("small")
    for (name, a), (_, b) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.equal(a, b), name
    assert model.tokenizer is not None
    model.save_pretrained(tmp_path / "copy")
    assert SparseHookedTransformer.from_pretrained(tmp_path / "copy").cfg == model.cfg
    with pytest.raises(ValueError, match=r"no-such-model.*small"):
        SparseHookedTransformer.from_pretrained("no-such-model")


# ------------------------------------------------------------ item 12: what users type
def test_python_dash_m_sparse_lens_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "sparse_lens", "--help"], capture_output=True,
                         text=True, timeout=120, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert out.returncode == 0, out.stderr
    assert "usage: sparse-lens" in out.stdout and "train" in out.stdout


@pytest.mark.slow
def test_subpackages_are_attributes_of_the_package():
    code = ("import sparse_lens\n"
            "for name in ('viz', 'bridges', 'analyses', 'tasks', 'hooks'):\n"
            "    print(name, getattr(sparse_lens, name).__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["viz", "sparse_lens.viz", "bridges", "sparse_lens.bridges",
                                  "analyses", "sparse_lens.analyses", "tasks", "sparse_lens.tasks",
                                  "hooks", "sparse_lens.hooks"]


# ------------------------------------------------------------ item 13: one bundle per kernel
def test_notebook_views_send_the_circuitsvis_bundle_once_per_kernel(monkeypatch):
    from sparse_lens.viz import view as view_module
    from sparse_lens.viz.report import report_html  # noqa: F401 (the report stays self-contained)

    monkeypatch.setattr(view_module, "NOTEBOOK_BUNDLE", view_module.NotebookBundle())
    views = [view_module.View(f"v{i}", "<div>x</div>", uses_circuitsvis=True) for i in range(4)]
    shown = [v._repr_html_() for v in views]
    assert shown[0].count("data-sparse-lens-bundle") == 1 and len(shown[0]) > 1_000_000
    assert all("data-sparse-lens-bundle" not in s and len(s) < 10_000 for s in shown[1:])
    # a page saved from a view, and a view's standalone HTML, still carry the bundle
    assert "data-sparse-lens-bundle" in views[1].html() and "data-sparse-lens-bundle" in views[2].html(True)
    # showing the bundle again (outputs cleared, page reloaded) re-sends it
    assert "data-sparse-lens-bundle" in view_module.NOTEBOOK_BUNDLE._repr_html_()
    # where each output is its own frame (Colab), every view carries it
    monkeypatch.setitem(sys.modules, "google.colab", type(sys)("google.colab"))
    assert "data-sparse-lens-bundle" in views[3]._repr_html_()


def test_a_mount_waits_for_a_bundle_sent_later():
    from sparse_lens.viz.circuitsvis_inline import bundle_script, mount

    html = mount("AttentionHeads", {"tokens": ["a"]})
    assert "sparse-lens-circuitsvis-ready" in html
    assert bundle_script().rstrip().endswith("</script>")
    assert "sparse-lens-circuitsvis-ready" in bundle_script()


def test_the_report_still_inlines_the_bundle_once(monkeypatch):
    from sparse_lens.viz import view as view_module
    from sparse_lens.viz.view import page

    monkeypatch.setattr(view_module, "NOTEBOOK_BUNDLE", view_module.NotebookBundle())
    view_module.View("a", "<div/>", uses_circuitsvis=True)._repr_html_()  # the kernel has sent it
    saved = page("p", view_module.View("b", "<div/>", uses_circuitsvis=True).html())
    assert saved.count("data-sparse-lens-bundle") == 1


# ------------------------------------------------------------ item 14: means from the model's corpus
def write_corpus(folder: Path, seed: int) -> Path:
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    for i in range(4):
        names = [f"v{int(j)}" for j in torch.randint(0, 50, (60,), generator=gen)]
        (folder / f"m{i}.py").write_text("\n".join(f"{a} = {b} + {i}" for a, b in zip(names, names[1:])))
    return folder


def record_corpus(model_path: Path, sources, how: str) -> None:
    tc = {"sources": [str(s) for s in sources], "val_fraction": 0.25, "max_files": None, "seed": 0}
    if how == "training":
        (model_path / "training").mkdir(exist_ok=True)
        (model_path / "training" / "state.json").write_text(json.dumps({"step": 1, "train_config": tc}))
    else:
        (model_path / "provenance.json").write_text(json.dumps({"command": "x", "train_config": tc}))


@pytest.mark.parametrize("how", ["training", "provenance"])
def test_node_means_come_from_the_corpus_the_model_records(model_dir, tmp_path, monkeypatch, how):
    from sparse_lens.data import load_corpus

    monkeypatch.setenv("SPARSE_LENS_CACHE", str(tmp_path / "cache"))
    path, model, cached = model_dir
    (path / MEANS_FILE).unlink()
    corpus = write_corpus(tmp_path / "corpus", seed=1)
    record_corpus(path, [corpus], how)
    means = node_means_for(model, path, n_tokens=256)
    stream = load_corpus([corpus], model.tokenizer, val_fraction=0.25, cache_dir=False).train
    expected = compute_node_means(model, NodeRegistry.for_model(model), stream, n_tokens=256)
    torch.testing.assert_close(means, expected, rtol=0, atol=0)
    torch.testing.assert_close(node_means_for(model, path, n_tokens=256), expected)  # from the cache


def test_a_run_snapshot_takes_its_means_from_the_corpus_its_run_records(model_dir, tmp_path, monkeypatch):
    """`<run>/snapshots/step-N` records no corpus itself: its run's `training/state.json` does."""
    import shutil

    from sparse_lens.data import load_corpus

    monkeypatch.setenv("SPARSE_LENS_CACHE", str(tmp_path / "cache"))
    path, model, _ = model_dir
    run = tmp_path / "run"
    snapshot = run / "snapshots" / "step-000010"
    shutil.copytree(path, snapshot)
    (snapshot / MEANS_FILE).unlink()
    corpus = write_corpus(tmp_path / "corpus", seed=4)
    record_corpus(run, [corpus], "training")
    stream = load_corpus([corpus], model.tokenizer, val_fraction=0.25, cache_dir=False).train
    expected = compute_node_means(model, NodeRegistry.for_model(model), stream, n_tokens=256)
    torch.testing.assert_close(node_means_for(model, snapshot, n_tokens=256), expected, rtol=0, atol=0)


def test_cached_means_of_another_corpus_are_recomputed(model_dir, tmp_path, monkeypatch):
    from sparse_lens.data import load_corpus

    monkeypatch.setenv("SPARSE_LENS_CACHE", str(tmp_path / "cache"))
    path, model, _ = model_dir
    first, second = write_corpus(tmp_path / "a", seed=1), write_corpus(tmp_path / "b", seed=2)
    record_corpus(path, [first], "training")
    (path / MEANS_FILE).unlink()
    on_first = node_means_for(model, path, n_tokens=256)
    record_corpus(path, [second], "training")  # the directory now records another corpus
    with pytest.warns(UserWarning, match="another corpus"):
        on_second = node_means_for(model, path, n_tokens=256)
    stream = load_corpus([second], model.tokenizer, val_fraction=0.25, cache_dir=False).train
    expected = compute_node_means(model, NodeRegistry.for_model(model), stream, n_tokens=256)
    torch.testing.assert_close(on_second, expected, rtol=0, atol=0)
    assert not torch.equal(on_first, on_second)
    # explicit tokens are checked against the cache the same way
    torch.testing.assert_close(node_means_for(model, path, tokens=stream, n_tokens=256), expected)
    other = torch.randint(1, 2048, (4096,), generator=torch.Generator().manual_seed(5))
    with pytest.warns(UserWarning, match="another corpus"):
        node_means_for(model, path, tokens=other, n_tokens=256)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="no /usr/bin/chromium to render headless")
def test_in_a_browser_later_views_reuse_the_bundle_and_early_ones_wait_for_it(tmp_path, monkeypatch):
    """A page laid out as a notebook's outputs: a view shown before the bundle arrived (its
    first output cleared), then the first view (with the bundle), then a later one (without)."""
    import re

    from sparse_lens.viz import view as view_module
    from sparse_lens.viz.circuitsvis_inline import attention_heads

    monkeypatch.setattr(view_module, "NOTEBOOK_BUNDLE", view_module.NotebookBundle())
    views = [view_module.View(f"v{i}", attention_heads([[[1.0, 0.0], [0.5, 0.5]]], ["a", "b"]),
                              uses_circuitsvis=True) for i in range(3)]
    waiting = views[0].html(standalone=False)
    first, later = views[1]._repr_html_(), views[2]._repr_html_()
    assert "data-sparse-lens-bundle" in first and "data-sparse-lens-bundle" not in later
    path = tmp_path / "notebook.html"
    path.write_text(view_module.page("outputs", "\n".join([waiting, first, later])), encoding="utf-8")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
             "--disable-background-networking", f"--user-data-dir={tmp_path / 'profile'}",
             "--virtual-time-budget=10000", "--dump-dom", path.resolve().as_uri()]
    dom = subprocess.run(["/usr/bin/chromium", *flags], capture_output=True, text=True, timeout=180).stdout
    rendered = re.sub(r"<script[\s\S]*?</script>", "", dom)
    assert "not loaded on this page" not in rendered
    mounted = re.findall(r'<div id="sparse-lens-cv-\w+"[^>]*>([\s\S]*?)</div>\s*(?:<div class="sl-view"|</div>)',
                         rendered)
    assert len(re.findall(r'class="sl-cv"', rendered)) == 3
    assert not re.search(r'<div id="sparse-lens-cv-\w+"[^>]*>\s*</div>', rendered), mounted


def test_a_loaded_model_takes_its_means_from_the_corpus_its_directory_records(model_dir, tmp_path, monkeypatch):
    from sparse_lens.data import load_corpus

    monkeypatch.setenv("SPARSE_LENS_CACHE", str(tmp_path / "cache"))
    path, model, _ = model_dir
    corpus = write_corpus(tmp_path / "corpus", seed=3)
    record_corpus(path, [corpus], "training")
    loaded = SparseHookedTransformer.from_pretrained(path)
    assert loaded.loaded_from == path
    means = node_means_for(loaded, n_tokens=256)  # no directory given: nothing cached anywhere
    stream = load_corpus([corpus], model.tokenizer, val_fraction=0.25, cache_dir=False).train
    torch.testing.assert_close(means, compute_node_means(loaded, NodeRegistry.for_model(loaded), stream,
                                                         n_tokens=256), rtol=0, atol=0)


def test_one_fingerprint_hashes_bf16_weights_and_tells_weights_apart():
    import copy

    from sparse_lens.fingerprint import model_fingerprint, weights_digest

    a = torch.nn.Linear(4, 3)
    digest = model_fingerprint(a)
    assert model_fingerprint(copy.deepcopy(a).to(torch.bfloat16)) != digest  # bf16 hashes too
    b = copy.deepcopy(a)
    assert model_fingerprint(b) == digest
    with torch.no_grad():
        b.weight[0, 0] += 1e-6
    assert model_fingerprint(b) != digest
    assert weights_digest({"x": torch.zeros(2)}) != weights_digest({"x": torch.zeros(2, 1)})
