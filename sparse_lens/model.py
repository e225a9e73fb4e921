"""`SparseHookedTransformer`: a `HookedTransformer` whose weights can be kept weight-sparse.

Built the way TransformerLens subclasses are meant to be built: `HookedTransformer.__init__` makes
the standard modules, we swap in the blocks of `components.py` (AbsTopK at configured
locations, two extra read hooks per block) and the optional bigram table, initialise, move to the
device, and call `setup()` again so every new HookPoint is registered under its module path.
Every standard hook keeps its name and meaning; with weight_l0 = 1, no AbsTopK location, no sink
and no bigram table the logits equal those of a plain `HookedTransformer` with the same weights.

Weight sparsity is a property of the *weights* (`project_weights_` zeroes all but the top-k of
each matrix, see `sparsity.py`), so the forward pass is the ordinary dense one.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Float, Int
from transformer_lens import HookedTransformer
from transformer_lens.HookedTransformer import Output
from transformer_lens.hook_points import HookPoint
from transformer_lens.utilities import USE_DEFAULT_VALUE
from transformers import PreTrainedTokenizerBase

from sparse_lens import checkpoint, sparsity
from sparse_lens.components import SparseTransformerBlock, make_norm
from sparse_lens.config import SparseHookedTransformerConfig
from sparse_lens.kernels import fast_kernels_enabled

#: Which axes of each sparsified matrix index its output units (the rest are the unit's fan-in):
#: the rule "no unit keeps fewer than min_nonzero_per_unit weights" is applied per unit.
UNIT_DIMS: dict[str, tuple[int, ...]] = {
    "embed.W_E": (0,),  # [d_vocab, d_model]: every token keeps an embedding
    "attn.W_Q": (0, 2),  # [head, d_model, d_head]: every q channel of every head
    "attn.W_K": (0, 2),
    "attn.W_V": (0, 2),
    "attn.W_O": (2,),  # [head, d_head, d_model]: every residual channel attention writes
    "mlp.W_in": (1,),  # [d_model, d_mlp]: every neuron
    "mlp.W_out": (1,),  # [d_mlp, d_model]: every residual channel the MLP writes
    "unembed.W_U": (1,),  # [d_model, d_vocab_out]: every logit
}


@dataclass(frozen=True)
class SparsifiedMatrix:
    """One weight matrix under the projection: its parameter name, tensor and unit axes."""

    name: str
    weight: nn.Parameter
    unit_dims: tuple[int, ...]


class SparseHookedTransformer(HookedTransformer):
    """A weight-sparse transformer in TransformerLens (see the module docstring).

    Extra hooks (beyond TransformerLens's own), all [batch, pos, ...]:
    `blocks.{L}.hook_attn_read` / `hook_mlp_read` [d_model] — what attention / the MLP reads,
    after the norm and AbsTopK; `hook_bigram_logits` [d_vocab_out] — the bigram table's logits.
    AbsTopK locations and the hook that sees each: `config.TOPK_LOCATIONS`.
    """

    cfg: SparseHookedTransformerConfig

    def __init__(
        self,
        cfg: SparseHookedTransformerConfig,
        tokenizer: PreTrainedTokenizerBase | None = None,
        move_to_device: bool = True,
        default_padding_side: str | None = None,
    ):
        if not isinstance(cfg, SparseHookedTransformerConfig):
            raise TypeError(
                f"cfg must be a SparseHookedTransformerConfig, got {type(cfg).__name__}; "
                "build one with SparseHookedTransformerConfig(...) or .preset(name)"
            )
        with warnings.catch_warnings():
            # TransformerLens 3.9 deprecates HookedTransformer in favour of TransformerBridge,
            # which wraps Hugging Face models; this class needs the former (see the design).
            warnings.filterwarnings("ignore", message="HookedTransformer is deprecated",
                                    category=DeprecationWarning)
            # TransformerLens's set_tokenizer edits the tokenizer it is given (bos := eos):
            # work on a copy so the caller's tokenizer is left as it was.
            tokenizer = copy.deepcopy(tokenizer) if tokenizer is not None else None
            super().__init__(cfg, tokenizer, move_to_device=False,
                             default_padding_side=default_padding_side)
        self.blocks = nn.ModuleList(
            [SparseTransformerBlock(cfg, i) for i in range(cfg.n_layers)]
        )  # type: ignore[assignment]
        if cfg.normalization_type == "RMS":
            self.ln_final = make_norm(cfg, cfg.d_model)  # fused when nothing hooks inside it
        if cfg.d_pos_emb is not None:
            # positions of their own width, concatenated to each block's reads (see get_residual)
            self.pos_embed.W_pos = nn.Parameter(torch.empty(cfg.n_ctx, cfg.d_pos_emb, dtype=cfg.dtype))
        if cfg.use_bigram_table:
            self.bigram = nn.Parameter(torch.zeros(cfg.d_vocab, cfg.d_vocab_out, dtype=cfg.dtype))
            self.hook_bigram_logits = HookPoint()  # [batch, pos, d_vocab_out]
        else:
            self.bigram = None
        self._generation_tokens: list[torch.Tensor] | None = None
        #: the model directory `from_pretrained` read (None if built in memory): where the
        #: model's training corpus is recorded, for its node means (`hooks.node_means_for`)
        self.loaded_from: Path | None = None
        if cfg.init_weights:
            self.init_weights()
        if move_to_device:
            self.move_model_modules_to_device()
            if self.bigram is not None:
                self.bigram.data = self.bigram.data.to(cfg.device)
        self.setup()

    # ----------------------------------------------------------------- init and forward
    def init_weights(self) -> None:
        """Matrices ~ N(0, initializer_range), output projections (W_O, W_out) divided by
        sqrt(2 n_layers); biases and sink logits 0; norm gains 1; bigram table 0."""
        std = self.cfg.initializer_range
        out_std = std / (2 * self.cfg.n_layers) ** 0.5
        with torch.no_grad():
            for name, param in self.named_parameters():
                leaf = name.rsplit(".", 1)[-1]
                if name == "bigram" or leaf.startswith("b_") or leaf == "sinks":
                    param.zero_()
                elif leaf in ("w", "b") and ".ln" in f".{name}":
                    param.fill_(1.0 if leaf == "w" else 0.0)
                elif param.ndim >= 2:
                    param.normal_(0.0, out_std if leaf in ("W_O", "W_out") else std)

    def forward(  # type: ignore[override]
        self,
        input,
        return_type: str | None = "logits",
        loss_per_token: bool = False,
        prepend_bos=USE_DEFAULT_VALUE,
        padding_side=USE_DEFAULT_VALUE,
        start_at_layer: int | None = None,
        tokens: Int[torch.Tensor, "batch pos"] | None = None,
        shortformer_pos_embed=None,
        attention_mask: torch.Tensor | None = None,
        stop_at_layer: int | None = None,
        past_kv_cache=None,
    ):
        """`HookedTransformer.forward`, plus the bigram table's logits when it is enabled."""
        kwargs = dict(prepend_bos=prepend_bos, padding_side=padding_side,
                      start_at_layer=start_at_layer, tokens=tokens,
                      shortformer_pos_embed=shortformer_pos_embed, attention_mask=attention_mask,
                      stop_at_layer=stop_at_layer, past_kv_cache=past_kv_cache)
        if self.bigram is None or stop_at_layer is not None or return_type is None:
            return super().forward(input, return_type=return_type,
                                   loss_per_token=loss_per_token, **kwargs)
        if start_at_layer is None:
            if not isinstance(input, torch.Tensor):
                input = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side)
            tokens = input
        elif tokens is None and self._generation_tokens:
            # inside generate(): the tokens behind these residuals are the ones embedded so far
            tokens = torch.cat(self._generation_tokens, dim=1)[:, -input.shape[1]:]
        elif tokens is None:
            raise ValueError("with a bigram table, start_at_layer needs tokens= for its logits")
        kwargs["tokens"] = tokens
        logits = super().forward(input, return_type="logits", **kwargs)
        logits = logits + self.hook_bigram_logits(self.bigram_logits(tokens.to(logits.device)))
        if return_type == "logits":
            return logits
        loss = self.loss_fn(logits, tokens, attention_mask, per_token=loss_per_token)
        if return_type == "loss":
            return loss
        if return_type == "both":
            return Output(logits, loss)
        raise ValueError(f"return_type must be logits, loss, both or None; got {return_type!r}")

    def loss_fn(self, logits: Float[torch.Tensor, "batch pos d_vocab"],
                tokens: Int[torch.Tensor, "batch pos"], attention_mask: torch.Tensor | None = None,
                per_token: bool = False):
        """TransformerLens's next-token loss (nats/token). Its mean over the batch, with no
        attention mask and fast kernels on (`kernels`), is one `F.cross_entropy` over every
        position, the last of each row ignored: the same value to float rounding without the
        slice TransformerLens takes, whose backward zero-fills and copies the logits' size."""
        if attention_mask is not None or per_token or not fast_kernels_enabled():
            return super().loss_fn(logits, tokens, attention_mask, per_token)
        targets = torch.full(tokens.shape, -100, dtype=torch.long, device=logits.device)
        targets[:, :-1] = tokens[:, 1:]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.view(-1), ignore_index=-100)

    def get_residual(self, embed, pos_offset, prepend_bos=USE_DEFAULT_VALUE, attention_mask=None,
                     tokens=None, return_shortformer_pos_embed=True, device=None):
        """TransformerLens's embedding step. With `d_pos_emb` set the residual stream starts as
        the token embedding alone and the position embedding ([batch, pos, d_pos_emb], seen by
        `hook_pos_embed`) travels to every block, like TransformerLens's shortformer one.

        `generate()` calls this with the embeddings of the *whole* sequence and, with a KV
        cache, `pos_offset` = the cached length; without an attention mask (token input and no
        tokenizer) TransformerLens 3.9 would then start the positions at that offset instead of
        0. Only `generate()` calls this without `tokens`, so that case starts at 0."""
        if tokens is None and attention_mask is None:
            pos_offset = 0
        if self.cfg.d_pos_emb is None:
            return super().get_residual(embed, pos_offset, prepend_bos, attention_mask, tokens,
                                        return_shortformer_pos_embed, device)
        if tokens is None:
            tokens = torch.ones(embed.shape[:2], dtype=torch.long, device=embed.device)
        pos_embed = self.hook_pos_embed(self.pos_embed(tokens, pos_offset, attention_mask))
        return (embed, pos_embed) if return_shortformer_pos_embed else embed

    def generate(self, *args, **kwargs):
        """`HookedTransformer.generate`. With a bigram table the bigram logits need the tokens,
        which TransformerLens's loop does not pass to `forward`; we record every call of
        `self.embed` (the prompt, then each sampled token) and read them back in `forward`."""
        if self.bigram is None:
            return super().generate(*args, **kwargs)
        tape: list[torch.Tensor] = []
        handle = self.embed.register_forward_hook(lambda _m, inputs, _out: tape.append(inputs[0]))
        self._generation_tokens = tape
        try:
            return super().generate(*args, **kwargs)
        finally:
            handle.remove()
            self._generation_tokens = None

    def bigram_logits(self, tokens: Int[torch.Tensor, "batch pos"]) -> Float[torch.Tensor, "batch pos d_vocab_out"]:
        """The bigram table's row for each current token."""
        assert self.bigram is not None
        return self.bigram[tokens]

    # ------------------------------------------------------------- caches and TL flags
    def run_with_cache(self, *model_args, return_cache_object=True, remove_batch_dim=False,
                       **kwargs):
        """`HookedTransformer.run_with_cache`; the cache object is a `SparseActivationCache`,
        whose attributions add up exactly (see `sparse_lens.attribution`)."""
        from sparse_lens.attribution import SparseActivationCache

        out, cache = super().run_with_cache(*model_args, return_cache_object=False,
                                            remove_batch_dim=remove_batch_dim, **kwargs)
        if not return_cache_object:
            return out, cache
        return out, SparseActivationCache(cache, self, has_batch_dim=not remove_batch_dim)

    def set_use_split_qkv_input(self, use_split_qkv_input: bool) -> None:
        """Refused: blocks read through `hook_attn_read` (see `_refuse_flag`)."""
        self._refuse_flag("use_split_qkv_input", use_split_qkv_input)

    def set_use_attn_in(self, use_attn_in: bool) -> None:
        """Refused: blocks read through `hook_attn_read` (see `_refuse_flag`)."""
        self._refuse_flag("use_attn_in", use_attn_in)

    def set_use_hook_mlp_in(self, use_hook_mlp_in: bool) -> None:
        """Refused: blocks read through `hook_mlp_read` (see `_refuse_flag`)."""
        self._refuse_flag("use_hook_mlp_in", use_hook_mlp_in)

    def _refuse_flag(self, flag: str, value: bool) -> None:
        """Setting `flag` to True raises (and changes nothing): the blocks read once, through
        `blocks.{L}.hook_attn_read` / `hook_mlp_read`, which serve the same purpose."""
        if value:
            raise NotImplementedError(
                f"SparseHookedTransformer does not support {flag}: attention and the MLP read "
                "through blocks.{L}.hook_attn_read / blocks.{L}.hook_mlp_read; hook those instead")
        setattr(self.cfg, flag, False)

    # ------------------------------------------------------------------ weight sparsity
    def sparsified_matrices(self) -> list[SparsifiedMatrix]:
        """Every matrix the projection acts on (biases, norms, sinks, W_pos, bigram stay dense)."""
        out = []
        for name, param in self.named_parameters():
            for suffix, unit_dims in UNIT_DIMS.items():
                if name.endswith(suffix):
                    out.append(SparsifiedMatrix(name, param, unit_dims))
        return out

    @torch.no_grad()
    def project_weights_(self, l0: float | None = None) -> None:
        """Keep the top-`l0` fraction (default: the config's target) of every sparsified matrix,
        never leaving a unit with fewer than `min_nonzero_per_unit` nonzeros. In place."""
        l0 = self.cfg.weight_l0 if l0 is None else l0
        if l0 >= 1.0:
            return
        for m in self.sparsified_matrices():
            sparsity.project_(m.weight, l0, self.cfg.min_nonzero_per_unit, m.unit_dims)

    @torch.no_grad()
    def weight_sparsity(self) -> pd.DataFrame:
        """One row per sparsified matrix: name, shape, numel, nonzeros, target and achieved L0
        (fraction of nonzeros; the per-unit floor can keep a matrix denser than its target), the
        floor's own count (units x min_nonzero_per_unit), and the fewest nonzeros of any unit."""
        rows = []
        for m in self.sparsified_matrices():
            per_unit = sparsity.units_view(m.weight, m.unit_dims).ne(0).sum(dim=1)
            numel = m.weight.numel()
            nonzeros = int(per_unit.sum())
            rows.append(dict(
                name=m.name,
                shape=tuple(m.weight.shape),
                numel=numel,
                nonzeros=nonzeros,
                target_l0=self.cfg.weight_l0,
                achieved_l0=nonzeros / numel,
                units=per_unit.numel(),
                floor_nonzeros=per_unit.numel() * self.cfg.min_nonzero_per_unit,
                min_nonzeros_per_unit=int(per_unit.min()),
            ))
        return pd.DataFrame(rows)

    # --------------------------------------------------------------------- save / load
    def save_pretrained(self, path: str | Path) -> Path:
        """Write `config.json`, `model.safetensors` and `tokenizer/` into the directory `path`."""
        return checkpoint.save_model(self, path)

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls, path: str | Path, device: str | torch.device | None = None
    ) -> SparseHookedTransformer:
        """Load a directory written by `save_pretrained` (or by `sparse-lens train`), or a
        checkpoint shipped in the package by name (`from_pretrained("small")`, see
        `sparse_lens.pretrained.available()`; an existing directory of that name wins). Nothing is
        unpickled: weights from safetensors, config from JSON, tokenizer from its files. Unlike
        `HookedTransformer.from_pretrained`, no weight processing (folding, centring) is done,
        which would destroy exact sparsity. A directory without tokenizer files loads with a
        warning (the model then takes token ids only); a weights SHA-256 recorded in the
        directory's `provenance.json` is checked."""
        from sparse_lens import shipped

        where = Path(path)
        if not where.exists() and not where.with_name(f"{where.name}.old").is_dir():
            if isinstance(path, str) and path in shipped.available():
                return shipped.load_into(cls, path, device=device)
            raise checkpoint.CheckpointError(
                f"no model directory at {where}, and no shipped checkpoint named {str(path)!r}; "
                f"shipped: {shipped.available()}")
        return checkpoint.load_model(cls, path, device=device)

    @classmethod
    def from_circuit_sparsity(
        cls,
        path: str | Path,
        tokenizer: str | Path | PreTrainedTokenizerBase | None = None,
        device: str | torch.device | None = None,
    ) -> SparseHookedTransformer:
        """Open a model of OpenAI's circuit_sparsity release: a folder with `beeg_config.json`
        and `final_model.pt`. `tokenizer`: the release's `tinypython_2k` folder (`encoder.json` +
        `vocab.bpe`) or any tokenizer; without one the model works on token ids. The outputs
        equal the release's own model code's; see `sparse_lens.openai_release`."""
        from sparse_lens.openai_release import load_release_model

        return load_release_model(cls, path, tokenizer=tokenizer, device=device)
