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
`n_edges` counts `weight`, `embed` and `unembed` edges.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd
import torch
from jaxtyping import Float, Int
from safetensors.torch import load_file, save_file

from sparse_lens.fingerprint import model_fingerprint
from sparse_lens.hooks import NodeRegistry, keep_mask_from_ids, masked_nodes
from sparse_lens.sparse_kernels import sparse_matmuls

CIRCUIT_FILE = "circuit.json"
#: 2: the model fingerprint is `fingerprint.model_fingerprint` (1 hashed the weights another way)
FORMAT_VERSION = 2
TENSORS_FILE = "circuit.safetensors"
EDGE_KINDS = ("weight", "embed", "unembed", "residual", "qk")
COUNTED_EDGE_KINDS = ("weight", "embed", "unembed")


def node_label(row) -> str:
    """`L1.q[h3.2]`, `L0.neuron[57]`, `L2.attn_write[12]`."""
    idx = f"h{row.head}.{row.channel}" if row.head >= 0 else f"{row.channel}"
    return f"L{row.layer}.{row.kind}[{idx}]"


class Circuit:
    """The result of `prune`: see the module docstring. Holds a reference to its model."""

    def __init__(self, model, task: str, node_ids, tau, means, config, losses: dict,
                 calibration=None, solved: bool = False, bisection=(), seconds: float = 0.0,
                 data=None, ablation_values=None):
        self.model = model
        self.registry = NodeRegistry.for_model(model)
        self.task = task
        self.node_ids: list[int] = sorted(int(i) for i in node_ids)
        self.tau = tau  # [n_nodes] learned mask logits (None when loaded without them)
        self.means = means  # [n_nodes] node means over the pretraining corpus
        # [n_nodes] what pruned nodes take in the circuit's ablation mode (None: the means)
        self.ablation_values = ablation_values
        self.config = config
        self.losses = dict(losses)
        self.calibration = calibration
        self.solved = solved
        self.bisection = list(bisection)
        self.seconds = seconds
        self.data = data  # a hand-made TaskData, used instead of generating `task` examples
        self.verification: pd.DataFrame | None = None
        self.faithfulness_table: pd.DataFrame | None = None
        self._edges: pd.DataFrame | None = None

    # ------------------------------------------------------------------ nodes and edges
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
    def ablation(self):
        """The circuit's `Ablation`: its mode, with the values the search used (for `resample`,
        the task means its fallback takes)."""
        from sparse_lens.ablation import Ablation

        values = self.means if self.ablation_values is None else self.ablation_values
        return Ablation(self.ablation_mode, values, getattr(self.config, "seed", 0))

    @property
    def nodes(self) -> pd.DataFrame:
        """One row per kept node: id, kind, layer, head (-1 if none), channel, hook_name, label,
        tau (the learned mask logit), mean (the value it takes when ablated)."""
        table = self.registry.describe(self.node_ids)
        table["label"] = [node_label(r) for r in table.itertuples()]
        if self.tau is not None:
            table["tau"] = self.tau[self.node_ids].numpy()
        table["mean"] = self.means[self.node_ids].float().numpy()
        return table

    @property
    def edges(self) -> pd.DataFrame:
        """One row per edge: kind, source, target (labels), weight (NaN for residual/qk)."""
        if self._edges is None:
            data = self._task_data(split="train", n=128)
            prompt_tokens = sorted(set(data.tokens.flatten().tolist()))
            candidates = sorted(set(data.correct.tolist()) | set(data.contrast.tolist()))
            self._edges = circuit_edges(self.model, self.registry, self.node_ids,
                                        prompt_tokens, candidates)
        return self._edges

    @property
    def n_edges(self) -> int:
        return int(self.edges.kind.isin(COUNTED_EDGE_KINDS).sum())

    def _task_data(self, split: str = "test", n: int = 256, seed: int = 0):
        """Held-out examples of the circuit's task, at the level and from the source it was
        pruned on (real code holds few of some classes: then as many as it has, balanced)."""
        from sparse_lens.tasks import corpus_class_counts, get_task

        if self.data is not None:
            return self.data.check_fits(self.model.cfg.n_ctx).to(self.model.cfg.device)
        level = self.config.level if self.config is not None else "core"
        source = self.config.source if self.config is not None else "generated"
        if source == "corpus":
            n = min(n, 2 * min(corpus_class_counts(self.task, self.model.tokenizer, split)))
        return get_task(self.task, self.model.tokenizer, n=n, seed=seed, split=split, level=level,
                        source=source, n_ctx=self.model.cfg.n_ctx).to(self.model.cfg.device)

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
        values = self.means if self.ablation_values is None else self.ablation_values
        with sparse_matmuls(self.model, "auto"), \
                masked_nodes(self.model, self.registry, self.mask, values):
            out = self.model(tokens, **forward_kwargs)
        if self.calibration is not None and isinstance(out, torch.Tensor) and out.ndim == 3:
            out = self.calibration.apply_logits(out)
        return out

    def verify(self, n: int = 256, n_random: int = 5, seed: int = 0) -> pd.DataFrame:
        """Task loss and accuracy on `n` held-out (test split) examples for: the full model; the
        circuit alone (everything else ablated, in the circuit's ablation mode); the model with
        the circuit's nodes ablated; random node sets of the circuit's size (mean and std over
        `n_random` seeds). The circuit row uses the circuit's calibration, if any. Stored as
        `.verification`."""
        from sparse_lens.ablation import ablated_nodes
        from sparse_lens.pruning import final_logit_pairs, pair_accuracy, pair_loss

        data = self._task_data(split="test", n=n, seed=seed)
        reg, model = self.registry, self.model
        circuit_mask = self.mask
        rows = []
        was_training = model.training
        model.eval()
        try:
            with sparse_matmuls(model, "auto"), \
                    ablated_nodes(model, reg, torch.ones(reg.n_nodes), self.ablation) as masker:
                def evaluate(mask, calibrate=False):
                    pairs = final_logit_pairs(model, data, masker, mask.to(model.cfg.device))
                    if calibrate and self.calibration is not None:
                        pairs = self.calibration.apply_pairs(pairs, data)
                    return pair_loss(pairs), pair_accuracy(pairs)

                for condition, mask, size, cal in (
                    ("full model", torch.ones(reg.n_nodes), reg.n_nodes, False),
                    ("circuit", circuit_mask, self.n_nodes, True),
                    ("circuit ablated", 1 - circuit_mask, reg.n_nodes - self.n_nodes, False),
                ):
                    loss, acc = evaluate(mask, cal)
                    rows.append(dict(condition=condition, n_nodes=size, task_loss=loss,
                                     task_loss_std=0.0, accuracy=acc, accuracy_std=0.0))
                gen = torch.Generator().manual_seed(seed)
                random_results = torch.tensor([
                    evaluate(keep_mask_from_ids(reg, torch.randperm(reg.n_nodes, generator=gen)[:self.n_nodes]))
                    for _ in range(n_random)])
        finally:
            model.train(was_training)
        rows.append(dict(condition=f"random nodes (x{n_random})", n_nodes=self.n_nodes,
                         task_loss=random_results[:, 0].mean().item(),
                         task_loss_std=random_results[:, 0].std().item() if n_random > 1 else 0.0,
                         accuracy=random_results[:, 1].mean().item(),
                         accuracy_std=random_results[:, 1].std().item() if n_random > 1 else 0.0))
        self.verification = pd.DataFrame(rows)
        return self.verification

    def faithfulness(self, config=None, corpus_tokens=None, **overrides) -> pd.DataFrame:
        """The evidence for or against trusting the circuit, one row per check with its number
        and a plain verdict: `sparse_lens.faithfulness.faithfulness`. Stored as
        `.faithfulness_table`."""
        from sparse_lens.faithfulness import faithfulness

        self.faithfulness_table = faithfulness(self, config, corpus_tokens=corpus_tokens, **overrides)
        return self.faithfulness_table

    # ------------------------------------------------------------------ summary
    @property
    def full_model_misses_target(self) -> bool:
        """The full model itself does not reach the target loss: there is no circuit to find."""
        target = getattr(self.config, "target_loss", float("inf"))
        return self.losses.get("full_model", 0.0) > target

    def summary(self) -> dict:
        """One row for a table of circuits: task, nodes, edges, the target and the losses (task
        loss, nats), seconds (nodes and edges are None when the full model misses the target)."""
        missed = self.full_model_misses_target
        return dict(task=self.task, solved=False if missed else self.solved,
                    nodes=None if missed else self.n_nodes, edges=None if missed else self.n_edges,
                    target_loss=getattr(self.config, "target_loss", None),
                    full_model_loss=self.losses.get("full_model"),
                    circuit_loss=None if missed else self.losses.get("circuit"),
                    seconds=round(self.seconds, 1))

    def __repr__(self) -> str:
        target = getattr(self.config, "target_loss", float("nan"))
        if self.full_model_misses_target:
            return (f"Circuit for task {self.task!r} on {self.model.cfg.model_name}: NOT solved: the "
                    f"full model misses the target (task loss {self.losses['full_model']:.4f} > "
                    f"{target}); no circuit was searched for")
        reg = self.registry
        total_weights = sum(int(m.weight.ne(0).sum()) for m in self.model.sparsified_matrices())
        kinds = self.nodes.kind.value_counts()
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
                   bisection=self.bisection, seconds=self.seconds)
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
        from sparse_lens.pruning import Calibration, PruneConfig

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
        field = _field_reader(doc, path / CIRCUIT_FILE)
        if field("model_fingerprint") != model_fingerprint(model):
            raise ValueError(
                f"the circuit at {path} was pruned from a different model ({doc.get('model_name')}, "
                f"fingerprint {doc['model_fingerprint'][:12]}); this model "
                f"({model.cfg.model_name}) has other weights or another config")
        task, node_ids, losses, solved = (field(k) for k in ("task", "node_ids", "losses", "solved"))
        means = _field_reader(tensors, path / TENSORS_FILE)("means")
        try:
            cal = doc.get("calibration")
            calibration = (Calibration(scale=cal["scale"], bias={int(k): v for k, v in cal["bias"].items()})
                           if cal else None)
            config = PruneConfig(**doc["config"]) if doc.get("config") else None
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"{path / CIRCUIT_FILE}: invalid calibration or config: "
                             f"{type(err).__name__}: {err}") from err
        return cls(model, task, node_ids, tensors.get("tau"), means, config, losses, calibration,
                   solved, [tuple(p) for p in doc.get("bisection", [])], doc.get("seconds", 0.0), data,
                   tensors.get("ablation_values"))


