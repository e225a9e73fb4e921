"""An independent forward pass of OpenAI's circuit_sparsity `GPT`, straight from a release state dict.

Written from the release's documented semantics (its `GPTConfig` fields and the layout of the
state dict its code writes), with plain torch ops and none of sparse_lens, so the importer can
be checked against something it does not share code with:

    x = wte[tok] (+ wpe[pos] unless d_pos_emb is set)
    per block, for each of attn and mlp:
        h = norm(x) [cat norm_p(wpe[pos]) when d_pos_emb] -> AbsTopK(attn_in|mlp_in)
        attn: q, k, v = c_attn(h) split; AbsTopK(attn_q/k/v) over all heads' channels;
              softmax(q k^T / sqrt(d_head), causal [+ one zero-value sink logit per head]) v;
              c_proj -> AbsTopK(attn_out)
        mlp:  act(c_fc(h)) -> AbsTopK(mlp_neuron) -> c_proj -> AbsTopK(mlp_out)
        x = x + that; relu(x) if residual_activation_type == "relu"; AbsTopK(resid_post_*)
    logits = lm_head(ln_f(x)) + final_logits_bias (+ bigram_table[tok])

AbsTopK keeps int(afrac * dim) entries of largest |x|. RMSNorm is torch's (eps = float eps, no
bias); LayerNorm has eps 1e-5 and a bias only when ln_bias.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _abs_topk(x: torch.Tensor, cfg: dict, loc: str) -> torch.Tensor:
    if cfg.get("afrac") is None or loc not in cfg.get("afrac_loctypes", "").split(","):
        return x
    k = int(cfg["afrac"] * x.shape[-1])
    keep = torch.zeros_like(x, dtype=torch.bool)
    keep.scatter_(-1, x.abs().topk(k, dim=-1).indices, True)
    return torch.where(keep, x, torch.zeros_like(x))


def _norm(x: torch.Tensor, sd: dict, prefix: str, cfg: dict) -> torch.Tensor:
    w = sd[prefix + ".weight"]
    if cfg.get("rms_norm", False):
        eps = torch.finfo(x.dtype).eps
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w
    mu = x.mean(-1, keepdim=True)
    var = (x - mu).pow(2).mean(-1, keepdim=True)
    out = (x - mu) / torch.sqrt(var + 1e-5) * w
    return out + sd[prefix + ".bias"] if prefix + ".bias" in sd else out


def _linear(x: torch.Tensor, sd: dict, prefix: str) -> torch.Tensor:
    out = x @ sd[prefix + ".weight"].T
    return out + sd[prefix + ".bias"] if prefix + ".bias" in sd else out


def release_logits(sd: dict[str, torch.Tensor], cfg: dict, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [batch, pos, vocab] of the release model `cfg` (its beeg_config.json) with state
    dict `sd` on `tokens` [batch, pos]."""
    n_head, d_model = cfg["n_head"], cfg["d_model"]
    d_head = cfg.get("d_head") or d_model // n_head
    batch, T = tokens.shape
    x = sd["transformer.wte.weight"][tokens]
    pos = sd["transformer.wpe.weight"][:T]
    cat_pos = cfg.get("d_pos_emb") is not None
    if not cat_pos:
        x = x + pos
    relu_resid = cfg.get("residual_activation_type", "identity") == "relu"
    gelu = cfg.get("activation_type", "gelu") == "gelu"
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(cfg["n_layer"]):
        p = f"transformer.h.{i}"

        def read(ln: str, ln_p: str) -> torch.Tensor:
            h = _norm(x, sd, f"{p}.{ln}", cfg)
            if cat_pos:
                hp = _norm(pos, sd, f"{p}.{ln_p}", cfg).expand(batch, T, -1)
                h = torch.cat([h, hp], dim=-1)
            return h

        h = _abs_topk(read("ln_1", "ln_p1"), cfg, "attn_in")
        qkv = _linear(h, sd, f"{p}.attn.c_attn")
        q, k, v = (_abs_topk(t, cfg, f"attn_{n}") for t, n in zip(qkv.chunk(3, dim=-1), "qkv"))
        q, k, v = (t.reshape(batch, T, n_head, d_head).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d_head)
        scores = scores.masked_fill(~causal, float("-inf"))
        if cfg.get("sink", False):
            sink = sd[f"{p}.attn.attn_imp.sink_logit"].reshape(1, n_head, 1, 1).expand(batch, n_head, T, 1)
            probs = torch.softmax(torch.cat([sink, scores], dim=-1), dim=-1)[..., 1:]
        else:
            probs = torch.softmax(scores, dim=-1)
        y = (probs @ v).transpose(1, 2).reshape(batch, T, n_head * d_head)
        x = x + _abs_topk(_linear(y, sd, f"{p}.attn.c_proj"), cfg, "attn_out")
        if relu_resid:
            x = torch.relu(x)
        x = _abs_topk(x, cfg, "resid_post_attn")

        h = _abs_topk(read("ln_2", "ln_p2"), cfg, "mlp_in")
        pre = _linear(h, sd, f"{p}.mlp.c_fc")
        act = F.gelu(pre) if gelu else torch.relu(pre)
        act = _abs_topk(act, cfg, "mlp_neuron")
        x = x + _abs_topk(_linear(act, sd, f"{p}.mlp.c_proj"), cfg, "mlp_out")
        if relu_resid:
            x = torch.relu(x)
        x = _abs_topk(x, cfg, "resid_post_mlp")

    unembed = sd.get("lm_head.weight", sd["transformer.wte.weight"])
    logits = _norm(x, sd, "transformer.ln_f", cfg) @ unembed.T
    if "final_logits_bias" in sd:
        logits = logits + sd["final_logits_bias"]
    if cfg.get("enable_bigram_table", False):
        logits = logits + sd["bigram_table"][tokens]
    return logits


