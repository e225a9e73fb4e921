"""The graph-ready training step (`training.graphed`): the same step as `train_step`, with no
value ever read back on the host inside it (what a CUDA graph needs), checked here on CPU where it
runs eagerly; on CUDA it is captured and replayed (`tests/test_gpu.py`)."""

import math

import pytest
import torch
from conftest import killed_at_step
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from sparse_lens import sparsity
from sparse_lens.config import SparseHookedTransformerConfig
from sparse_lens.kernels import reference_kernels
from sparse_lens.model import SparseHookedTransformer, SparsifiedMatrix
from sparse_lens.training import NonFiniteLossError, TrainConfig, make_optimizer, train, train_step
from sparse_lens.training.graphed import StaticProjection, StaticStep, rescale_grad_rms_on_device_

#: ops that make the host wait for the device (a value read back, or a shape that depends on values)
HOST_READS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero", "aten::equal",
              "aten::masked_select", "aten::_unique2", "aten::unique_consecutive", "aten::item"}


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func._schema.name)
        return func(*args, **(kwargs or {}))


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = SparseHookedTransformerConfig.preset("tiny", n_ctx=32, **overrides)
    return SparseHookedTransformer(cfg)


def graph_tc(**overrides):
    return TrainConfig(**{**dict(steps=20, batch_size=2, seq_len=16, lr=3e-3, cuda_graph=True), **overrides})


def batch(seed, shape=(2, 16)):
    return torch.randint(0, 2048, shape, generator=torch.Generator().manual_seed(seed))


@given(rows=st.integers(1, 12), cols=st.integers(4, 40), l0=st.floats(0.02, 1.0),
       unit_axis=st.sampled_from([0, 1]), seed=st.integers(0, 2**16))
@settings(max_examples=60, deadline=None)
def test_static_projection_keeps_the_same_entries_as_keep_mask(rows, cols, l0, unit_axis, seed):
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))  # no ties
    j = min(4, (cols, rows)[unit_axis])
    k = sparsity.nonzero_budget(weight.numel(), l0)
    expected = sparsity.keep_mask(weight, k, j, (unit_axis,))

    matrix = SparsifiedMatrix("w", torch.nn.Parameter(weight.clone()), (unit_axis,))
    projection = StaticProjection([matrix], j)
    projection.set_l0(l0)
    projection()
    out = projection.matrices[0].weight
    assert torch.equal(out != 0, expected)
    assert torch.equal(out[expected], weight[expected])  # kept entries bit-identical


def test_static_projection_equals_project_weights_on_every_model_layout():
    model = tiny_model()
    for p in model.parameters():  # dense random weights, as after the dense phase
        p.data.normal_()
    expected = tiny_model()
    expected.load_state_dict(model.state_dict())
    projection = StaticProjection(model.sparsified_matrices(), model.cfg.min_nonzero_per_unit)
    for l0 in (0.5, 0.1, 1 / 32):
        projection.set_l0(l0)
        projection()
        expected.project_weights_(l0)
        for (name, a), (_, b) in zip(model.named_parameters(), expected.named_parameters()):
            assert torch.equal(a, b), (name, l0)


def test_the_step_never_reads_a_value_back_on_the_host():
    model = tiny_model()
    tc = graph_tc()
    step = StaticStep(model, make_optimizer(model, tc), tc, (2, 16))
    step.tokens.copy_(batch(0))
    step.projection.set_l0(0.25)
    with RecordOps() as recorder:
        step._body()
    assert "aten::topk" in recorder.ops and "aten::_fused_adamw_" in recorder.ops, "the step ran"
    assert not HOST_READS & set(recorder.ops), sorted(HOST_READS & set(recorder.ops))


def test_the_static_step_matches_train_step_with_the_reference_kernels():
    """Same model, same batches and schedule: the losses and weights agree to float rounding
    (the rescale's division and AdamW's capturable form round differently)."""
    eager, static = tiny_model(), tiny_model()
    tc_eager, tc_static = graph_tc(cuda_graph=False), graph_tc()
    with reference_kernels():
        opt_eager = make_optimizer(eager, tc_eager, fused=True)
    step = StaticStep(static, make_optimizer(static, tc_static), tc_static, (2, 16))
    for i in range(6):
        l0, lr = tc_static.schedule(i, 1 / 8)
        with reference_kernels():
            loss_eager = train_step(eager, opt_eager, batch(i), lr, l0, tc_eager)
        loss_static = step(batch(i), lr, l0)
        assert math.isclose(loss_eager, loss_static, rel_tol=1e-4), (i, loss_eager, loss_static)
    for (name, a), (_, b) in zip(eager.named_parameters(), static.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5, msg=name)
        if name.endswith(("W_in", "W_out", "W_Q", "W_E")):
            assert abs(int((a != 0).sum()) - int((b != 0).sum())) == 0, name


