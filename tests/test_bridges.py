"""Bridges: exact identity hybrids, clear mismatch errors, losses that fall, save/load, hooks that
always come off, and an edit carried across in the direction it was planted.

Shapes are checked at run time: `sparse_lens.bridges` is imported under jaxtyping's import hook
(beartype) when this module is the first to import it.
"""

import copy
import json

import pytest
import torch
from jaxtyping import install_import_hook

with install_import_hook("sparse_lens.bridges", "beartype.beartype"):
    from sparse_lens import bridges as B
    from sparse_lens.bridges import edit, hybrid, losses, modules, training  # noqa: F401

from sparse_lens import checkpoint, cli, data
from sparse_lens.config import SparseHookedTransformerConfig
from sparse_lens.fingerprint import model_fingerprint
from sparse_lens.hooks import NodeRegistry
from sparse_lens.model import SparseHookedTransformer
from sparse_lens.tasks import TaskData
from sparse_lens.training import TrainConfig, train

MICRO = dict(n_layers=2, d_model=32, d_head=8, d_mlp=64, n_ctx=64, weight_l0=1 / 4,
             use_attention_sinks=True, model_name="micro")


def micro(tokenizer=None, seed=0, **overrides) -> SparseHookedTransformer:
    torch.manual_seed(seed)
    return SparseHookedTransformer(SparseHookedTransformerConfig(**{**MICRO, **overrides}),
                                   tokenizer=tokenizer)


def hook_count(model) -> int:
    return sum(len(point.fwd_hooks) + len(point.bwd_hooks) for point in model.hook_dict.values())


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(1, 2048, (3, 16), generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------ sites
def test_there_are_2L_plus_1_sites_named_by_their_hooks():
    sites = B.bridge_sites(2)
    assert [s.hook_name for s in sites] == [
        "blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid", "blocks.0.hook_resid_post",
        "blocks.1.hook_resid_mid", "blocks.1.hook_resid_post"]
    assert [s.label for s in sites] == ["embed", "L0.attn", "L0.mlp", "L1.attn", "L1.mlp"]
    assert [s.start_layer for s in sites] == [0, 0, 1, 1, 2]
    bridges = B.Bridges(2, 32, 48, 2048)
    assert bridges.site("L1.attn") is bridges.site(3) is bridges.site("blocks.1.hook_resid_mid")
    assert bridges.encode(0, torch.randn(2, 5, 32)).shape == (2, 5, 48)
    assert bridges.decode("L0.mlp", torch.randn(2, 5, 48)).shape == (2, 5, 32)
    # AbsTopK after the encoder: floor(0.25 * 48) = 12 nonzeros per token
    assert (bridges.encode(1, torch.randn(4, 32)) != 0).sum(-1).tolist() == [12] * 4
    with pytest.raises(KeyError, match="no bridge site"):
        bridges.site(5)


# ------------------------------------------------------------------- exact identities
@pytest.mark.parametrize("overrides", [
    {},
    dict(use_bigram_table=True),  # the bigram logits need the tokens when starting mid-model
    dict(d_pos_emb=8),  # positions concatenated to every block's reads
    dict(act_topk_locations=("attn_in", "resid_post_attn", "mlp_neuron", "resid_post_mlp")),
], ids=["default", "bigram", "d_pos_emb", "residual_topk"])
def test_identical_models_and_identity_bridges_reproduce_the_logits_exactly(overrides, tokens):
    sparse = micro(**overrides)
    with torch.no_grad():
        for p in sparse.parameters():  # non-trivial bigram table, sinks, biases
            if p.ndim < 2 or p.shape == (2048, 2048):
                p.normal_(0, 0.1)
    dense = copy.deepcopy(sparse)
    bridges = B.Bridges.identity(2, 32, 2048)
    reference = sparse(tokens)
    for site in bridges.sites:
        for run in (B.dense_to_sparse, B.sparse_to_dense):
            out = run(dense, sparse, bridges, tokens, site)
            assert torch.equal(out.logits, reference), (site.hook_name, run.__name__)
            assert out.kl_to_dense == out.kl_to_sparse == 0.0
    table = B.hybrid_kl_table(dense, sparse, bridges, [tokens])
    assert len(table) == 5 and table.attrs["kl_dense_sparse"] == 0.0
    assert (table.drop(columns=["site", "hook_name", "label"]).to_numpy() == 0).all()


def test_a_plain_transformer_lens_model_can_be_the_dense_side(tokens):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=2, d_model=32, d_head=8, d_mlp=64, n_ctx=32, d_vocab=2048,
                                  act_fn="gelu", normalization_type="LN")
    torch.manual_seed(0)
    with pytest.warns(DeprecationWarning):  # TransformerLens 3.9 on its own HookedTransformer
        dense = HookedTransformer(cfg)
    twin = copy.deepcopy(dense)
    bridges = B.Bridges.identity(2, 32, 2048)
    out = B.sparse_to_dense(dense, twin, bridges, tokens, "blocks.1.hook_resid_mid")
    assert torch.equal(out.logits, dense(tokens))
    # and with a weight-sparse model on the other side
    sparse = micro()
    fresh = B.Bridges.for_pair(dense, sparse, seed=0)
    assert B.dense_to_sparse(dense, sparse, fresh, tokens, 2).logits.shape == (3, 16, 2048)


