"""Importing OpenAI's circuit_sparsity release checkpoints (`SparseHookedTransformer.from_circuit_sparsity`).

The shipped fixture's reference logits come from the release's own model code. For every other
option of the release's `GPTConfig`, checkpoints are written here in the release's state-dict
layout and checked against `release_reference.release_logits`, an independent forward pass that
shares no code with the importer (and is itself checked against the shipped fixture).
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from release_reference import RELEASE_BASE, release_logits, release_state_dict, write_release_folder
from safetensors.torch import load_file

from sparse_lens import SparseHookedTransformer
from sparse_lens.hooks import NodeRegistry, compute_node_means
from sparse_lens.openai_release import ReleaseFormatError, release_tokenizer
from sparse_lens.pruning import prune

#: ../shared/fixtures/openai_circuit_sparsity/tiny_sink_afrac, copied into the repository so that
#: a clone tests against it wherever it lies (README.md beside it says what it is)
FIXTURE = Path(__file__).parent / "fixtures" / "openai_circuit_sparsity" / "tiny_sink_afrac"
ALL_LOCATIONS = ("attn_in,attn_out,attn_q,attn_k,attn_v,mlp_in,mlp_neuron,mlp_out,"
                 "resid_post_attn,resid_post_mlp")

#: One checkpoint per group of options; together they cover every option of the release config.
VARIANTS = {
    "layernorm_bias_relu_tied": dict(rms_norm=False, ln_bias=True, activation_type="relu",
                                     tied_unembed=True),
    "layernorm_no_biases_no_logit_bias": dict(rms_norm=False, ln_bias=False, bias=False),
    "residual_relu_topk_on_residual": dict(residual_activation_type="relu", afrac=0.5,
                                           afrac_loctypes="resid_post_attn,resid_post_mlp"),
    "cat_pos_emb_rms_topk_reads": dict(d_pos_emb=8, sinusoidal_cat_pos_emb=True, afrac=0.25,
                                       afrac_loctypes="attn_in,mlp_in,attn_out,mlp_out"),
    "cat_pos_emb_layernorm_relu_resid": dict(d_pos_emb=6, rms_norm=False, ln_bias=True,
                                             residual_activation_type="relu", tied_unembed=True),
    "bigram_sink_dhead_dmlp": dict(enable_bigram_table=True, learnable_bigram_table=True,
                                   sink=True, d_head=8, d_mlp=40),
    "every_topk_location_n_mlp": dict(afrac=0.5, afrac_loctypes=ALL_LOCATIONS, sink=True,
                                      n_mlp=32, bigram_table_rank=None, flash=False,
                                      grad_checkpointing=False, dropout=0.1),
}


def tokens_for(cfg, seed=0, batch=3):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg["vocab_size"], (batch, cfg["block_size"]), generator=gen)


def release_folder(tmp_path, name, overrides, **sd_kwargs):
    cfg = {**RELEASE_BASE, **overrides}
    sd = release_state_dict(cfg, seed=len(name), **sd_kwargs)
    return write_release_folder(tmp_path / name, cfg, sd), cfg, sd


def load(folder, **kwargs):
    with pytest.warns(UserWarning, match="token ids only") if "tokenizer" not in kwargs else _nothing():
        return SparseHookedTransformer.from_circuit_sparsity(folder, **kwargs)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# --------------------------------------------------------------------------- equal outputs
def test_the_release_fixture_reproduces_the_release_code_logits():
    ref = load_file(str(FIXTURE / "reference.safetensors"))
    model = load(FIXTURE)
    with torch.no_grad():
        logits = model(ref["tokens"])
    assert logits.dtype == torch.float32
    assert (logits - ref["logits"]).abs().max().item() < 1e-4
    # ... and the independent reference agrees with the release's code, so it can judge the rest
    sd = torch.load(FIXTURE / "final_model.pt", weights_only=True)
    cfg = json.loads((FIXTURE / "beeg_config.json").read_text())
    assert (release_logits(sd, cfg, ref["tokens"]) - ref["logits"]).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_release_option_gives_the_reference_logits(tmp_path, name):
    folder, cfg, sd = release_folder(tmp_path, name, VARIANTS[name],
                                     final_logits_bias="no_logit_bias" not in name,
                                     causal_mask_buffer=not cfg_flash(VARIANTS[name]))
    model = load(folder)
    tokens = tokens_for(cfg)
    expected = release_logits(sd, cfg, tokens)
    with torch.no_grad():
        got = model(tokens)
    assert (got - expected).abs().max().item() < 1e-4
    # not vacuous: the option changes the output
    assert expected.std() > 0.1


def cfg_flash(overrides):
    return overrides.get("flash", True)


def test_the_variants_cover_every_release_option():
    from sparse_lens.config import TOPK_LOCATIONS

    seen = {k: {json.dumps(v.get(k)) for v in VARIANTS.values()} for k in
            ("rms_norm", "ln_bias", "bias", "activation_type", "residual_activation_type",
             "tied_unembed", "enable_bigram_table", "sink", "d_pos_emb", "d_head", "d_mlp")}
    for flag in ("rms_norm", "ln_bias", "bias", "tied_unembed"):
        assert {"false", "null"} & seen[flag] and ({"true", "null"} & seen[flag]), flag
    assert '"relu"' in seen["activation_type"] and '"relu"' in seen["residual_activation_type"]
    assert {"true"} <= seen["enable_bigram_table"] and {"true"} <= seen["sink"]
    assert len(seen["d_pos_emb"]) > 1 and len(seen["d_head"]) > 1 and len(seen["d_mlp"]) > 1
    used = {loc for v in VARIANTS.values() for loc in v.get("afrac_loctypes", "").split(",") if loc}
    assert used == set(TOPK_LOCATIONS)


# ------------------------------------------------------------------- TransformerLens features
def test_hooks_and_run_with_cache_work_on_an_imported_model(tmp_path):
    folder, cfg, sd = release_folder(tmp_path, "cat", VARIANTS["cat_pos_emb_rms_topk_reads"])
    model = load(folder)
    tokens = tokens_for(cfg, batch=2)
    logits, cache = model.run_with_cache(tokens)
    d_read = cfg["d_model"] + cfg["d_pos_emb"]
    assert cache["hook_pos_embed"].shape == (2, cfg["block_size"], cfg["d_pos_emb"])
    assert cache["blocks.0.hook_attn_read"].shape == (2, cfg["block_size"], d_read)
    assert cache["blocks.1.attn.hook_pattern"].shape[1] == cfg["n_head"]
    # AbsTopK at attn_in keeps int(0.25 * d_read) channels per token, visible to the hook
    assert (cache["blocks.0.hook_attn_read"] != 0).sum(-1).max().item() == int(0.25 * d_read)
    # a hook changes the output; start_at_layer continues from a cached residual
    zero = lambda act, hook: torch.zeros_like(act)  # noqa: E731
    ablated = model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_mlp_out", zero)])
    assert not torch.allclose(ablated, logits)
    resumed = model(cache["blocks.1.hook_resid_pre"], start_at_layer=1,
                    shortformer_pos_embed=cache["hook_pos_embed"])
    assert torch.allclose(resumed, logits, atol=1e-5)
    with pytest.raises(ValueError, match="shortformer_pos_embed"):
        model(cache["blocks.1.hook_resid_pre"], start_at_layer=1)


@pytest.mark.parametrize("name", ["cat_pos_emb_rms_topk_reads", "bigram_sink_dhead_dmlp"])
def test_generate_continues_like_the_release_model_with_and_without_the_kv_cache(tmp_path, name):
    folder, cfg, sd = release_folder(tmp_path, name, VARIANTS[name])
    model = load(folder)  # no tokenizer: TransformerLens gets no attention mask
    prompt = tokens_for(cfg, batch=2)[:, :4]
    expected = prompt
    for _ in range(8):
        nxt = release_logits(sd, cfg, expected)[:, -1].argmax(-1, keepdim=True)
        expected = torch.cat([expected, nxt], dim=1)
    for cache in (True, False):
        out = model.generate(prompt, max_new_tokens=8, do_sample=False, use_past_kv_cache=cache,
                             stop_at_eos=False, verbose=False)
        assert torch.equal(out, expected), cache


X, Y, A, B = 1, 2, 3, 4
READ, NEURON, WRITE = 3, 5, 7


def planted_release_checkpoint(tmp_path):
    """The release layout of a model with one known circuit (see tests/test_circuit.py): the
    last token X or Y -> answer A or B through residual channel 3, MLP neuron 5, channel 7.
    Positions are concatenated (d_pos_emb 4), so the MLP reads d_model + 4 channels."""
    cfg = dict(RELEASE_BASE, vocab_size=8, n_layer=1, n_head=2, d_model=16, d_mlp=16,
               d_pos_emb=4, bias=True)
    gen = torch.Generator().manual_seed(0)
    sd = {k: v * 0.02 if v.dim() >= 2 else v
          for k, v in release_state_dict(cfg, seed=0).items()}
    sd = {k: (torch.ones_like(v) if k.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight"))
              else v) for k, v in sd.items()}
    wte, c_fc, c_proj = (sd["transformer.wte.weight"], sd["transformer.h.0.mlp.c_fc.weight"],
                         sd["transformer.h.0.mlp.c_proj.weight"])
    wte[:, READ] = 0.0
    wte[X, READ], wte[Y, READ] = 4.0, -4.0  # 4 before the RMSNorm over 16 channels ~ 1 after
    c_fc[:, READ] = 0.0
    c_fc[NEURON, :] = 0.0
    c_fc[NEURON, READ] = 1.0
    sd["transformer.h.0.mlp.c_fc.bias"][NEURON] = 0.0
    c_proj[:, NEURON] = 0.0
    c_proj[WRITE, :] = 0.0
    c_proj[WRITE, NEURON] = 1.0
    sd["transformer.h.0.mlp.c_proj.bias"][WRITE] = -2.0
    sd["transformer.h.0.attn.c_proj.weight"][WRITE, :] = 0.0
    sd["transformer.h.0.attn.c_proj.bias"][WRITE] = 0.0
    lm = sd["lm_head.weight"]
    lm[:, WRITE] = 0.0
    lm[A, WRITE], lm[B, WRITE] = 1.0, -1.0
    del gen
    return write_release_folder(tmp_path / "planted", cfg, sd)


@pytest.mark.slow
def test_the_circuit_engine_recovers_a_circuit_planted_in_a_release_checkpoint(tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from test_circuit import hand_task

    model = load(planted_release_checkpoint(tmp_path))
    data = hand_task()
    full = model(data.tokens)[torch.arange(len(data)), 5]
    assert ((full[:, A] > full[:, B]) == (data.correct == A)).all()
    reg = NodeRegistry.for_model(model)
    assert reg.site("blocks.0.hook_mlp_read").shape == (16 + 4,)
    stream = torch.randint(1, 8, (4096,), generator=torch.Generator().manual_seed(1))
    means = compute_node_means(model, reg, stream, n_tokens=2048, batch_size=8, seq_len=16)
    circuit = prune(model, data, means=means, steps=150, batch_size=32, lr=0.02, progress=False)
    planted = sorted([reg.ids_of("mlp_read", 0, READ), reg.ids_of("neuron", 0, NEURON),
                      reg.ids_of("mlp_write", 0, WRITE)])
    assert circuit.node_ids == planted
    assert circuit.solved
    edges = circuit.edges
    assert set(edges.kind) >= {"weight", "embed", "unembed"}
    # the views render on it too (no tokenizer: tokens are shown by id)
    from sparse_lens.viz import attention_view, circuit_graph, neuron_view, tables_view

    assert f"L0.neuron[{NEURON}]" in circuit_graph(circuit).html()
    assert f"L0.neuron[{NEURON}]" in neuron_view(circuit, corpus_tokens=stream, n_prompts=2).html()
    assert f"L0.mlp_read[{READ}]" in tables_view(circuit, n_random=1).html()
    assert attention_view(circuit, n_prompts=2).html()


# ------------------------------------------------------------------------- save and reload
def test_an_imported_model_saves_and_reloads_unchanged(tmp_path):
    folder, cfg, _ = release_folder(tmp_path, "rt", {**VARIANTS["bigram_sink_dhead_dmlp"], "d_pos_emb": 5,
                                                     "residual_activation_type": "relu"})
    model = load(folder)
    model.save_pretrained(tmp_path / "saved")
    again = SparseHookedTransformer.from_pretrained(tmp_path / "saved")
    assert again.cfg.to_json_dict() == model.cfg.to_json_dict()
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), again.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)
    tokens = tokens_for(cfg)
    with torch.no_grad():
        assert torch.equal(model(tokens), again(tokens))


# ------------------------------------------------------------------------------- tokenizer
@pytest.fixture(scope="module")
def gpt2_style_bpe(tmp_path_factory):
    """A GPT-2-style BPE folder (encoder.json + vocab.bpe), trained here on stdlib source."""
    import os

    from tokenizers import ByteLevelBPETokenizer

    texts = [Path(os.__file__).read_text(), Path(json.__file__).read_text()]
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(texts, vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False)
    out = tmp_path_factory.mktemp("bpe")
    vocab_file, merges_file = tok.save_model(str(out))
    shutil.move(vocab_file, out / "encoder.json")
    shutil.move(merges_file, out / "vocab.bpe")
    return out, tok


def test_the_bpe_folder_gives_a_working_tokenizer(tmp_path, gpt2_style_bpe):
    folder, reference = gpt2_style_bpe
    text = "def f(x):\n    return {'a': x}  # done\n"
    tok = release_tokenizer(folder)
    assert tok.encode(text) == reference.encode(text).ids
    assert tok.decode(tok.encode(text)) == text
    assert tok.eos_token == "<|endoftext|>" and tok.bos_token is None
    release, cfg, _ = release_folder(tmp_path, "tok", dict(vocab_size=len(tok), block_size=64))
    model = SparseHookedTransformer.from_circuit_sparsity(release, tokenizer=folder)
    assert model.to_tokens(text)[0].tolist() == reference.encode(text).ids
    assert model.to_string(model.to_tokens(text)[0]) == text
    assert model(text).shape == (1, len(reference.encode(text).ids), cfg["vocab_size"])


# ------------------------------------------------------------------------------------ errors
def test_a_corrupt_weights_file_is_a_clear_error(tmp_path):
    folder, _, _ = release_folder(tmp_path, "bad", {})
    (folder / "final_model.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ReleaseFormatError, match="corrupt or unsafe weights file"):
        SparseHookedTransformer.from_circuit_sparsity(folder)


class NotATensor:
    pass


def test_pickled_objects_are_not_unpickled(tmp_path):
    folder, _, sd = release_folder(tmp_path, "evil", {})
    torch.save({**sd, "payload": NotATensor()}, folder / "final_model.pt")
    with pytest.raises(ReleaseFormatError, match="weights_only=True"):
        SparseHookedTransformer.from_circuit_sparsity(folder)


def test_a_missing_key_is_named(tmp_path):
    folder, cfg, sd = release_folder(tmp_path, "missing", {})
    del sd["transformer.h.1.mlp.c_fc.weight"]
    write_release_folder(folder, cfg, sd)
    with pytest.raises(ReleaseFormatError, match=r"transformer\.h\.1\.mlp\.c_fc\.weight"):
        SparseHookedTransformer.from_circuit_sparsity(folder)


def test_a_wrong_shape_and_an_unexpected_key_are_named(tmp_path):
    folder, cfg, sd = release_folder(tmp_path, "shape", {})
    sd["transformer.wpe.weight"] = torch.zeros(3, 3)
    write_release_folder(folder, cfg, sd)
    with pytest.raises(ReleaseFormatError, match=r"transformer\.wpe\.weight has shape \(3, 3\)"):
        SparseHookedTransformer.from_circuit_sparsity(folder)
    folder, cfg, sd = release_folder(tmp_path, "extra", {})
    sd["transformer.h.0.attn.attn_imp.sink_logit"] = torch.zeros(2)  # sink is off
    write_release_folder(folder, cfg, sd)
    with pytest.raises(ReleaseFormatError, match="does not use.*sink_logit"):
        SparseHookedTransformer.from_circuit_sparsity(folder)


@pytest.mark.parametrize("overrides, match", [
    ({"n_kv_heads": 2}, r"unknown config fields \['n_kv_heads'\]"),
    ({"use_tied_aux_matrix": True}, "use_tied_aux_matrix"),
    ({"afrac": 0.5, "afrac_loctypes": "attn_in,attn_z"}, r"afrac_loctypes.*'attn_z'"),
    ({"activation_type": "swiglu"}, "activation_type='swiglu'"),
    ({"residual_activation_type": "tanh"}, "residual_activation_type='tanh'"),
    ({"afrac": 0.01}, r"afrac=0.01.*keeps int"),
    ({"n_head": 5}, "n_head=5"),
])
def test_config_options_that_cannot_be_honoured_are_refused_by_name(tmp_path, overrides, match):
    folder, cfg, sd = release_folder(tmp_path, "cfg", {})
    (folder / "beeg_config.json").write_text(json.dumps({**cfg, **overrides}))
    with pytest.raises(ReleaseFormatError, match=match):
        SparseHookedTransformer.from_circuit_sparsity(folder)


def test_a_missing_or_corrupt_config_is_a_clear_error(tmp_path):
    with pytest.raises(ReleaseFormatError, match="no circuit_sparsity model folder"):
        SparseHookedTransformer.from_circuit_sparsity(tmp_path / "nowhere")
    folder, _, _ = release_folder(tmp_path, "json", {})
    (folder / "beeg_config.json").write_text('{"n_layer": 2,')
    with pytest.raises(ReleaseFormatError, match="corrupt JSON"):
        SparseHookedTransformer.from_circuit_sparsity(folder)


# ------------------------------------------------------------------------------------- CLI
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_the_import_command_writes_a_model_directory(tmp_path, capsys):
    from sparse_lens.cli import main

    folder, cfg, sd = release_folder(tmp_path, "cli", VARIANTS["bigram_sink_dhead_dmlp"])
    with pytest.warns(UserWarning, match="token ids only"):
        assert main(["import-openai", str(folder), str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "2 layers, d_model 24, 2 heads of 8, d_mlp 40" in out and "weight L0 0.5" in out
    model = SparseHookedTransformer.from_pretrained(tmp_path / "out")
    tokens = tokens_for(cfg)
    with torch.no_grad():
        assert (model(tokens) - release_logits(sd, cfg, tokens)).abs().max() < 1e-4
    (folder / "final_model.pt").write_bytes(b"\x80garbage")
    assert main(["import-openai", str(folder), str(tmp_path / "out2")]) == 2
    assert "corrupt or unsafe weights file" in capsys.readouterr().err
    assert not (tmp_path / "out2").exists()
