"""`Circuit`: the nodes pruning kept for a task, the weights joining them, and how well they do.

    circuit = sparse_lens.prune(model, "single_double_quote")
    print(circuit)                 # nodes and edges kept out of the model's totals, task losses
    circuit.nodes, circuit.edges   # pandas DataFrames
    circuit.verify()               # full model vs circuit alone vs circuit ablated vs random sets
    circuit.faithfulness()         # controls, partial restoration, interchange, ablation modes
    logits = circuit.run(tokens)   # the model with every node outside the circuit mean-ablated
    circuit.save("circuits/quote"); Circuit.load("circuits/quote", model)

Edges (`edges`, one row each, `kind` column):
- `weight`: a nonzero weight joining two kept nodes: read channel -> q/k/v channel (W_Q/W_K/W_V),
  v channel -> attention-write channel (W_O), read channel -> neuron (W_in), neuron ->
  MLP-write channel (W_out);
- `embed`: token embedding -> kept read channel (W_E, for the tokens of the task's prompts);
- `unembed`: kept write channel -> a candidate token's logit (W_U);
- `residual`: a kept write channel to a later kept read of the same channel (no weight: the
  residual stream), counted apart;
- `qk`: a kept q channel and the kept k channel with the same head and index (they meet in the
  attention score, a bilinear link, not a weight), counted apart.
`n_edges` counts `weight`, `embed` and `unembed` edges. Edges carry node and token ids
(`sparse_lens.edges`); their `source` and `target` labels are for display.

A `Circuit` is a frozen record of what pruning found; running, checking and edge extraction are
functions (`circuit_eval`, `edges`, `faithfulness`) that its methods call. The results of
`verify()` and `faithfulness()` are kept in its one mutable part, `results` (a dict), and read
back as `.verification` and `.faithfulness_table`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import pandas as pd
import torch
from jaxtyping import Float, Int
from safetensors.torch import load_file, save_file

from sparse_lens.ablation import Ablation
from sparse_lens.circuit_eval import run_masked, task_examples, verify_nodes
from sparse_lens.edges import COUNTED_EDGE_KINDS, EDGE_KINDS, circuit_edges, edge_tokens  # noqa: F401
from sparse_lens.fingerprint import model_fingerprint
from sparse_lens.hooks import NodeRegistry, keep_mask_from_ids
from sparse_lens.hooks.nodes import node_label  # noqa: F401  (re-exported)
from sparse_lens.search import PruneConfig
from sparse_lens.task_loss import Calibration

CIRCUIT_FILE = "circuit.json"
#: 2: the model fingerprint is `fingerprint.model_fingerprint` (1 hashed the weights another way)
FORMAT_VERSION = 2
TENSORS_FILE = "circuit.safetensors"


@dataclass(frozen=True, eq=False)
class Circuit:
    """The result of `prune`: see the module docstring. Holds a reference to its model."""

    model: object
    task: str
    node_ids: list[int]  # sorted
    tau: Float[torch.Tensor, " n_nodes"] | None  # learned mask logits (None when not saved)
    means: Float[torch.Tensor, " n_nodes"]  # node means over the pretraining corpus
    config: PruneConfig | None
    losses: dict[str, float]
    calibration: Calibration | None = None
    solved: bool = False
    bisection: list[tuple[int, float]] = ()  # the search's evaluated (n nodes, loss) points
    seconds: float = 0.0
    data: object = None  # a hand-made TaskData, used instead of generating `task` examples
    # [n_nodes] what pruned nodes take in the circuit's ablation mode (None: the means)
    ablation_values: Float[torch.Tensor, " n_nodes"] | None = None
    # (prompt tokens, candidate tokens) of the embed/unembed edges (None: `edges.edge_tokens`)
    edge_tokens: tuple[list[int], list[int]] | None = None
    # the one mutable part: "verification" and "faithfulness" tables, once computed (not an
    # argument: a new record, `dataclasses.replace` included, starts with none)
    results: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # normalising a frozen record's fields, once
        set_(self, "node_ids", sorted(int(i) for i in self.node_ids))
        set_(self, "losses", dict(self.losses))
        set_(self, "bisection", [tuple(p) for p in self.bisection])

    # ------------------------------------------------------------------ nodes and edges
    @cached_property
    def registry(self) -> NodeRegistry:
        return NodeRegistry.for_model(self.model)

    @property
    def n_nodes(self) -> int:
        return len(self.node_ids)

    @property
    def mask(self) -> Float[torch.Tensor, " n_nodes"]:
        return keep_mask_from_ids(self.registry, self.node_ids)

    @property
    def ablation_mode(self) -> str:
        """The ablation mode that found the circuit (`sparse_lens.ablation`; "mean" by default)."""
        return getattr(self.config, "ablation", "mean")

    @property
    def ablation(self) -> Ablation:
        """The circuit's `Ablation`: its mode, with the values the search used (for `resample`,
        the task means its fallback takes)."""
        return Ablation(self.ablation_mode, self.ablated_values, getattr(self.config, "seed", 0))

    @property
    def ablated_values(self) -> Float[torch.Tensor, " n_nodes"]:
        """What a pruned node takes (outside resampling): `ablation_values`, else the means."""
        return self.means if self.ablation_values is None else self.ablation_values

    @property
    def nodes(self) -> pd.DataFrame:
        """One row per kept node: id, kind, layer, head (-1 if none), channel, hook_name, label,
        tau (the learned mask logit), mean (the value it takes when ablated)."""
        table = self.registry.describe(self.node_ids)
        table["label"] = self.registry.labels(self.node_ids)
        if self.tau is not None:
            table["tau"] = self.tau[self.node_ids].numpy()
        table["mean"] = self.means[self.node_ids].float().numpy()
        return table

    @cached_property
    def edges(self) -> pd.DataFrame:
        """One row per edge (`sparse_lens.edges`): kind, source, target (display labels),
        weight (NaN for residual/qk), source_id, target_id, source_token, target_token.
        Computed once."""
        tokens = self.edge_tokens or edge_tokens(self.model, self.task, self.config, self.data)
        return circuit_edges(self.model, self.registry, self.node_ids, *tokens)

    @property
    def n_edges(self) -> int:
        return int(self.edges.kind.isin(COUNTED_EDGE_KINDS).sum())

    def task_data(self, split: str = "test", n: int = 256, seed: int = 0):
        """Held-out examples of the circuit's task, at the level and from the source it was
        pruned on (`circuit_eval.task_examples`; its hand-made data if it has some)."""
        return task_examples(self.model, self.task, self.config, self.data, split, n, seed)

    # ------------------------------------------------------------------ running
    def run(self, tokens: Int[torch.Tensor, "batch pos"] | str | list[str], **forward_kwargs):
        """The model's output with every node outside the circuit replaced by its mean (and the
        calibration, if pruning fitted one, applied to the logits). Text is tokenized without
        truncation: an input longer than the model's `n_ctx` is a ValueError, never cut. A
        circuit found under another ablation mode uses that mode's values; `resample` needs task
        prompts, so here it uses its fallback, the task means (`verify` and `faithfulness`
        resample)."""
        if isinstance(tokens, (str, list)):
            tokens = self.model.to_tokens(tokens, truncate=False)
        if tokens.shape[-1] > self.model.cfg.n_ctx:
            raise ValueError(f"Circuit.run (task {self.task!r}): the input has {tokens.shape[-1]} "
                             f"tokens, more than the model's context n_ctx={self.model.cfg.n_ctx}")
        return run_masked(self.model, self.registry, tokens, self.mask, self.ablated_values,
                          self.calibration, **forward_kwargs)

    def verify(self, n: int = 256, n_random: int = 5, seed: int = 0) -> pd.DataFrame:
        """Task loss and accuracy on `n` held-out (test split) examples for: the full model; the
        circuit alone (everything else ablated, in the circuit's ablation mode); the model with
        the circuit's nodes ablated; random node sets of the circuit's size (mean and std over
        `n_random` seeds). The circuit row uses the circuit's calibration, if any. Kept as
        `.verification` (`circuit_eval.verify_nodes`)."""
        data = self.task_data(split="test", n=n, seed=seed)
        self.results["verification"] = verify_nodes(self.model, self.registry, data, self.node_ids,
                                                    self.ablation, self.calibration, n_random, seed)
        return self.results["verification"]

    @property
    def verification(self) -> pd.DataFrame | None:
        """The table of the last `verify()` (None before)."""
        return self.results.get("verification")

    def faithfulness(self, config=None, corpus_tokens=None, **overrides) -> pd.DataFrame:
        """The evidence for or against trusting the circuit, one row per check with its number
        and a plain verdict: `sparse_lens.faithfulness.faithfulness`. Kept as
        `.faithfulness_table`."""
        from sparse_lens.faithfulness import faithfulness

        self.results["faithfulness"] = faithfulness(self, config, corpus_tokens=corpus_tokens, **overrides)
        return self.results["faithfulness"]

    @property
    def faithfulness_table(self) -> pd.DataFrame | None:
        """The table of the last `faithfulness()` (None before)."""
        return self.results.get("faithfulness")

    # ------------------------------------------------------------------ summary
    @property
    def full_model_misses_target(self) -> bool:
        """The full model itself does not reach the target loss: there is no circuit to find."""
        target = getattr(self.config, "target_loss", float("inf"))
        return self.losses.get("full_model", 0.0) > target

    def summary(self) -> dict:
        """One row for a table of circuits: task, nodes, edges, the target and the losses (task
        loss, nats), seconds (nodes and edges are None when the full model misses the target),
        and the optimised mask's task loss (over the target: its optimisation collapsed, see
        `search`; None when nothing was optimised)."""
        missed = self.full_model_misses_target
        return dict(task=self.task, solved=False if missed else self.solved,
                    nodes=None if missed else self.n_nodes, edges=None if missed else self.n_edges,
                    target_loss=getattr(self.config, "target_loss", None),
                    full_model_loss=self.losses.get("full_model"),
                    circuit_loss=None if missed else self.losses.get("circuit"),
                    seconds=round(self.seconds, 1),
                    optimised_mask_loss=self.losses.get("optimised_mask"))

    def __repr__(self) -> str:
        target = getattr(self.config, "target_loss", float("nan"))
        if self.full_model_misses_target:
            return (f"Circuit for task {self.task!r} on {self.model.cfg.model_name}: NOT solved: the "
                    f"full model misses the target (task loss {self.losses['full_model']:.4f} > "
                    f"{target}); no circuit was searched for")
        reg = self.registry
        total_weights = sum(int(m.weight.ne(0).sum()) for m in self.model.sparsified_matrices())
        kinds = self.registry.describe(self.node_ids).kind.value_counts()
        by_kind = ", ".join(f"{k} {kinds.get(k, 0)}" for k in dict.fromkeys(reg.table().kind))
        edge_counts = self.edges.kind.value_counts()
        status = "solved" if self.solved else "NOT solved"
        lines = [
            f"Circuit for task {self.task!r} on {self.model.cfg.model_name} "
            f"({self.model.cfg.n_layers} layers)",
            f"  nodes: {self.n_nodes:,} of {reg.n_nodes:,} ({self.n_nodes / reg.n_nodes:.2%}): {by_kind}",
            f"  edges: {self.n_edges:,} of the model's {total_weights:,} nonzero weights "
            f"({self.n_edges / max(total_weights, 1):.3%}; weight {edge_counts.get('weight', 0)}, "
            f"embed {edge_counts.get('embed', 0)}, unembed {edge_counts.get('unembed', 0)}); "
            f"apart: {edge_counts.get('residual', 0)} residual links, {edge_counts.get('qk', 0)} q-k pairs",
            "  task loss (mean binary CE, nats): "
            + ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in self.losses.items())
            + f"; target {target}: {status}",
        ]
        if self.ablation_mode != "mean":
            lines.append(f"  found with {self.ablation_mode} ablation")
        if self.calibration is not None:
            lines.append(f"  calibrated logits: scale {self.calibration.scale:.3f}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """A directory with `circuit.json` (task, node ids, config, losses, calibration, the
        model's fingerprint) and `circuit.safetensors` (means, tau)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        cal = dataclasses.asdict(self.calibration) if self.calibration is not None else None
        if cal is not None:
            cal["bias"] = {str(k): v for k, v in cal["bias"].items()}
        doc = dict(format="sparse_lens.circuit", format_version=FORMAT_VERSION, task=self.task,
                   node_ids=self.node_ids, model_name=self.model.cfg.model_name,
                   model_fingerprint=model_fingerprint(self.model),
                   config=dataclasses.asdict(self.config) if self.config is not None else None,
                   losses=self.losses, calibration=cal, solved=self.solved,
                   bisection=self.bisection, seconds=self.seconds,
                   edge_tokens=list(self.edge_tokens) if self.edge_tokens is not None else None)
        (path / CIRCUIT_FILE).write_text(json.dumps(doc, indent=1))
        tensors = {"means": self.means.detach().cpu().contiguous()}
        if self.tau is not None:
            tensors["tau"] = self.tau.detach().cpu().contiguous()
        if self.ablation_values is not None:
            tensors["ablation_values"] = self.ablation_values.detach().cpu().contiguous()
        save_file(tensors, str(path / TENSORS_FILE))
        return path

    @classmethod
    def load(cls, path: str | Path, model, data=None) -> Circuit:
        """Load a saved circuit onto `model`, which must hold exactly the weights it was pruned
        from (checked by fingerprint). `data`: the hand-made TaskData of a custom task."""
        path = Path(path)
        try:
            doc = json.loads((path / CIRCUIT_FILE).read_text())
            tensors = load_file(str(path / TENSORS_FILE))
        except FileNotFoundError as err:
            raise FileNotFoundError(f"no saved circuit at {path} ({err.filename} missing)") from err
        except Exception as err:  # JSON or safetensors parse errors
            raise ValueError(f"{path} is not a readable circuit: {err}") from err
        if not isinstance(doc, dict) or doc.get("format") != "sparse_lens.circuit":
            raise ValueError(f"{path / CIRCUIT_FILE} is not a sparse_lens circuit file")
        if doc.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path / CIRCUIT_FILE} has format version {doc.get('format_version')}; "
                             f"this sparse_lens reads version {FORMAT_VERSION} (prune the task again)")
        read = _field_reader(doc, path / CIRCUIT_FILE)
        if read("model_fingerprint") != model_fingerprint(model):
            raise ValueError(
                f"the circuit at {path} was pruned from a different model ({doc.get('model_name')}, "
                f"fingerprint {doc['model_fingerprint'][:12]}); this model "
                f"({model.cfg.model_name}) has other weights or another config")
        task, node_ids, losses, solved = (read(k) for k in ("task", "node_ids", "losses", "solved"))
        means = _field_reader(tensors, path / TENSORS_FILE)("means")
        try:
            cal = doc.get("calibration")
            calibration = (Calibration(scale=cal["scale"], bias={int(k): v for k, v in cal["bias"].items()})
                           if cal else None)
            config = PruneConfig(**doc["config"]) if doc.get("config") else None
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"{path / CIRCUIT_FILE}: invalid calibration or config: "
                             f"{type(err).__name__}: {err}") from err
        tokens = doc.get("edge_tokens")
        return cls(model=model, task=task, node_ids=node_ids, tau=tensors.get("tau"), means=means,
                   config=config, losses=losses, calibration=calibration, solved=solved,
                   bisection=doc.get("bisection", []), seconds=doc.get("seconds", 0.0), data=data,
                   ablation_values=tensors.get("ablation_values"),
                   edge_tokens=tuple(tokens) if tokens is not None else None)



def _field_reader(doc: dict, source: Path):
    """`read(key)`: `doc[key]`, or ValueError naming `source` and the missing field."""
    def read(key: str):
        if key not in doc:
            raise ValueError(f"{source} has no field {key!r}: not a complete saved circuit")
        return doc[key]
    return read
