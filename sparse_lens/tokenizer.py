"""The shipped byte-level BPE tokenizer for Python source, and how to (re)train it.

The package ships `tokenizer_data/stdlib_bpe_2048/`, trained on the running interpreter's standard
library (CPython 3.11). Regenerate it with

    python -m sparse_lens.tokenizer --out sparse_lens/tokenizer_data/stdlib_bpe_2048 --vocab-size 2048

(no SOURCES = the standard library; pass directories, files or globs of .py files to train on
something else). Training is deterministic: the same files give a byte-identical tokenizer.json.

Design
------
* One special token, `<|endoftext|>` (id 0): it ends every document (EOS) and pads. There is no
  BOS token, so TransformerLens must be used with `default_prepend_bos=False`.
* Byte-level BPE (lossless: `decode(encode(text)) == text` for any text) on top of a
  code-aware pre-tokenisation (`PRETOKENIZE_PATTERN`) chosen so that the next-token targets of
  the circuit tasks are single tokens: the closing quote `'` vs `"`, `]` vs `]]`, `.add` vs ` +=`,
  `:` vs a newline, ` =` vs ` ==`, and keywords/builtins with their leading space (` if`,
  ` in`, ` None`, ` range`, ...). Concretely: every newline is its own token (never merged with
  indentation); identifiers may carry one leading space *and* one leading `.` (so `.append` is
  one unit); quotes stand alone (triple quotes as a unit) so a closing quote never merges with
    " ?[^\\s\\p{L}\\p{N}_'\"\\]\\)\\}]+",       # other punctuation runs: ( , += == -> ...
  carry an optional leading space (` +=`, ` ==`, ` ->`); whitespace is split GPT-2 style (the
  last space of an indentation run goes to the following token).
* At vocab 2048 plain corpus statistics leave three targets split (` enumerate`, and a bare
  `elif`/`__init__` at column 0), so training counts each of `TASK_TARGETS` 1,000 extra times
  (`boost`/`boost_count` of `train_tokenizer`); this leaves the stdlib's token count unchanged
  to within 0.01%.
* The model is loaded from a directory with `AutoTokenizer.from_pretrained`. (An in-memory
  `PreTrainedTokenizerFast` that declares special tokens breaks inside TransformerLens with
  `KeyError: 'name_or_path'`; a reloaded one does not.)
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

TOKENIZER_DIR = Path(__file__).parent / "tokenizer_data" / "stdlib_bpe_2048"
EOS_TOKEN = "<|endoftext|>"
DEFAULT_VOCAB_SIZE = 2048
DEFAULT_BOOST_COUNT = 1000

#: The pre-tokenisation regex (alternatives tried in order; see the module docstring).
PRETOKENIZE_PATTERN = "|".join([
    r"\n",                                   # each newline is its own pre-token
    r" ?\.?[\p{L}_][\p{L}\p{N}_]*",          # identifiers, with optional leading space and/or '.'
    r" ?\p{N}+",                             # numbers (BPE splits long ones)
    " ?(?:'''|\"\"\"|'|\")",                 # quotes alone; triple quotes as one unit
    r"\]+|\)+|\}+",                          # runs of one closing bracket: ] ]] ) )) }
    " ?[^\\s\\p{L}\\p{N}_'\"\\]\\)\\}]+",       # other punctuation runs: ( , += == -> ...
    r"[^\S\n]+(?!\S)|[^\S\n]+",              # spaces/tabs, GPT-2 style
])

#: Strings the circuit tasks need as single tokens (checked by the tests and by the CLI).
TASK_TARGETS: tuple[str, ...] = (
    "'", '"', "]", "]]", ".add", " +=", ":", "\n", " =", " ==", ")", "}", "else", "elif",
    " if", " else", " for", " while", " in", " as", " True", " False", " None", " range",
    " enumerate", " lambda", " def", " return", " not", " is", "__init__", " self", " open",
)


def load_tokenizer(path: str | Path | None = None, keep_bos: bool = False) -> PreTrainedTokenizerFast:
    """Load a tokenizer directory (default: the shipped `TOKENIZER_DIR`) with
    `AutoTokenizer.from_pretrained`; works offline.

    Unless `keep_bos`, a BOS token that merely repeats EOS is dropped: TransformerLens's
    `set_tokenizer` declares `bos_token = eos_token` on the model's tokenizer, `save_pretrained`
    persists it, and TransformerLens would then make the reloaded tokenizer *prepend* it
    (`cfg.tokenizer_prepends_bos=True`). sparse_lens models have no BOS. Use `save_tokenizer`
    to write a model's tokenizer without that declaration in the first place."""
    from transformers import AutoTokenizer

    path = Path(TOKENIZER_DIR if path is None else path)
    if not (path / "tokenizer.json").is_file():
        hint = (" Regenerate it with `python -m sparse_lens.tokenizer`." if path == TOKENIZER_DIR else "")
        raise FileNotFoundError(f"no tokenizer directory (with tokenizer.json) at {path}.{hint}")
    tok = AutoTokenizer.from_pretrained(str(path))
    if not keep_bos and tok.bos_token is not None and tok.bos_token == tok.eos_token and not tok.encode(""):
        tok.bos_token = None
    return tok


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: str | Path) -> Path:
    """`tokenizer.save_pretrained(out_dir)`, then clean the written config: drop a BOS that just
    repeats EOS (see `load_tokenizer`) and the loader's bookkeeping keys, name the class
    `PreTrainedTokenizerFast` (transformers 5 writes its alias `TokenizersBackend`, which 4.x
    does not know), and write `special_tokens_map.json` (which 5.x no longer writes)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir))
    config_file = out_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    if config.get("bos_token") is not None and config.get("bos_token") == config.get("eos_token"):
        config["bos_token"] = None
    for key in ("is_local", "local_files_only", "add_bos_token", "name_or_path"):
        config.pop(key, None)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    special = {k: config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if config.get(k)}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2, sort_keys=True) + "\n")
    return out_dir


def build_untrained_tokenizer():
    """The `tokenizers.Tokenizer` pipeline (BPE model, pre-tokenizer, decoder), untrained."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def _read_texts(files: Sequence[Path]) -> Iterator[str]:
    for f in files:
        yield Path(f).read_text(encoding="utf-8", errors="replace")