# ------------------------------------------------------------------ checkpoints in the release layout
RELEASE_BASE = dict(block_size=16, vocab_size=97, n_layer=2, n_head=2, d_model=24, rms_norm=True,
                    bias=True, ln_bias=True, activation_type="gelu", tied_unembed=False,
                    tokenizer_name="tinypython_2k")


def release_state_dict(cfg: dict, seed: int = 0, final_logits_bias: bool = True,
                       causal_mask_buffer: bool = False) -> dict[str, torch.Tensor]:
    """Random weights (about half zero) under the keys and shapes the release's `GPT` module
    tree writes for `cfg`: `transformer.{wte,wpe,h.i.*,ln_f}`, `lm_head`, `final_logits_bias`,
    `bigram_table`; `causal_mask_buffer` adds the non-flash attention's `attn.bias` mask."""
    gen = torch.Generator().manual_seed(seed)
    d_model, n_head, T, V = cfg["d_model"], cfg["n_head"], cfg["block_size"], cfg["vocab_size"]
    d_head = cfg.get("d_head") or d_model // n_head
    d_mlp = cfg.get("d_mlp") or cfg.get("n_mlp") or 4 * d_model
    d_pos = cfg.get("d_pos_emb")
    d_in = d_model + (d_pos or 0)
    rms, bias = cfg.get("rms_norm", False), cfg.get("bias", True)
    ln_bias = cfg.get("ln_bias", True) and not rms

    def rand(*shape, scale=0.3, density=0.5):
        w = torch.randn(*shape, generator=gen) * scale
        return w * (torch.rand(*shape, generator=gen) < density)

    sd: dict[str, torch.Tensor] = {}

    def norm(name, n):
        sd[f"{name}.weight"] = 1 + 0.2 * torch.randn(n, generator=gen)
        if ln_bias:
            sd[f"{name}.bias"] = 0.1 * torch.randn(n, generator=gen)

    def linear(name, n_out, n_in):
        sd[f"{name}.weight"] = rand(n_out, n_in)
        if bias:
            sd[f"{name}.bias"] = 0.1 * torch.randn(n_out, generator=gen)

    if final_logits_bias:
        sd["final_logits_bias"] = 0.5 * torch.randn(V, generator=gen)
    sd["transformer.wte.weight"] = rand(V, d_model, scale=1.0)
    sd["transformer.wpe.weight"] = rand(T, d_pos or d_model, scale=1.0)
    for i in range(cfg["n_layer"]):
        p = f"transformer.h.{i}"
        norm(f"{p}.ln_1", d_model)
        if d_pos:
            norm(f"{p}.ln_p1", d_pos)
            norm(f"{p}.ln_p2", d_pos)
        linear(f"{p}.attn.c_attn", 3 * n_head * d_head, d_in)
        linear(f"{p}.attn.c_proj", d_model, n_head * d_head)
        if cfg.get("sink"):
            sd[f"{p}.attn.attn_imp.sink_logit"] = torch.randn(n_head, generator=gen)
        if causal_mask_buffer:
            sd[f"{p}.attn.bias"] = torch.ones(T, T).tril().view(1, 1, T, T)
        norm(f"{p}.ln_2", d_model)
        linear(f"{p}.mlp.c_fc", d_mlp, d_in)
        linear(f"{p}.mlp.c_proj", d_model, d_mlp)
    norm("transformer.ln_f", d_model)
    sd["lm_head.weight"] = sd["transformer.wte.weight"] if cfg.get("tied_unembed", True) else rand(V, d_model)
    if cfg.get("enable_bigram_table"):
        sd["bigram_table"] = torch.randn(V, V, generator=gen)
    return sd


def write_release_folder(folder, cfg: dict, sd: dict[str, torch.Tensor]):
    """Write `beeg_config.json` and `final_model.pt` the way the release ships a model."""
    import json
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "beeg_config.json").write_text(json.dumps(cfg, indent=1))
    torch.save(sd, folder / "final_model.pt")
    return folder