# ---------------------------------------------------------------------- mismatches
def test_a_mismatched_pair_gives_a_clear_error(tokenizer, tokens):
    sparse = micro()
    with pytest.raises(B.BridgeMismatchError, match="2 layers and the sparse one 3"):
        B.Bridges.for_pair(micro(), micro(n_layers=3))
    with pytest.raises(B.BridgeMismatchError, match="vocabularies differ.*d_vocab: dense 2048, sparse 1000"):
        B.Bridges.for_pair(micro(), micro(d_vocab=1000))
    # widths may differ (the bridges map between them) but must be the bridges' own
    wide = micro(d_model=48, d_head=8)
    bridges = B.Bridges.for_pair(wide, sparse)
    assert (bridges.d_dense, bridges.d_sparse) == (48, 32)
    with pytest.raises(B.BridgeMismatchError, match="sparse model has d_model=48"):
        bridges.check_pair(wide, micro(d_model=48, d_head=8))
    with pytest.raises(B.BridgeMismatchError, match="d_model=32; these bridges map a dense residual"):
        B.dense_to_sparse(sparse, sparse, bridges, tokens, 0)
    with pytest.raises(B.BridgeMismatchError, match="width 32; these bridges expect 48"):
        bridges.encode(0, torch.randn(2, 3, 32))
    # a tokenizer with other token ids
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["<an extra token>"])
    with pytest.raises(B.BridgeMismatchError, match="tokenizers have different vocabularies"):
        B.check_models(micro(tokenizer), micro(other))