def train_tokenizer(
    files: Sequence[str | Path] | None = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    out_dir: str | Path = TOKENIZER_DIR,
    boost: Sequence[str] = TASK_TARGETS,
    boost_count: int = DEFAULT_BOOST_COUNT,
) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE on `files` (default: the standard library), save it to `out_dir`
    with `save_pretrained`, and return it reloaded from there. `vocab_size` counts the 256 byte
    tokens and `<|endoftext|>` (id 0). Deterministic: the files are read in sorted order.

    Each string of `boost` (default the task targets) is counted `boost_count` extra times as a
    pre-token, so that the rarer targets (` enumerate`, a bare `elif`/`__init__`) get a merge
    chain of their own at vocab 2048; with `boost=()` the vocabulary is pure corpus statistics."""
    from tokenizers import pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from sparse_lens.sources import stdlib_source_files

    if vocab_size < 258:
        raise ValueError(f"vocab_size={vocab_size} must be >= 258 (256 bytes + <|endoftext|> + 1)")
    paths = sorted(Path(f) for f in (stdlib_source_files() if files is None else files))
    if not paths:
        raise ValueError("train_tokenizer: no files to train on")
    tok = build_untrained_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    boost_docs = ["\n".join([t] * boost_count) for t in boost] if boost_count > 0 else []
    texts = itertools.chain(_read_texts(paths), boost_docs)
    tok.train_from_iterator(texts, trainer=trainer, length=len(paths) + len(boost_docs))
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN, unk_token=None,
        bos_token=None, model_max_length=1_000_000, clean_up_tokenization_spaces=False)
    save_tokenizer(wrapped, out_dir)
    return load_tokenizer(out_dir)


def single_token_report(tokenizer: PreTrainedTokenizerFast,
                        targets: Sequence[str] = TASK_TARGETS) -> dict[str, list[str]]:
    """For each target string, the tokens it encodes to; a target is fine when that is one token."""
    return {t: tokenizer.convert_ids_to_tokens(tokenizer(t, add_special_tokens=False)["input_ids"])
            for t in targets}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sparse_lens.tokenizer",
        description="Train the byte-level BPE tokenizer on Python source and save it.")
    parser.add_argument("sources", nargs="*",
                        help="directories, files or globs of .py files (default: the standard library)")
    parser.add_argument("--out", type=Path, default=TOKENIZER_DIR,
                        help=f"output directory (default: the shipped {TOKENIZER_DIR})")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    args = parser.parse_args(argv)

    from sparse_lens.sources import resolve_source_files

    files = resolve_source_files(args.sources or None)
    start = time.perf_counter()
    tok = train_tokenizer(files, vocab_size=args.vocab_size, out_dir=args.out)
    seconds = time.perf_counter() - start
    print(f"trained a {len(tok)}-token tokenizer on {len(files)} files in {seconds:.1f} s -> {args.out}")
    split = {t: toks for t, toks in single_token_report(tok).items() if len(toks) != 1}
    if split:
        print("task targets that are NOT single tokens:")
        for t, toks in split.items():
            print(f"  {t!r} -> {toks}")
    else:
        print(f"all {len(TASK_TARGETS)} task targets are single tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