def test_the_static_step_runs_under_bf16_autocast():
    model = tiny_model()
    tc = graph_tc(dtype="bf16")
    step = StaticStep(model, make_optimizer(model, tc), tc, (2, 16))
    losses = [step(batch(i), 3e-3, 0.25) for i in range(2)]
    assert all(math.isfinite(x) for x in losses)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_device_rescale_matches_the_host_rescale():
    grads = [torch.randn(5, 7), torch.randn(3)]
    host = [g.clone() for g in grads]
    from sparse_lens.training import rescale_grad_rms_

    for mode, target in (("rescale", 1.0), ("clip", 0.5), ("clip", 100.0)):
        a, b = [g.clone() for g in grads], [g.clone() for g in host]
        rms = rescale_grad_rms_on_device_(a, target, mode)
        assert math.isclose(float(rms), rescale_grad_rms_(b_params := [_Holder(g) for g in b], target, mode),
                            rel_tol=1e-6)
        for x, y in zip(a, (h.grad for h in b_params)):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=0)


class _Holder:
    def __init__(self, grad):
        self.grad = grad


def test_a_non_finite_loss_raises_and_a_wrong_batch_shape_is_refused():
    model = tiny_model()
    tc = graph_tc()
    step = StaticStep(model, make_optimizer(model, tc), tc, (2, 16))
    with pytest.raises(ValueError, match="batches of shape"):
        step(batch(0, (3, 16)), 1e-3, 1.0)
    with torch.no_grad():
        model.W_U.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError):
        step(batch(0), 1e-3, 1.0)


def test_it_needs_a_capturable_optimizer_and_capture_needs_cuda():
    model = tiny_model()
    with pytest.raises(ValueError, match="capturable"):
        StaticStep(model, make_optimizer(model, graph_tc(cuda_graph=False)), graph_tc(), (2, 16))
    with pytest.raises(ValueError, match="CUDA"):
        StaticStep(model, make_optimizer(model, graph_tc()), graph_tc(), (2, 16), capture=True)
    with pytest.raises(ValueError, match="cuda_graph"):
        TrainConfig(cuda_graph="yes")


def test_a_data_parallel_run_refuses_the_graph_step_before_writing_anything(tmp_path):
    from sparse_lens import distributed

    cfg = SparseHookedTransformerConfig.preset("tiny", n_ctx=32)
    with pytest.raises(ValueError, match="one process"):
        train(cfg, graph_tc(), tmp_path / "ddp", progress=False,
              ranks=distributed.RankContext(rank=0, world_size=2))
    assert not (tmp_path / "ddp").exists()


def test_train_with_cuda_graph_trains_sparse_and_resumes_bitwise_on_cpu(tmp_path, tokenizer, monkeypatch):
    from sparse_lens import checkpoint, data

    corpus = data.load_corpus(None, tokenizer, max_files=20, cache_dir=tmp_path / "cache")
    cfg = SparseHookedTransformerConfig.preset("tiny", n_ctx=32, weight_l0=1 / 8)
    tc = TrainConfig(steps=12, batch_size=2, seq_len=16, eval_every=6, eval_batches=1,
                     checkpoint_every=6, lr=3e-3, cuda_graph=True)
    whole = train(cfg, tc, tmp_path / "whole", corpus=corpus, progress=False)
    assert math.isfinite(whole.val_loss)
    table = whole.model.weight_sparsity()
    assert (table.nonzeros == (table.numel / 8).astype(int).combine(table.floor_nonzeros, max)).all()

    with killed_at_step(monkeypatch, 8), pytest.raises(KeyboardInterrupt):
        train(cfg, tc, tmp_path / "cut", corpus=corpus, progress=False)
    assert checkpoint.read_json(tmp_path / "cut" / "training" / "state.json")["step"] == 6
    resumed = train(cfg, tc, tmp_path / "cut", resume=True, corpus=corpus, progress=False)
    for (name, a), (_, b) in zip(whole.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name
