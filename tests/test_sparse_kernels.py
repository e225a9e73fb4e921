"""CSR matmuls for frozen models: the dense model's logits and mask gradients, weights restored."""

import pytest
import torch

from sparse_lens import sparse_kernels
from sparse_lens.config import SparseHookedTransformerConfig
from sparse_lens.hooks import NodeRegistry, masked_nodes
from sparse_lens.model import SparseHookedTransformer
from sparse_lens.pruning import heaviside_ste
from sparse_lens.sparse_kernels import CSRWeight, sparse_matmuls


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = SparseHookedTransformerConfig.preset("tiny", weight_l0=1 / 32, use_bigram_table=True)
    m = SparseHookedTransformer(cfg)
    with torch.no_grad():
        for p in m.parameters():  # nonzero biases, sinks and bigram table: all paths exercised
            if p.ndim < 2 or p is m.bigram:
                p.normal_(0, 0.1)
    m.project_weights_()
    return m.eval()


@pytest.fixture
def tokens():
    return torch.randint(0, 2048, (3, 40), generator=torch.Generator().manual_seed(1))


def test_csr_logits_equal_the_dense_ones_and_every_matrix_ran_as_csr(model, tokens):
    with torch.no_grad():
        dense = model(tokens)
    with sparse_matmuls(model) as on, torch.no_grad():
        assert on
        csr = model(tokens)
        swapped = {name: p for name, p in model.named_parameters()
                   if name.endswith(sparse_kernels.SWAPPED_SUFFIXES)}
        assert len(swapped) == 2 * 6 + 1
        unused = [name for name, p in swapped.items() if not (isinstance(p, CSRWeight) and p._cache)]
    assert not unused  # each matrix's product went through CSR (its conversion is cached)
    torch.testing.assert_close(csr, dense, rtol=0, atol=1e-5)


def test_mask_gradients_flow_through_csr_and_weights_get_none(model, tokens):
    registry = NodeRegistry.for_model(model)
    means = torch.randn(registry.n_nodes, generator=torch.Generator().manual_seed(2)) * 0.1

    def mask_grad(csr: bool):
        tau = torch.full((registry.n_nodes,), 0.1, requires_grad=True)
        with sparse_matmuls(model, csr), masked_nodes(model, registry, heaviside_ste(tau), means):
            model(tokens)[:, -1].logsumexp(-1).sum().backward()
        return tau.grad

    for p in model.parameters():
        p.grad = None
    dense, csr = mask_grad(False), mask_grad(True)
    assert csr.abs().sum() > 0
    torch.testing.assert_close(csr, dense, rtol=1e-4, atol=1e-6)
    swapped = [p for n, p in model.named_parameters() if n.endswith(sparse_kernels.SWAPPED_SUFFIXES)]
    # the CSR pass gave the weights nothing (the dense pass before it did: the test can fail)
    grads_after_dense = [p.grad for p in swapped]
    assert all(g is not None for g in grads_after_dense)
    for p in model.parameters():
        p.grad = None
    mask_grad(True)
    assert all(p.grad is None for p in swapped)


def test_the_model_is_restored_after_an_error_and_no_hooks_are_left(model, tokens):
    before = {name: p for name, p in model.named_parameters()}
    hooks_before = {name: len(h.fwd_hooks) for name, h in model.hook_dict.items()}
    with pytest.raises(RuntimeError, match="boom"):
        with sparse_matmuls(model):
            assert isinstance(model.blocks[0].mlp.W_in, CSRWeight)
            raise RuntimeError("boom")
    after = dict(model.named_parameters())
    assert all(after[name] is p and type(p) is torch.nn.Parameter and p.requires_grad
               for name, p in before.items())
    assert {name: len(h.fwd_hooks) for name, h in model.hook_dict.items()} == hooks_before


def test_weights_changed_inside_the_context_are_an_error(tokens):
    m = SparseHookedTransformer(SparseHookedTransformerConfig.preset("tiny"))
    with pytest.raises(RuntimeError, match="weights changed inside sparse_matmuls"):
        with sparse_matmuls(m):
            m.project_weights_(0.5)  # writes the original parameters in place


def test_auto_uses_csr_only_at_or_below_the_measured_density(model, monkeypatch):
    density = sparse_kernels.sparsified_density(model)
    assert 1 / 32 <= density < 1 / 8  # the per-unit floor keeps the tiny model a bit denser
    monkeypatch.setattr(sparse_kernels, "AUTO_MAX_DENSITY", density)
    assert sparse_kernels.use_csr(model, "auto")
    monkeypatch.setattr(sparse_kernels, "AUTO_MAX_DENSITY", density * 0.99)
    assert not sparse_kernels.use_csr(model, "auto")
    with sparse_matmuls(model, "auto") as on:
        assert not on and not isinstance(model.unembed.W_U, CSRWeight)
    with pytest.raises(ValueError, match="True, False or 'auto'"):
        sparse_kernels.use_csr(model, "yes")


def test_a_nested_context_changes_nothing(model, tokens):
    with sparse_matmuls(model):
        w = model.blocks[1].attn.W_O
        with sparse_matmuls(model, "auto") as on:
            assert on and model.blocks[1].attn.W_O is w
        assert model.blocks[1].attn.W_O is w  # the inner exit did not restore the dense weight
