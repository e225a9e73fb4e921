"""SparseHookedTransformer: equality with HookedTransformer, hooks, AbsTopK, bigram, sparsity."""

import warnings

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens import utilities as utils

from sparse_lens.config import TOPK_LOCATIONS, SparseHookedTransformerConfig
from sparse_lens.model import SparseHookedTransformer

ALL_OFF = dict(weight_l0=1.0, act_topk_locations=(), use_attention_sinks=False,
               use_bigram_table=False)


def make(seed=0, tokenizer=None, **overrides):
    torch.manual_seed(seed)
    cfg = SparseHookedTransformerConfig.preset("tiny", device="cpu", **overrides)
    return SparseHookedTransformer(cfg, tokenizer=tokenizer)


def plain_twin(model: SparseHookedTransformer) -> HookedTransformer:
    """A plain HookedTransformer of the same shape holding the same weights."""
    c = model.cfg
    cfg = HookedTransformerConfig(
        n_layers=c.n_layers, d_model=c.d_model, d_head=c.d_head, n_heads=c.n_heads, d_mlp=c.d_mlp,
        n_ctx=c.n_ctx, d_vocab=c.d_vocab, act_fn=c.act_fn, normalization_type="RMS",
        use_attention_sinks=c.use_attention_sinks, device="cpu", default_prepend_bos=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        plain = HookedTransformer(cfg)
    plain.load_state_dict(model.state_dict(), strict=True)
    return plain


@pytest.mark.parametrize("sinks", [False, True])
def test_all_sparsity_off_gives_the_logits_and_cache_of_plain_hooked_transformer(sinks):
    model = make(**{**ALL_OFF, "use_attention_sinks": sinks})
    if sinks:
        with torch.no_grad():
            for block in model.blocks:
                block.attn.sinks.normal_()
    plain = plain_twin(model)
    tokens = torch.randint(0, 2048, (3, 20))
    logits, cache = model.run_with_cache(tokens)
    plain_logits, plain_cache = plain.run_with_cache(tokens)
    torch.testing.assert_close(logits, plain_logits, rtol=0, atol=1e-5)
    # every hook a plain HookedTransformer fires is here, under the same name, with the same value
    assert set(plain_cache.keys()) <= set(cache.keys())
    for name in plain_cache.keys():
        torch.testing.assert_close(cache[name], plain_cache[name], rtol=0, atol=1e-5, msg=name)
    torch.testing.assert_close(model(tokens, return_type="loss"), plain(tokens, return_type="loss"))


def test_read_hooks_and_topk_location_hooks_are_registered():
    model = make()
    _, cache = model.run_with_cache(torch.randint(0, 2048, (1, 8)))
    for layer in range(model.cfg.n_layers):
        for hook in TOPK_LOCATIONS.values():
            assert hook.format(layer=layer) in cache
        assert utils.get_act_name("q", layer) in cache
        assert utils.get_act_name("post", layer) in cache
    assert "blocks.0.hook_attn_read" in model.hook_dict and "blocks.1.hook_mlp_read" in model.hook_dict


def nonzeros_per_token(x):
    return (x != 0).sum(-1)


def test_abstopk_keeps_exactly_a_quarter_at_every_location_before_its_hook():
    model = make(act_topk_locations=tuple(TOPK_LOCATIONS))
    _, cache = model.run_with_cache(torch.randint(0, 2048, (2, 12)))
    for layer in range(2):
        for loc, hook in TOPK_LOCATIONS.items():
            act = cache[hook.format(layer=layer)]
            if loc in ("attn_q", "attn_k", "attn_v"):  # over all heads' channels together
                act = act.flatten(-2)
            assert torch.all(nonzeros_per_token(act) == act.shape[-1] // 4), (loc, layer)
    # TransformerLens's own helpers see the sparse neurons
    neuron_results = cache.get_neuron_results(0)  # [batch, pos, d_mlp, d_model]
    assert torch.all((neuron_results.abs().sum(-1) != 0).sum(-1) <= 256 // 4)


def test_abstopk_is_off_where_not_configured():
    model = make(act_topk_locations=("mlp_neuron",))
    _, cache = model.run_with_cache(torch.randint(0, 2048, (2, 12)))
    assert torch.all(nonzeros_per_token(cache["blocks.0.mlp.hook_post"]) == 64)
    assert torch.all(nonzeros_per_token(cache["blocks.0.hook_attn_read"]) == 64)


def test_hooks_edit_the_forward_pass_at_topk_locations():
    model = make()
    tokens = torch.randint(0, 2048, (1, 6))
    clean = model(tokens)
    ablated = model.run_with_hooks(
        tokens, fwd_hooks=[("blocks.1.hook_mlp_out", lambda act, hook: torch.zeros_like(act))])
    assert not torch.allclose(clean, ablated)
    assert len(model.hook_dict["blocks.1.hook_mlp_out"].fwd_hooks) == 0


def test_bigram_table_adds_its_row_for_the_current_token():
    model = make(use_bigram_table=True)
    tokens = torch.randint(0, 2048, (2, 7))
    before = model(tokens)
    with torch.no_grad():
        model.bigram.normal_()
    after, cache = model.run_with_cache(tokens)
    torch.testing.assert_close(after - before, model.bigram[tokens], atol=1e-5, rtol=0)
    assert "hook_bigram_logits" in cache
    loss = model(tokens, return_type="loss")
    torch.testing.assert_close(loss, utils.lm_cross_entropy_loss(after, tokens))


def test_tokenizer_methods_and_generate(tokenizer):
    model = make(tokenizer=tokenizer, use_bigram_table=True)
    tokens = model.to_tokens("for i in range(10):\n    print(i)")
    assert tokens.shape[0] == 1
    assert "".join(model.to_str_tokens("x = 'a'")) == "x = 'a'"
    out = model.generate("def f(x):", max_new_tokens=4, do_sample=False, verbose=False)
    assert isinstance(out, str) and out.startswith("def f(x):")
    # a strong bigram table steers generation; with or without the kv cache, generate() must
    # give the greedy continuation of full forward passes (which add the bigram logits)
    with torch.no_grad():
        model.bigram.normal_(0, 3.0)
    toks = model.to_tokens("import os\n")
    expected = toks
    for _ in range(5):
        nxt = model(expected)[:, -1].argmax(-1, keepdim=True)
        expected = torch.cat([expected, nxt], dim=1)
    for cache in (True, False):
        out = model.generate(toks, max_new_tokens=5, do_sample=False, use_past_kv_cache=cache,
                             verbose=False)
        assert torch.equal(out, expected)
    assert model._generation_tokens is None


def test_the_model_leaves_the_callers_tokenizer_unchanged(tokenizer):
    before = (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token)
    make(tokenizer=tokenizer)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == before


def test_constructor_silences_only_its_own_deprecation_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make()
    assert not [w for w in caught if "HookedTransformer is deprecated" in str(w.message)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        HookedTransformer(HookedTransformerConfig(n_layers=1, d_model=8, d_head=4, n_ctx=4,
                                                  d_vocab=10, act_fn="relu", device="cpu"))
    assert [w for w in caught if "HookedTransformer is deprecated" in str(w.message)]


def test_projection_and_weight_sparsity_table():
    model = make(weight_l0=1 / 16, min_nonzero_per_unit=4)
    model.project_weights_()
    table = model.weight_sparsity().set_index("name")
    assert len(table) == 2 + 2 * 6  # W_E, W_U, and per layer W_Q/K/V/O, W_in, W_out
    for name, row in table.iterrows():
        budget = max(1, int(row.numel / 16))
        assert row.nonzeros == max(budget, row.floor_nonzeros), name
        assert row.min_nonzeros_per_unit >= 4, name
        assert row.achieved_l0 == pytest.approx(row.nonzeros / row.numel)
        assert row.target_l0 == 1 / 16
    # W_in [64, 256]: 256 neurons x 4 = 1024 = 1/16 of 16384; W_E [2048, 64]: 2048 tokens x 4 = 1/16
    assert table.loc["blocks.0.attn.W_Q", "units"] == 64
    assert table.loc["embed.W_E", "units"] == 2048
    # the floor can keep a matrix denser than its target: W_U [64, 2048] with 8 per logit
    denser = make(weight_l0=1 / 16, min_nonzero_per_unit=8)
    denser.project_weights_()
    row = denser.weight_sparsity().set_index("name").loc["unembed.W_U"]
    assert row.achieved_l0 == pytest.approx(1 / 8) and row.achieved_l0 > row.target_l0
    # the dense forward pass works on the sparse weights and 1-D parameters stay dense
    assert torch.isfinite(model(torch.randint(0, 2048, (1, 5)))).all()
    assert bool((model.blocks[0].ln1.w != 0).all())


def test_wrong_config_type_is_a_clear_error():
    with pytest.raises(TypeError, match="SparseHookedTransformerConfig"):
        SparseHookedTransformer(HookedTransformerConfig(n_layers=1, d_model=8, d_head=4, n_ctx=4,
                                                        d_vocab=10, act_fn="relu"))