# ------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def corpus(tokenizer, tmp_path_factory):
    return data.load_corpus(None, tokenizer, max_files=60, cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def dense_model(corpus, tmp_path_factory):
    """A dense micro model trained briefly, so that its outputs are worth matching."""
    cfg = SparseHookedTransformerConfig(**{**MICRO, "weight_l0": 1.0, "model_name": "micro-dense"})
    tc = TrainConfig(steps=60, batch_size=8, seq_len=32, lr=1e-2, eval_every=60, eval_batches=1,
                     checkpoint_every=60)
    path = tmp_path_factory.mktemp("dense") / "dense"
    model = train(cfg, tc, path, corpus=corpus, progress=False).model
    model.eval()
    return model, path


@pytest.fixture(scope="module")
def bridged(dense_model, corpus, tmp_path_factory):
    dense, dense_dir = dense_model
    config = B.BridgeTrainConfig(train=TrainConfig(steps=60, batch_size=8, seq_len=32, lr=1e-2,
                                                   eval_every=30, eval_batches=1, checkpoint_every=60))
    out = tmp_path_factory.mktemp("bridged") / "bridged"
    result = B.train_bridged(dense, SparseHookedTransformerConfig(**MICRO), config, out, corpus=corpus,
                             progress=False, dense_ref=str(dense_dir))
    return result


@pytest.mark.slow
def test_bridge_losses_fall_during_training(bridged, dense_model):
    history = bridged.history
    assert len(history) == 60 and bridged.sparse.cfg.weight_l0 == 1 / 4

    def mean(key, rows):
        return sum(r[key] for r in rows) / len(rows)

    first, last = history[:8], history[-8:]
    for key in ("ce", "enc_nmse", "dec_nmse", "hybrid_d2s", "hybrid_s2d", "loss"):
        assert mean(key, last) < 0.8 * mean(key, first), (key, mean(key, first), mean(key, last))
    assert history[-1]["val_hybrid_s2d"] < history[29]["val_hybrid_s2d"]
    # the sparse model is weight-sparse and the dense one untouched and frozen only during the run
    assert bridged.sparse.weight_sparsity().achieved_l0.max() < 0.3
    dense, _ = dense_model
    assert all(p.requires_grad for p in dense.parameters())
    assert bridged.bridges.dense_fingerprint == model_fingerprint(dense)


def test_sampled_hybrid_sites_are_a_pure_function_of_the_step():
    config = B.BridgeTrainConfig(hybrid_sites=2)
    picks = [training._hybrid_sites(config, 5, step) for step in range(20)]
    assert picks == [training._hybrid_sites(config, 5, step) for step in range(20)]
    assert all(len(p) == 2 and p == sorted(p) for p in picks) and len({tuple(p) for p in picks}) > 3
    assert training._hybrid_sites(B.BridgeTrainConfig(), 5, 0) is None
    with pytest.raises(ValueError, match="unknown terms"):
        B.BridgeTrainConfig(loss_weights={"mse": 1.0})


def test_nmse_is_one_for_the_mean_and_zero_for_the_target():
    target = torch.randn(4, 6, 8)
    assert B.nmse(target, target).item() == 0.0
    mean = target.flatten(0, 1).mean(0).expand_as(target)
    assert B.nmse(mean, target).item() == pytest.approx(1.0, rel=1e-5)


# ------------------------------------------------------------------------ save / load
@pytest.mark.slow
def test_save_and_load_round_trip_with_the_sparse_model(bridged, dense_model, tokens, tmp_path):
    dense, _ = dense_model
    sparse, bridges = B.load_bridged(bridged.out_dir)
    for (name, a), (_, b) in zip(bridged.bridges.state_dict().items(), bridges.state_dict().items()):
        assert torch.equal(a, b), name
    for (name, a), (_, b) in zip(bridged.sparse.named_parameters(), sparse.named_parameters()):
        assert torch.equal(a, b), name
    bridges.check_pair(dense, sparse)
    assert bridges.meta["dense_model"] and B.training_state(bridged.out_dir)["step"] == 60
    x = tokens[:, :12]
    assert torch.equal(B.dense_to_sparse(dense, sparse, bridges, x, 3).logits,
                       B.dense_to_sparse(dense, bridged.sparse, bridged.bridges, x, 3).logits)
    # the bridges belong to these dense weights
    with pytest.raises(B.BridgeMismatchError, match="trained against other dense weights"):
        bridges.check_pair(micro(weight_l0=1.0), sparse)

    # corrupt or missing files: clear errors, nothing unpickled
    copy_dir = tmp_path / "copy"
    B.save_bridged(sparse, bridges, copy_dir)
    (copy_dir / "bridges" / "bridges.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(checkpoint.CheckpointError, match="corrupt weights file"):
        B.load_bridged(copy_dir)
    B.save_bridged(sparse, bridges, copy_dir)
    (copy_dir / "bridges" / "bridges.json").write_text("{not json")
    with pytest.raises(checkpoint.CheckpointError, match="corrupt JSON"):
        B.load_bridged(copy_dir)
    B.save_bridged(sparse, bridges, copy_dir)
    doc = json.loads((copy_dir / "bridges" / "bridges.json").read_text())
    doc["config"]["d_sparse"] = 16
    (copy_dir / "bridges" / "bridges.json").write_text(json.dumps(doc))
    with pytest.raises(checkpoint.CheckpointError, match="does not match the model|has shape"):
        B.load_bridged(copy_dir)
    sparse.save_pretrained(tmp_path / "plain")
    with pytest.raises(checkpoint.CheckpointError, match="not a bridged model"):
        B.load_bridged(tmp_path / "plain")


# ----------------------------------------------------------------------------- hooks
def test_hooks_are_removed_even_when_a_pass_raises(tokens):
    sparse, dense = micro(), micro(seed=1)
    bridges = B.Bridges.for_pair(dense, sparse, seed=0)
    kept = []
    sparse.blocks[0].hook_attn_out.add_hook(lambda act, hook: kept.append(1))  # the user's own
    before = hook_count(sparse), hook_count(dense)

    def boom(act, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        B.run_from_site(sparse, bridges.site(3), torch.randn(3, 16, 32), tokens,
                        fwd_hooks=[("blocks.1.hook_mlp_out", boom)])
    with pytest.raises(RuntimeError, match="boom"):
        B.carry_edit(dense, sparse, bridges, tokens, [("blocks.1.mlp.hook_post", boom)])
    with pytest.raises(RuntimeError, match="boom"):
        with dense.hooks(fwd_hooks=[("blocks.1.hook_resid_post", boom)]):
            B.sparse_to_dense(dense, sparse, bridges, tokens, 1)
    assert (hook_count(sparse), hook_count(dense)) == before
    sparse(tokens)
    assert kept  # the user's hook is still there and still fires


# ------------------------------------------------------------------------------ edits
A_TOK, B_TOK, CHANNEL = 5, 6, 3


def hand_built_pair():
    """Identical micro models without AbsTopK whose residual channel 3 votes for token A over
    token B in the unembedding (and nothing else reads it), and identity bridges."""
    sparse = micro(act_topk_locations=())
    with torch.no_grad():
        sparse.unembed.W_U[CHANNEL] = 0.0
        sparse.unembed.W_U[CHANNEL, A_TOK], sparse.unembed.W_U[CHANNEL, B_TOK] = 3.0, -3.0
    return copy.deepcopy(sparse), sparse, B.Bridges.identity(2, 32, 2048)


def hand_task(n=8) -> TaskData:
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(10, 2048, (n, 10), generator=gen)
    labels = torch.arange(n) % 2
    correct = torch.where(labels == 0, A_TOK, B_TOK)
    contrast = torch.where(labels == 0, B_TOK, A_TOK)
    return TaskData(name="a_or_b", description="", prompts=[str(i) for i in range(n)], tokens=tokens,
                    last_pos=torch.full((n,), 9), correct=correct, contrast=contrast,
                    correct_str=[str(int(c)) for c in correct], contrast_str=[str(int(c)) for c in contrast],
                    labels=labels)


def test_an_edit_carried_across_moves_the_dense_model_the_planted_way():
    dense, sparse, bridges = hand_built_pair()
    registry = NodeRegistry.for_model(sparse)
    task = hand_task()
    edit = B.node_shift(registry, f"L1.mlp_write[{CHANNEL}]", 2.0, batch=len(task))
    assert (edit.hook_name, edit.index) == ("blocks.1.hook_mlp_out", (CHANNEL,))
    carried = B.carry_edit(dense, sparse, bridges, task.tokens, [edit.hook(task.last_pos)])
    assert carried.site.hook_name == "blocks.1.hook_resid_post"
    # the change is one channel at the last position, carried unchanged by identity bridges
    nonzero = carried.delta_dense.nonzero().tolist()
    assert nonzero == [[b, 9, CHANNEL] for b in range(len(task))]
    torch.testing.assert_close(carried.dense_edited, carried.sparse_edited, atol=1e-5, rtol=1e-5)

    table, summary = B.task_edit_effect(dense, sparse, bridges, task, edit)
    assert (table.dense_d_logodds > 0.1).all()  # towards A on every prompt
    assert (table.dense_p_a_edit > table.dense_p_a).all() and (table.dense_p_b_edit < table.dense_p_b).all()
    assert summary.set_index("prompts").loc["all", "dense_d_logodds"] > 3 * abs(
        summary.set_index("prompts").loc["all", "control_d_logodds"])
    # the decoder decides what reaches the dense model: a zero decoder carries nothing
    with torch.no_grad():
        bridges.decoders[carried.site.index].W_dec.zero_()
    silent = B.carry_edit(dense, sparse, bridges, task.tokens, [edit.hook(task.last_pos)])
    assert torch.equal(silent.dense_edited, silent.dense_clean)


def test_class_separation_finds_the_planted_quote_channel_and_the_flip_reverses_it():
    dense, sparse, bridges = hand_built_pair()
    with torch.no_grad():  # token 10 writes +1 on channel 3 through the embedding, token 11 -1
        for model in (dense, sparse):
            model.embed.W_E[:, CHANNEL] = 0.0
            model.embed.W_E[10, CHANNEL], model.embed.W_E[11, CHANNEL] = 1.0, -1.0
    task = hand_task()
    task.tokens[:, 9] = torch.where(task.labels == 0, 10, 11)
    table = B.class_separation(sparse, task)
    # what separates the classes best is read off channel 3 (its read channels, after the norm)
    assert table.iloc[0].channel == CHANNEL and table.iloc[0].kind in ("attn_read", "mlp_read")
    row = table[table.label == f"L1.mlp_write[{CHANNEL}]"].iloc[0]
    shift = B.class_flip_shift(row, task.labels)
    assert (shift[task.labels == 0] == -shift[task.labels == 1]).all()
    with pytest.raises(ValueError, match="both labels"):
        B.class_separation(sparse, task[[0, 2]])


def test_the_node_chosen_by_its_effect_is_the_one_the_sparse_model_reads():
    _, sparse, _ = hand_built_pair()
    task = hand_task()
    table = B.class_separation(sparse, task).set_index("label")
    # planted class means: class 0 (answer A) high on the channel that votes for A, so the flip
    # (towards the other class) moves the model towards the other answer; the reversed node moves
    # it towards the own answer; a node with equal class means is not moved at all
    rows = table.loc[[f"L1.mlp_write[{CHANNEL}]", f"L0.attn_write[{CHANNEL}]", "L0.neuron[0]"]].copy()
    rows[["mean_0", "mean_1"]] = [[1.0, -1.0], [-1.0, 1.0], [0.5, 0.5]]
    ranked = B.rank_by_sparse_effect(sparse, task, rows.reset_index())
    assert list(ranked.label) == [f"L1.mlp_write[{CHANNEL}]", "L0.neuron[0]", f"L0.attn_write[{CHANNEL}]"]
    assert ranked.sparse_effect.iloc[0] > 0.1 > -0.1 > ranked.sparse_effect.iloc[2]
    assert ranked.sparse_effect.iloc[1] == 0.0


def test_the_edit_node_is_chosen_in_the_edit_module():
    from sparse_lens.bridges.edit import choose_edit_node

    _, sparse, _ = hand_built_pair()
    task = hand_task()
    task.tokens[:, 9] = torch.where(task.labels == 0, 10, 11)
    table = B.class_separation(sparse, task)
    registry = NodeRegistry.for_model(sparse)
    label = f"L1.mlp_write[{CHANNEL}]"
    for node in (label, registry.id_of_label(label), str(registry.id_of_label(label))):
        row, notes = choose_edit_node(sparse, task.name, task, table, node=node)
        assert row.label == label and notes == []
    row, notes = choose_edit_node(sparse, task.name, task, table, target_loss=None, n_candidates=4)
    assert row.id in set(table.head(4).id) and "best-separating" in notes[-1]


def test_site_after_and_node_labels():
    bridges = B.Bridges(2, 32, 32, 2048)
    cases = {"hook_embed": 0, "blocks.0.attn.hook_v": 1, "blocks.1.hook_attn_read": 3,
             "blocks.1.mlp.hook_post": 4, "blocks.0.hook_mlp_out": 2, "blocks.1.hook_resid_pre": 2,
             "blocks.0.hook_resid_mid": 2, "blocks.0.ln2.hook_scale": 2, "blocks.1.attn.hook_pattern": 3}
    assert {k: B.site_after(bridges, k).index for k in cases} == cases
    with pytest.raises(ValueError, match="pass site="):
        B.site_after(bridges, "unembed.hook_out")
    registry = NodeRegistry.for_model(micro())
    assert B.node_id(registry, "L0.q[h2.3]") == registry.ids_of("q", 0, (2, 3))
    with pytest.raises(ValueError, match="cannot read node label"):
        B.node_id(registry, "layer0 neuron 3")


# -------------------------------------------------------------------------------- CLI
@pytest.mark.slow
def test_cli_train_eval_edit(dense_model, tmp_path, capsys):
    _, dense_dir = dense_model
    out, results = tmp_path / "bridged", tmp_path / "results"
    assert cli.main(["bridges", "train", "--dense", str(dense_dir), "--out", str(out), "--steps", "4",
                     "--batch-size", "2", "--seq-len", "16", "--hybrid-sites", "2", "--max-files", "60",
                     "--eval-every", "4", "--no-progress"]) == 0
    assert "hybrid KL d->s" in capsys.readouterr().out
    assert cli.main(["bridges", "eval", "--dense", str(dense_dir), "--model", str(out), "--batches", "1",
                     "--batch-size", "2", "--max-files", "60", "--out", str(results)]) == 0
    text = (results / "hybrid_kl.md").read_text()
    assert "| 4 | L1.mlp |" in text and "KL(dense || sparse)" in text
    assert cli.main(["bridges", "edit", "--dense", str(dense_dir), "--model", str(out), "--n", "8",
                     "--target-loss", "none", "--out", str(results)]) == 0
    assert (results / "edit_summary.csv").is_file() and "d_logodds" in (results / "edit.md").read_text()
    # a dense model of another depth: a clear error, exit code 2
    other = tmp_path / "other"
    micro(n_layers=3, weight_l0=1.0).save_pretrained(other)
    assert cli.main(["bridges", "eval", "--dense", str(other), "--model", str(out)]) == 2
    assert "3 layers and the sparse one 2" in capsys.readouterr().err
