"""Open a trained sparse model in TransformerLens and look at it.

    .venv/bin/python examples/inspect_model.py runs/small        # after `sparse-lens train`

Prints the achieved weight sparsity per matrix, runs a prompt with `run_with_cache` and shows,
for the last token, the MLP neurons that fire most in each layer and the model's top next tokens.
"""

from __future__ import annotations

import argparse

import torch

from sparse_lens import SparseHookedTransformer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", nargs="?", default="runs/small")
    parser.add_argument("--prompt", default="for i in range(10):\n    print(")
    args = parser.parse_args(argv)

    model = SparseHookedTransformer.from_pretrained(args.model_dir)
    table = model.weight_sparsity()
    print(table[["name", "shape", "nonzeros", "target_l0", "achieved_l0", "min_nonzeros_per_unit"]]
          .to_string(index=False))

    tokens = model.to_tokens(args.prompt)
    logits, cache = model.run_with_cache(tokens)
    print(f"\nprompt tokens: {model.to_str_tokens(args.prompt)}")
    for layer in range(model.cfg.n_layers):
        post = cache[f"blocks.{layer}.mlp.hook_post"][0, -1]  # [d_mlp] at the last token
        top = post.abs().topk(5)
        active = int((post != 0).sum())
        print(f"layer {layer}: {active}/{post.numel()} neurons nonzero; largest |act|: "
              + ", ".join(f"n{i}={post[i]:+.2f}" for i in top.indices.tolist()))
    probs = torch.softmax(logits[0, -1], dim=-1).topk(5)
    print("next token: " + ", ".join(
        f"{model.tokenizer.decode([t])!r} {p:.2f}" for p, t in zip(probs.values.tolist(), probs.indices.tolist())))


if __name__ == "__main__":
    main()
