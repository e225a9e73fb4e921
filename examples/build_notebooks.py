"""Write the example notebooks of `examples/` from the cell sources below (outputs empty).

    .venv/bin/python examples/build_notebooks.py

Every notebook starts with a parameters cell: `TINY = True` runs in seconds (the tests execute
each notebook that way, see tests/test_notebooks.py); set `TINY = False` for real sizes (the
`small` preset, the README's run directory).
"""

from __future__ import annotations

from pathlib import Path

import nbformat

PARAMETERS = '''# Parameters. TINY=True runs in seconds on a CPU; TINY=False uses the README's small run.
TINY = True
RUN_DIR = "runs/notebook-tiny" if TINY else "runs/small"'''

ENSURE_MODEL = '''from pathlib import Path
import sparse_lens
from sparse_lens import SparseHookedTransformer, SparseHookedTransformerConfig, TrainConfig

if not (Path(RUN_DIR) / "config.json").exists():   # train the model the first time
    cfg = SparseHookedTransformerConfig.preset("tiny" if TINY else "small")
    tc = TrainConfig(steps=40, max_files=60) if TINY else TrainConfig()
    sparse_lens.train(cfg, tc, RUN_DIR, progress=False)
model = SparseHookedTransformer.from_pretrained(RUN_DIR)
# a tiny model solves nothing at the paper's 0.15 target: relax it to see the machinery run
TARGET = 5.0 if TINY else 0.15'''

NOTEBOOKS: dict[str, list[tuple[str, str]]] = {
    "01_train_sparse_model.ipynb": [
        ("md", "# Train a weight-sparse transformer\n\nTrain on the interpreter's standard "
               "library, then open the model like any TransformerLens model."),
        ("code", PARAMETERS),
        ("code", '''import sparse_lens
from sparse_lens import SparseHookedTransformer, SparseHookedTransformerConfig, TrainConfig

cfg = SparseHookedTransformerConfig.preset("tiny" if TINY else "small")
tc = TrainConfig(steps=40, max_files=60) if TINY else TrainConfig()
result = sparse_lens.train(cfg, tc, RUN_DIR, resume=True, progress=not TINY)  # reuses a finished run
print(f"validation loss {result.val_loss:.3f} nats/token (unigram {result.unigram_val_loss:.3f})")'''),
        ("md", "Every matrix keeps its top fraction of weights, and no neuron or channel falls "
               "below the floor: the table gives the *achieved* density."),
        ("code", '''model = SparseHookedTransformer.from_pretrained(RUN_DIR)
table = model.weight_sparsity()
assert (table.min_nonzeros_per_unit >= cfg.min_nonzero_per_unit).all()
table'''),
        ("md", "All TransformerLens hooks work; AbsTopK runs before the hook of its location."),
        ("code", '''logits, cache = model.run_with_cache("for i in range(10):\\n    print(")
neurons = cache["blocks.0.mlp.hook_post"][0, -1]
print(f"{int((neurons != 0).sum())} of {neurons.numel()} neurons active at the last token")
model.to_str_tokens("for i in range(10):\\n    print(")'''),
    ],
    "02_find_and_verify_circuit.ipynb": [
        ("md", "# Find and verify a circuit\n\nPrune the model to the smallest set of nodes "
               "that solves a task, with everything else mean-ablated, then check it."),
        ("code", PARAMETERS),
        ("code", ENSURE_MODEL),
        ("code", '''print(sparse_lens.list_tasks())
data = sparse_lens.get_task("single_double_quote", model.tokenizer, n=4)
for prompt, right, wrong in zip(data.prompts, data.correct_str, data.contrast_str):
    print(repr(prompt[-60:]), "->", repr(right), "not", repr(wrong))'''),
        ("code", '''circuit = sparse_lens.prune(model, "single_double_quote", model_dir=RUN_DIR,
                           target_loss=TARGET, steps=5 if TINY else 100, progress=False)
print(circuit)'''),
        ("md", "The paper's test: the circuit alone keeps the loss, ablating it destroys the "
               "task, random node sets of the same size do not solve it."),
        ("code", '''if circuit.full_model_misses_target:
    print("the full model does not solve this task: nothing to verify")
else:
    display(circuit.verify(n=32 if TINY else 256))
    circuit.save(Path(RUN_DIR) / "circuits" / "single_double_quote")
    again = sparse_lens.Circuit.load(Path(RUN_DIR) / "circuits" / "single_double_quote", model)
    assert again.node_ids == circuit.node_ids'''),
    ],
    "03_read_a_circuit.ipynb": [
        ("md", "# Read a circuit\n\nThe views of `sparse_lens.viz` display inline, offline."),
        ("code", PARAMETERS),
        ("code", ENSURE_MODEL),
        ("code", '''from sparse_lens import viz
circuit = sparse_lens.prune(model, "lambda_func", model_dir=RUN_DIR, target_loss=TARGET,
                           steps=5 if TINY else 100, progress=False)
viz.circuit_graph(circuit)'''),
        ("code", "viz.attention_view(circuit, n_prompts=2)"),
        ("code", '''from sparse_lens.data import load_corpus
corpus = load_corpus(None, model.tokenizer, max_files=40 if TINY else 200)
viz.neuron_view(circuit, corpus_tokens=corpus.val, n_prompts=2)'''),
        ("code", "viz.tables_view(circuit, verify_n=32 if TINY else 128)"),
    ],
    "04_sparse_vs_dense.ipynb": [
        ("md", "# A sparse and a dense circuit\n\nTrain the dense baseline (same architecture, "
               "weight sparsity off) and prune the same task in both."),
        ("code", PARAMETERS),
        ("code", ENSURE_MODEL),
        ("code", '''DENSE_DIR = RUN_DIR + "-dense"
if not (Path(DENSE_DIR) / "config.json").exists():
    tc = TrainConfig(steps=40, max_files=60) if TINY else TrainConfig()
    sparse_lens.train(model.cfg.dense_counterpart(), tc, DENSE_DIR, progress=False)
dense = SparseHookedTransformer.from_pretrained(DENSE_DIR)'''),
        ("code", '''import pandas as pd
rows = []
for name, m, directory in (("sparse", model, RUN_DIR), ("dense", dense, DENSE_DIR)):
    c = sparse_lens.prune(m, "for_while", model_dir=directory, target_loss=TARGET,
                          steps=5 if TINY else 100, progress=False)
    rows.append(dict(model=name, **c.summary()))
pd.DataFrame(rows)'''),
    ],
}


def build(out_dir: Path = Path(__file__).parent) -> list[Path]:
    paths = []
    for name, cells in NOTEBOOKS.items():
        nb = nbformat.v4.new_notebook()
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nb.cells = [nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src)
                    for kind, src in cells]
        nb.cells[1].metadata["tags"] = ["parameters"]
        path = out_dir / name
        nbformat.write(nb, path)
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in build():
        print(p)
