"""The fused attention path: same results as TransformerLens's, and only when nothing hooks
the scores or the pattern."""

import warnings

import pytest
import torch

from sparse_lens.attention import causal_attention
from sparse_lens.config import SparseHookedTransformerConfig
from sparse_lens.kernels import reference_kernels
from sparse_lens.model import SparseHookedTransformer
from sparse_lens.training import deterministic_algorithms
from test_model import ALL_OFF, plain_twin


def make(sinks=True, **overrides):
    torch.manual_seed(0)
    cfg = SparseHookedTransformerConfig.preset("tiny", use_attention_sinks=sinks, **overrides)
    model = SparseHookedTransformer(cfg)
    model.project_weights_()
    if sinks:
        with torch.no_grad():
            for block in model.blocks:
                block.attn.sinks.normal_(0.0, 2.0)  # sinks that take a real share of each row
    return model


def loss_and_grads(model, tokens):
    model.zero_grad(set_to_none=True)
    loss = model(tokens, return_type="loss")
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("sinks", [True, False])
def test_fused_path_gives_the_logits_loss_and_gradients_of_transformer_lens_attention(sinks):
    model = make(sinks)
    tokens = torch.randint(0, 2048, (3, 40), generator=torch.Generator().manual_seed(0))
    assert model.blocks[0].attn.pattern_is_unobserved(torch.zeros(1))
    logits = model(tokens)
    loss, grads = loss_and_grads(model, tokens)
    with reference_kernels():
        assert not model.blocks[0].attn.pattern_is_unobserved(torch.zeros(1))
        ref_logits = model(tokens)
        ref_loss, ref_grads = loss_and_grads(model, tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    if sinks:
        assert grads["blocks.0.attn.sinks"].abs().min() > 0


def test_with_sparsity_off_the_plain_forward_equals_plain_hooked_transformer():
    model = make(True, **{k: v for k, v in ALL_OFF.items() if k != "use_attention_sinks"})
    tokens = torch.randint(0, 2048, (2, 30))
    torch.testing.assert_close(model(tokens), plain_twin(model)(tokens), rtol=0, atol=1e-5)


def test_caching_still_returns_the_patterns_and_the_same_logits():
    model = make(True)
    tokens = torch.randint(0, 2048, (2, 16))
    logits, cache = model.run_with_cache(tokens)
    torch.testing.assert_close(logits, model(tokens), rtol=0, atol=1e-5)
    pattern = cache["blocks.1.attn.hook_pattern"]  # [batch, head, query_pos, key_pos]
    assert pattern.shape == (2, model.cfg.n_heads, 16, 16)
    assert torch.all(pattern.triu(1) == 0)
    assert torch.all(pattern.sum(-1) < 1)  # the sinks take their share
    assert "blocks.0.attn.hook_attn_scores" in cache and "blocks.0.attn.hook_z" in cache


def test_a_hook_on_the_scores_or_the_pattern_runs_and_edits_the_forward():
    model = make(True)
    tokens = torch.randint(0, 2048, (1, 12))
    clean = model(tokens)
    seen = []

    def uniform_scores(scores, hook):
        seen.append(hook.name)
        return torch.where(torch.isinf(scores), scores, torch.zeros_like(scores))

    edited = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_attn_scores", uniform_scores)])
    assert seen == ["blocks.0.attn.hook_attn_scores"] and not torch.allclose(clean, edited)
    # a backward hook on the pattern needs the pattern too
    grads = []
    model.blocks[1].attn.hook_pattern.add_hook(lambda g, hook: grads.append(g.shape), dir="bwd")
    try:
        assert not model.blocks[1].attn.pattern_is_unobserved(torch.zeros(1))
        assert model.blocks[0].attn.pattern_is_unobserved(torch.zeros(1))
        model(tokens, return_type="loss").backward()
    finally:
        model.reset_hooks(including_permanent=True)
    assert grads == [(1, model.cfg.n_heads, 12, 12)]
    assert model.blocks[1].attn.pattern_is_unobserved(torch.zeros(1))
    torch.testing.assert_close(model(tokens), clean)


@pytest.mark.parametrize("sinks", [True, False])
def test_q_k_v_in_any_memory_layout_give_the_same_attention(sinks):
    """A hook may hand back q, k or v with the same values in another memory layout (a CSR product
    returns d_head-major ones): the fused path gives the plain layout's logits and gradients."""
    model = make(sinks)
    tokens = torch.randint(0, 2048, (3, 40), generator=torch.Generator().manual_seed(0))
    logits = model(tokens)
    loss, grads = loss_and_grads(model, tokens)

    def other_layout(act, hook):  # [batch, pos, head, d_head] stored d_head-major
        return act.permute(3, 0, 1, 2).contiguous().permute(1, 2, 3, 0)

    hooks = [(f"blocks.{i}.attn.hook_{x}", other_layout) for i in range(2) for x in "qkv"]
    with model.hooks(fwd_hooks=hooks):
        assert model.blocks[0].attn.pattern_is_unobserved(torch.zeros(1))
        torch.testing.assert_close(model(tokens), logits, rtol=0, atol=1e-5)
        moved_loss, moved_grads = loss_and_grads(model, tokens)
    torch.testing.assert_close(moved_loss, loss, rtol=0, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(moved_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_hooks_before_and_after_the_core_fire_on_the_fused_path():
    model = make(True)
    tokens = torch.randint(0, 2048, (1, 10))
    seen = []
    record = lambda act, hook: seen.append(hook.name)  # noqa: E731
    names = ["blocks.0.attn.hook_q", "blocks.0.attn.hook_k", "blocks.0.attn.hook_v",
             "blocks.0.attn.hook_z"]
    model.run_with_hooks(tokens, fwd_hooks=[(name, record) for name in names])
    assert seen == names


def test_padding_masks_and_the_kv_cache_use_transformer_lens_attention():
    model = make(True)
    tokens = torch.randint(0, 2048, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    torch.testing.assert_close(model(tokens, attention_mask=mask), model(tokens), rtol=0, atol=1e-5)
    # greedy generation with a KV cache (TransformerLens attention) and without (fused) agree
    kwargs = dict(max_new_tokens=4, do_sample=False, stop_at_eos=False, verbose=False)
    cached = model.generate(tokens[:1, :4], use_past_kv_cache=True, **kwargs)
    assert torch.equal(cached, model.generate(tokens[:1, :4], use_past_kv_cache=False, **kwargs))


def test_the_fused_kernel_is_deterministic_and_silent_under_deterministic_algorithms():
    gen = torch.Generator().manual_seed(0)
    q, k, v, dz = (torch.randn(2, 33, 4, 16, generator=gen) for _ in range(4))
    sinks = torch.randn(4, generator=gen)
    runs = []
    with deterministic_algorithms(), warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            leaves = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
            z = causal_attention(*leaves[:3], 0.25, leaves[3])
            z.backward(dz)
            runs.append([z.detach()] + [t.grad for t in leaves])
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(run, runs[0]))
