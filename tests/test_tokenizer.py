"""The shipped tokenizer: task targets are single tokens, lossless, EOS/pad, deterministic
training, and it works inside TransformerLens."""

import json
import warnings

import pytest
import torch

from sparse_lens import data
from sparse_lens.tokenizer import (
    EOS_TOKEN,
    TASK_TARGETS,
    TOKENIZER_DIR,
    load_tokenizer,
    single_token_report,
    train_tokenizer,
)


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_shipped_directory_holds_the_saved_files():
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (TOKENIZER_DIR / name).is_file(), name


def test_every_task_target_is_a_single_token(tokenizer):
    report = single_token_report(tokenizer)
    assert {t: toks for t, toks in report.items() if len(toks) != 1} == {}
    # and the contrasting targets are different tokens
    single = {t: ids(tokenizer, t)[0] for t in TASK_TARGETS}
    assert len(set(single.values())) == len(TASK_TARGETS)


def test_targets_stay_single_tokens_in_context(tokenizer):
    def toks(text):
        return tokenizer.convert_ids_to_tokens(ids(tokenizer, text))

    assert toks("x = 'a'")[-1] == "'" and toks('x = "a"')[-1] == '"'
    assert toks("x = m[i[0]]")[-1] == "]]" and toks("x = m[0]")[-1] == "]"
    assert "Ġ+=" in toks("    total += 1") and ".add" in toks("    seen.add(x)")
    assert toks("if x:\n")[-2:] == [":", "Ċ"]
    assert "Ġ==" in toks("if a == b:") and "Ġ=" in toks("a = b")
    assert toks("        return x")[-2] == "Ġreturn"  # indentation ends before the keyword's space
    assert toks("    elif y:")[1] == "Ġelif"
    assert toks("for i, x in enumerate(xs):")[4] == "Ġin"
    assert toks("def __init__(self):")[1:4] == ["Ġ__init__", "(", "self"]


def test_eos_pad_and_no_bos(tokenizer):
    assert tokenizer.eos_token == EOS_TOKEN and tokenizer.eos_token_id == 0
    assert tokenizer.pad_token_id == 0
    assert tokenizer.bos_token is None
    assert len(tokenizer) == 2048
    assert ids(tokenizer, "x = 1") == tokenizer("x = 1")["input_ids"]  # no special tokens added
    assert ids(tokenizer, EOS_TOKEN) == [0]


@pytest.mark.slow
def test_round_trip_is_lossless_on_real_files(tokenizer):
    files = data.select_subset(data.stdlib_source_files(), 200)
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        assert tokenizer.decode(ids(tokenizer, text)) == text, f


@pytest.mark.parametrize("text", ["", "\t\tx\r\n", "ünïcode = 'ŝ' # 🐍\n", "  \n\n   \t", "a\x00b"])
def test_round_trip_is_lossless_on_odd_text(tokenizer, text):
    assert tokenizer.decode(ids(tokenizer, text)) == text


@pytest.mark.slow
def test_training_is_deterministic_and_saves_a_loadable_directory(tmp_path):
    files = data.select_subset(data.stdlib_source_files(), 12)
    a = train_tokenizer(files, vocab_size=400, out_dir=tmp_path / "a")
    b = train_tokenizer(list(reversed(files)), vocab_size=400, out_dir=tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    assert len(a) == len(b) == 400 and a.eos_token_id == 0 and a.pad_token_id == 0
    config = json.loads((tmp_path / "a" / "tokenizer_config.json").read_text())
    assert config["eos_token"] == EOS_TOKEN and config.get("bos_token") is None
    reloaded = load_tokenizer(tmp_path / "a")
    text = files[0].read_text(encoding="utf-8", errors="replace")
    assert ids(reloaded, text) == ids(a, text)
    assert reloaded.decode(ids(reloaded, text)) == text


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer directory"):
        load_tokenizer(tmp_path / "nope")


def test_works_inside_transformer_lens(tokenizer):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=1, d_model=16, n_ctx=32, d_head=8, d_vocab=2048,
                                  act_fn="gelu", default_prepend_bos=False,
                                  tokenizer_prepends_bos=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = HookedTransformer(cfg, tokenizer=load_tokenizer())
    tokens = model.to_tokens("x = 'a'")
    assert tokens.tolist() == [ids(tokenizer, "x = 'a'")]  # no BOS prepended
    assert model.to_str_tokens("x = 'a'") == ["x", " =", " '", "a", "'"]
    assert model.to_string(tokens[0]) == "x = 'a'"
    assert model.tokenizer.pad_token_id == 0 and model.tokenizer.eos_token_id == 0
    logits = model(tokens)
    assert logits.shape == (1, tokens.shape[1], 2048) and torch.isfinite(logits).all()


def test_a_model_tokenizer_saved_and_reloaded_still_prepends_no_bos(tmp_path):
    """TransformerLens declares bos = eos on the model's tokenizer; reloading must not turn that
    into a prepended BOS (it would flip cfg.tokenizer_prepends_bos and break resuming)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from sparse_lens.tokenizer import save_tokenizer

    cfg = HookedTransformerConfig(n_layers=1, d_model=16, n_ctx=32, d_head=8, d_vocab=2048,
                                  act_fn="gelu", default_prepend_bos=False,
                                  tokenizer_prepends_bos=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = HookedTransformer(cfg, tokenizer=load_tokenizer())
        assert model.tokenizer.bos_token == EOS_TOKEN  # TransformerLens's in-memory default
        model.tokenizer.save_pretrained(str(tmp_path / "plain"))  # what a checkpoint might write
        save_tokenizer(model.tokenizer, tmp_path / "clean")
        assert json.loads((tmp_path / "clean" / "tokenizer_config.json").read_text())["bos_token"] is None
        for name in ("plain", "clean"):
            reloaded = load_tokenizer(tmp_path / name)
            assert reloaded.bos_token is None
            again = HookedTransformer(cfg, tokenizer=reloaded)
            assert again.cfg.tokenizer_prepends_bos is False
            assert again.to_tokens("x = 1").tolist() == [ids(reloaded, "x = 1")]
