"""Issue 13, items 3-5: exact attributions in the cache `run_with_cache` returns, and the
TransformerLens flags the model cannot honour."""

import pytest
import torch

from sparse_lens.config import SparseHookedTransformerConfig
from sparse_lens.model import SparseHookedTransformer


def trained_like(seed=0, **overrides) -> SparseHookedTransformer:
    """A `tiny` model whose norm gains and biases are not their initial values (as after
    training): ln_final.w, ln1/ln2 weights and the output biases drawn at random."""
    torch.manual_seed(seed)
    model = SparseHookedTransformer(SparseHookedTransformerConfig.preset("tiny", **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".w") or name.endswith("b_O") or name.endswith("b_out") or name.endswith("b_U"):
                p.copy_(torch.rand_like(p) * 1.5 + 0.25 if name.endswith(".w") else torch.randn_like(p))
    return model


@pytest.mark.parametrize("overrides", [{}, {"d_pos_emb": 8}], ids=["added-positions", "d_pos_emb"])
def test_decomposition_and_logit_attrs_sum_to_the_logit_difference(overrides):
    model = trained_like(**overrides)
    assert not torch.allclose(model.ln_final.w, torch.ones_like(model.ln_final.w))
    tokens = torch.randint(0, 2048, (3, 12), generator=torch.Generator().manual_seed(1))
    logits, cache = model.run_with_cache(tokens)
    correct, wrong = torch.tensor([5, 17, 300]), torch.tensor([9, 4, 1000])
    # logit_attrs applies the final norm itself: the stack goes in as the residual holds it
    stack = cache.decompose_resid(pos_slice=-1)  # [component, batch, d_model]
    attrs = cache.logit_attrs(stack, tokens=correct, incorrect_tokens=wrong, pos_slice=-1)
    rows = torch.arange(3)
    b_U = model.unembed.b_U
    expected = (logits[rows, -1, correct] - logits[rows, -1, wrong]) - (b_U[correct] - b_U[wrong])
    torch.testing.assert_close(attrs.sum(0), expected, rtol=0, atol=1e-5)
    # the accumulated residual at the unembed, through the cache, is what the unembed reads
    resid = cache.accumulated_resid(apply_ln=True, pos_slice=-1)[-1]  # [batch, d_model]
    torch.testing.assert_close(resid @ model.W_U + b_U, logits[:, -1], rtol=0, atol=1e-4)


def test_head_and_neuron_contributions_sum_to_the_block_outputs():
    model = trained_like()
    assert model.cfg.topk_at("attn_out") and model.cfg.topk_at("mlp_out")
    tokens = torch.randint(0, 2048, (2, 10), generator=torch.Generator().manual_seed(2))
    _, cache = model.run_with_cache(tokens)
    for layer in range(model.cfg.n_layers):
        heads, bias = cache.head_contributions(layer)
        assert heads.shape == (2, 10, model.cfg.n_heads, model.cfg.d_model)
        attn_out = cache[f"blocks.{layer}.hook_attn_out"]
        torch.testing.assert_close(heads.sum(-2) + bias, attn_out, rtol=0, atol=1e-5)
        neurons, bias = cache.neuron_contributions(layer)
        assert neurons.shape == (2, 10, model.cfg.d_mlp, model.cfg.d_model)
        torch.testing.assert_close(neurons.sum(-2) + bias, cache[f"blocks.{layer}.hook_mlp_out"],
                                   rtol=0, atol=1e-5)
        some, _ = cache.neuron_contributions(layer, neurons=[3, 7])
        torch.testing.assert_close(some, neurons[:, :, [3, 7]])
    # TransformerLens's own per-head stack does not add up under AbsTopK at attn_out: the reason
    # for the helper (documented in sparse_lens.attribution)
    tl_heads = cache.stack_head_results(layer=1)  # [head, batch, pos, d_model]
    tl_sum = tl_heads.sum(0) + model.blocks[0].attn.b_O
    assert (tl_sum - cache["blocks.0.hook_attn_out"]).abs().max() > 1e-3


def test_without_output_topk_the_contributions_are_transformer_lens_results():
    model = trained_like(act_topk_locations=("attn_q", "mlp_neuron"))
    tokens = torch.randint(0, 2048, (2, 6), generator=torch.Generator().manual_seed(3))
    _, cache = model.run_with_cache(tokens)
    heads, _ = cache.head_contributions(0)
    torch.testing.assert_close(heads, cache.stack_head_results(layer=1).permute(1, 2, 0, 3))
    neurons, _ = cache.neuron_contributions(1)
    torch.testing.assert_close(neurons, cache.get_neuron_results(1))


@pytest.mark.parametrize("flag", ["set_use_split_qkv_input", "set_use_attn_in", "set_use_hook_mlp_in"])
def test_unsupported_flags_refuse_when_set_and_leave_the_model_working(flag):
    model = trained_like()
    tokens = torch.randint(0, 2048, (1, 5))
    before = model(tokens)
    with pytest.raises(NotImplementedError, match="hook_attn_read|hook_mlp_read"):
        getattr(model, flag)(True)
    getattr(model, flag)(False)  # switching it off is fine
    torch.testing.assert_close(model(tokens), before)
