"""Prune a trained sparse model to the circuit of one task, verify it and save it.

    .venv/bin/python examples/find_circuit.py runs/small single_double_quote
    .venv/bin/python examples/find_circuit.py runs/small lambda_func --target-loss 0.4

Prints the circuit's summary, its nodes and the verification table (full model, circuit alone,
circuit ablated, random node sets of the same size) and saves it under <model_dir>/circuits/.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import sparse_lens
from sparse_lens import SparseHookedTransformer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("task", choices=sparse_lens.list_tasks())
    parser.add_argument("--target-loss", type=float, default=0.15)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args(argv)

    model = SparseHookedTransformer.from_pretrained(args.model_dir)
    circuit = sparse_lens.prune(model, args.task, model_dir=args.model_dir,
                                target_loss=args.target_loss, steps=args.steps)
    print(circuit)
    if circuit.full_model_misses_target:
        return
    print(circuit.nodes[["label", "tau", "mean"]].to_string(index=False))
    print(circuit.verify().round(4).to_string(index=False))
    print(f"saved to {circuit.save(args.model_dir / 'circuits' / args.task)}")


if __name__ == "__main__":
    main()