def _field_reader(doc: dict, source: Path):
    """`field(key)`: `doc[key]`, or ValueError naming `source` and the missing field."""
    def field(key: str):
        if key not in doc:
            raise ValueError(f"{source} has no field {key!r}: not a complete saved circuit")
        return doc[key]
    return field


# ---------------------------------------------------------------------- edges from weights
def circuit_edges(model, registry: NodeRegistry, node_ids, task_tokens, candidate_tokens) -> pd.DataFrame:
    """All edges of the circuit `node_ids` (see the module docstring)."""
    kept = {name: m.bool() for name, m in registry.split(keep_mask_from_ids(registry, node_ids)).items()}
    table = registry.table()
    label = lambda ids: [node_label(r) for r in table.iloc[ids].itertuples()]  # noqa: E731
    frames = []

    def weight_edges(weight, src_site, dst_site, kind="weight"):
        """`weight` laid out as [*src_shape, *dst_shape]."""
        src_k, dst_k = kept[src_site.hook_name], kept[dst_site.hook_name]
        src_flat, dst_flat = src_k.flatten(), dst_k.flatten()
        w = weight.detach().cpu().reshape(src_flat.numel(), dst_flat.numel())
        nz = (w != 0) & src_flat[:, None] & dst_flat[None, :]
        s, d = nz.nonzero(as_tuple=True)
        if len(s):
            frames.append(pd.DataFrame(dict(
                kind=kind, source=label((s + src_site.offset).tolist()),
                target=label((d + dst_site.offset).tolist()), weight=w[s, d].numpy())))

    for layer, block in enumerate(model.blocks):
        site = {s.kind: s for s in registry.sites if s.layer == layer}
        for kind, W in (("q", block.attn.W_Q), ("k", block.attn.W_K), ("v", block.attn.W_V)):
            weight_edges(W.permute(1, 0, 2), site["attn_read"], site[kind])  # [d_model, h, d_head]
        weight_edges(block.attn.W_O, site["v"], site["attn_write"])  # [h, d_head, d_model]
        weight_edges(block.mlp.W_in, site["mlp_read"], site["neuron"])  # [d_model, d_mlp]
        weight_edges(block.mlp.W_out, site["neuron"], site["mlp_write"])  # [d_mlp, d_model]
        q, k = kept[site["q"].hook_name], kept[site["k"].hook_name]
        heads, chans = (q & k).nonzero(as_tuple=True)
        if len(heads):
            frames.append(pd.DataFrame(dict(
                kind="qk", source=label((site["q"].offset + heads * q.shape[1] + chans).tolist()),
                target=label((site["k"].offset + heads * k.shape[1] + chans).tolist()),
                weight=float("nan"))))

    reads = [s for s in registry.sites if s.kind in ("attn_read", "mlp_read")]
    writes = [s for s in registry.sites if s.kind in ("attn_write", "mlp_write")]
    order = {s.hook_name: i for i, s in enumerate(registry.sites)}
    for w in writes:
        for r in reads:
            if order[r.hook_name] > order[w.hook_name]:
                d_model = kept[w.hook_name].numel()  # reads past d_model are positions
                (chans,) = (kept[w.hook_name] & kept[r.hook_name][:d_model]).nonzero(as_tuple=True)
                if len(chans):
                    frames.append(pd.DataFrame(dict(
                        kind="residual", source=label((w.offset + chans).tolist()),
                        target=label((r.offset + chans).tolist()), weight=float("nan"))))

    tokenizer = model.tokenizer
    tok_name = (lambda t: repr(tokenizer.decode([t]))) if tokenizer is not None else str

    def vocab_edges(kind: str, weight, sites, tokens, into_tokens: bool) -> None:
        """`weight` as [d_vocab, d_model]: token -> channel edges, or channel -> token."""
        for site in sites:
            (chans,) = kept[site.hook_name][:weight.shape[1]].nonzero(as_tuple=True)  # residual
            sub = weight[tokens][:, chans]
            ti, ci = (sub != 0).nonzero(as_tuple=True)
            if len(ti):
                prefix = "logit" if into_tokens else "embed"
                toks = [f"{prefix}[{tok_name(tokens[i])}]" for i in ti.tolist()]
                nodes = label((site.offset + chans[ci]).tolist())
                src, dst = (nodes, toks) if into_tokens else (toks, nodes)
                frames.append(pd.DataFrame(dict(kind=kind, source=src, target=dst,
                                                weight=sub[ti, ci].numpy())))

    vocab_edges("embed", model.embed.W_E.detach().cpu(), reads, task_tokens, into_tokens=False)
    vocab_edges("unembed", model.unembed.W_U.detach().cpu().T, writes, candidate_tokens,
                into_tokens=True)
    if not frames:
        return pd.DataFrame(dict(kind=pd.Series(dtype=str), source=pd.Series(dtype=str),
                                 target=pd.Series(dtype=str), weight=pd.Series(dtype=float)))
    return pd.concat(frames, ignore_index=True)
