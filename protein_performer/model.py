"""ProteinPerformer: a protein language model whose attention is exact softmax, FAVOR+ or a relative.

Reading order: PerformerConfig (every knob, validated) -> PerformerOutput -> ProteinPerformer
(embeddings, pre-LN blocks from `protein_performer.nn`, final norm, tied LM head) -> config_from_hydra
(the seam with `conf/model/*.yaml` + `conf/attention/*.yaml`). A plain nn.Module: no Lightning here.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from protein_performer.nn import ATTENTION_KINDS, RANDOM_FEATURE_KINDS, RECURRENT_KINDS, Block

POSITION_KINDS = ("rotary", "learned", "none")
COMBINER_VARIANTS = ("fixed", "axial")


@dataclass
class PerformerConfig:
    """Everything that defines a ProteinPerformer; `conf/model` + `conf/attention` map onto it field by field."""

    vocab_size: int  # rows of the embedding and LM head: len(Alphabet())
    d_model: int = 512  # width of the residual stream
    n_layers: int = 6  # Transformer blocks
    n_heads: int = 8  # attention heads; each is d_model // n_heads wide
    d_ff: int = 2048  # hidden width of each feed-forward network
    dropout: float = 0.1  # on embeddings and on each residual branch (the Performer paper's 0.1)
    attention: str = "favor"  # "softmax" (exact baseline) | "favor" | "favor_relu" | "favor_rpe" | "combiner"
    causal: bool = False  # True: position i sees keys <= i (causal LM); False: all keys (masked LM)
    nb_features: int = 256  # random features per head for the favor kinds (the paper's m = 256)
    feature_redraw_interval: int = 1000  # optimizer steps between redraws (the training callback); 0 = never
    feature_seed: int = 0  # projections derive from (feature_seed, step, layer): equal on all DDP ranks
    position: str | None = None  # "rotary" | "learned" | "none"; None: "none" for favor_rpe, else "rotary"
    max_length: int = 1024  # longest input for learned positions and a full favor_rpe bias (others: any length)
    tie_embeddings: bool = True  # the LM head reuses the token embedding matrix (fewer parameters, better LM)
    pad_idx: int | None = None  # padding token id: its embedding row starts at zero and gets no gradient
    combiner_block_size: int | None = None  # Combiner block size; None = round(sqrt(max_length)) for combiner
    combiner_variant: str = "fixed"  # Combiner factorisation: "fixed" | "axial"
    rpe_exact_distance: int = 32  # favor_rpe: one learned bias per offset |j - i| below this (then log buckets)
    rpe_max_distance: int | None = 128  # favor_rpe: window w, one bias per direction beyond; None: free bias
    #                                     over every offset up to max_length (the paper's form, FFT/dense)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "nb_features", "max_length"):
            value = getattr(self, name)
            _require(_is_int(value) and value > 0, f"{name} must be a positive integer, got {value!r}")
        for name in ("feature_redraw_interval", "feature_seed"):
            value = getattr(self, name)
            _require(_is_int(value) and value >= 0, f"{name} must be a non-negative integer, got {value!r}")
        for name in ("causal", "tie_embeddings"):
            value = getattr(self, name)
            _require(isinstance(value, bool), f"{name} must be true or false, got {value!r}")
        _require(isinstance(self.dropout, (int, float)) and not isinstance(self.dropout, bool)
                 and 0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout!r}")
        self.dropout = float(self.dropout)
        _require(self.d_model % self.n_heads == 0,
                 f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                 "every head must be d_model // n_heads wide")
        _require(self.attention in ATTENTION_KINDS,
                 f"unknown attention kind {self.attention!r}; choose one of {ATTENTION_KINDS}")
        _require(self.combiner_variant in COMBINER_VARIANTS,
                 f"unknown combiner_variant {self.combiner_variant!r}; choose one of {COMBINER_VARIANTS}")
        _require(self.pad_idx is None or (_is_int(self.pad_idx) and 0 <= self.pad_idx < self.vocab_size),
                 f"pad_idx must be None or an id in [0, vocab_size={self.vocab_size}), got {self.pad_idx!r}")

        # favor_rpe learns its own relative positions, so it needs no other position signal by default.
        if self.position is None:
            self.position = "none" if self.attention == "favor_rpe" else "rotary"
        _require(self.position in POSITION_KINDS,
                 f"unknown position {self.position!r}; choose one of {POSITION_KINDS} (or null for the default)")
        _require(self.position != "rotary" or (self.d_model // self.n_heads) % 2 == 0,
                 f"rotary positions rotate channel pairs, so the head width d_model // n_heads = "
                 f"{self.d_model // self.n_heads} must be even; change d_model/n_heads or the position")
        # Bidirectional attention is permutation-equivariant: without positions an MLM cannot see residue
        # order at all. A causal model still can (the mask breaks the symmetry), so that combination stays.
        _require(self.position != "none" or self.causal or self.attention == "favor_rpe",
                 f"position='none' with bidirectional attention={self.attention!r} leaves the model blind to "
                 "residue order; use position='rotary' or 'learned', attention='favor_rpe', or causal=True")

        _require(_is_int(self.rpe_exact_distance) and self.rpe_exact_distance > 0,
                 f"rpe_exact_distance must be a positive integer, got {self.rpe_exact_distance!r}")
        _require(self.rpe_max_distance is None or (_is_int(self.rpe_max_distance) and self.rpe_max_distance > 0),
                 f"rpe_max_distance (the favor_rpe window w) must be a positive integer or null (a free bias over "
                 f"every offset), got {self.rpe_max_distance!r}")
        _require(self.rpe_max_distance is None or self.rpe_exact_distance <= self.rpe_max_distance,
                 f"rpe_exact_distance={self.rpe_exact_distance} exceeds rpe_max_distance={self.rpe_max_distance}; "
                 "exact offsets must fit inside the window")

        block_size = self.combiner_block_size
        _require(block_size is None or (_is_int(block_size) and block_size > 0),
                 f"combiner_block_size must be a positive integer or None, got {self.combiner_block_size!r}")
        # ~sqrt(L) gives O(L sqrt L) cost; taking L = max_length (not each batch's padded length) keeps the
        # block partition, and so every output, independent of how much padding a batch carries.
        if self.attention == "combiner" and self.combiner_block_size is None:
            self.combiner_block_size = max(1, round(math.sqrt(self.max_length)))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> PerformerConfig:
        """Build from a plain mapping (e.g. a checkpoint's saved config); unknown keys raise ValueError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        _require(not unknown, f"unknown PerformerConfig keys {unknown}; valid keys are {sorted(known)}")
        _require("vocab_size" in values, "PerformerConfig needs vocab_size (len(Alphabet()))")
        if values.get("attention") == "favor_rpe" and "rpe_max_distance" not in values:
            # Saved before the windowed bias existed: such a model learned the free bias over every offset.
            values = {**values, "rpe_max_distance": None}
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-friendly dict; from_dict(to_dict()) rebuilds an equal config."""
        return dataclasses.asdict(self)

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.d_model // self.n_heads


@dataclass
class PerformerOutput:
    """What ProteinPerformer.forward returns.

    logits: [batch, length, vocab_size].
    hidden_states: {layer: [batch, length, d_model]} for the requested repr_layers, keyed by the
        non-negative index (0 = embeddings, i = after block i, n_layers = after the final LayerNorm).
    attentions: [batch, n_layers, heads, length, length] when return_attention=True, else None.
    """

    logits: Tensor
    hidden_states: dict[int, Tensor] = field(default_factory=dict)
    attentions: Tensor | None = None


@dataclass
class DecodingState:
    """Where step-by-step decoding is: the next position and each layer's recurrent attention state."""

    position: int
    layers: list[Any]


class ProteinPerformer(nn.Module):
    """Token embedding (+ learned positions) -> n_layers pre-LN blocks -> LayerNorm -> LM head."""

    def __init__(self, config: PerformerConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model, padding_idx=config.pad_idx)
        self.position_embedding = (nn.Embedding(config.max_length, config.d_model)
                                   if config.position == "learned" else None)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, layer_index) for layer_index in range(config.n_layers))
        self.final_norm = nn.LayerNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size)

        self.apply(self._init_weights)
        # GPT-2's scaling: each block adds two residual branches, so shrink their output projections to
        # keep the residual stream's variance independent of depth.
        for block in self.blocks:
            for linear in (block.attention.out_proj, block.feedforward.down):
                nn.init.normal_(linear.weight, std=0.02 / math.sqrt(2 * config.n_layers))
        if config.tie_embeddings:
            self.lm_head.weight = self.token_embedding.weight
        self.redraw_projections(step=0)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()

    @property
    def uses_random_features(self) -> bool:
        """True when the layers hold projections that the training loop should redraw."""
        return self.config.attention in RANDOM_FEATURE_KINDS

    @torch.no_grad()
    def redraw_projections(self, step: int) -> None:
        """Redraw every layer's random-feature projection from (config.feature_seed, step, layer index).

        A fresh CPU torch.Generator per layer makes the result a pure function of those three numbers:
        every DDP rank computes the same matrices without communication. No-op without random features.
        """
        if not (_is_int(step) and step >= 0):
            raise ValueError(f"redraw_projections needs a non-negative integer step, got {step!r}")
        for block in self.blocks:
            generator = torch.Generator(device="cpu")
            generator.manual_seed(projection_seed(self.config.feature_seed, step, block.attention.layer_index))
            block.attention.redraw_projection(generator)

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Number of parameters, tied ones counted once (buffers such as projections excluded)."""
        return count_parameters(self, trainable_only=trainable_only)

    def embed(self, input_ids: Tensor, offset: int = 0) -> Tensor:
        """input_ids [batch, length] (first token at position `offset`) -> [batch, length, d_model]."""
        x = self.token_embedding(input_ids)
        if self.position_embedding is not None:
            end = offset + input_ids.shape[1]
            if end > self.config.max_length:
                raise ValueError(f"position {end - 1} is beyond max_length={self.config.max_length} of the "
                                 "learned position table; crop the input or use position='rotary'")
            x = x + self.position_embedding(torch.arange(offset, end, device=input_ids.device))
        return self.dropout(x)

    def forward(self, input_ids: Tensor, padding_mask: Tensor | None = None, *,
                repr_layers: Sequence[int] = (), return_attention: bool = False) -> PerformerOutput:
        """Logits for input_ids [batch, length] (long); see PerformerOutput.

        padding_mask: bool [batch, length], True at padding: padded positions are never attended to, so a
            sequence's outputs do not depend on the padding around it.
        repr_layers: layers whose hidden states to return; negatives count from the end (-1 = n_layers).
        return_attention: also return every layer's attention matrix (the one applied to v).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
        if padding_mask is not None and (padding_mask.shape != input_ids.shape
                                         or padding_mask.dtype != torch.bool):
            raise ValueError(f"padding_mask must be bool {tuple(input_ids.shape)} (True at padding), got "
                             f"{padding_mask.dtype} {tuple(padding_mask.shape)}")
        n_layers = self.config.n_layers
        wanted = self._layer_indices(repr_layers)

        x = self.embed(input_ids)
        hidden_states: dict[int, Tensor] = {0: x} if 0 in wanted else {}
        attentions: list[Tensor] = []
        for index, block in enumerate(self.blocks, start=1):
            x, weights = block(x, padding_mask, return_attention)
            if weights is not None:
                attentions.append(weights)
            if index in wanted and index != n_layers:
                hidden_states[index] = x
        x = self.final_norm(x)
        if n_layers in wanted:
            hidden_states[n_layers] = x
        return PerformerOutput(
            logits=self.lm_head(x),
            hidden_states=hidden_states,
            attentions=torch.stack(attentions, dim=1) if return_attention else None,  # (B, layers, H, L, L)
        )

    def _layer_indices(self, repr_layers: Sequence[int]) -> set[int]:
        n_layers = self.config.n_layers
        bad = [layer for layer in repr_layers if not -(n_layers + 1) <= layer <= n_layers]
        if bad:
            raise ValueError(f"repr_layers {bad} out of range for a {n_layers}-layer model: use 0..{n_layers} "
                             f"(0 = embeddings, {n_layers} = after the final norm) or negatives from the end")
        return {layer % (n_layers + 1) for layer in repr_layers}

    def decode_step(self, input_ids: Tensor, state: DecodingState | None = None) -> tuple[Tensor, DecodingState]:
        """Feed one token per sequence, input_ids [batch] -> (next-token logits [batch, vocab], new state).

        Recurrent FAVOR+ (causal favor/favor_relu models, and favor_rpe with a windowed bias: the last w
        keys plus the far state): memory per step is constant in the length decoded so far, and the
        logits equal the parallel forward's at the same position. No padding:
        all sequences of the batch advance together. Call in eval mode for deterministic outputs.
        """
        if not self.config.causal or not self.blocks[0].attention.recurrent:
            raise ValueError(f"decode_step needs causal=True and attention in {RECURRENT_KINDS} (or favor_rpe with "
                             f"rpe_max_distance set); this model has attention={self.config.attention!r}, "
                             f"causal={self.config.causal}, rpe_max_distance={self.config.rpe_max_distance}")
        if state is None:
            state = DecodingState(position=0, layers=[None] * self.config.n_layers)
        x = self.embed(input_ids[:, None], offset=state.position)[:, 0]  # (B, d_model)
        layer_states = []
        for block, layer_state in zip(self.blocks, state.layers):
            x, layer_state = block.step(x, state.position, layer_state)
            layer_states.append(layer_state)
        logits = self.lm_head(self.final_norm(x))
        return logits, DecodingState(position=state.position + 1, layers=layer_states)

    @torch.no_grad()
    def generate(self, prompt_ids: Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                 generator: torch.Generator | None = None) -> Tensor:
        """Sample a continuation: prompt_ids [batch, prompt_length] -> [batch, prompt_length + max_new_tokens].

        The prompt is fed token by token through decode_step (constant memory); temperature 0 is greedy.
        Pass a torch.Generator on the model's device for reproducible samples.
        """
        if prompt_ids.dim() != 2 or prompt_ids.shape[1] == 0:
            raise ValueError(f"prompt_ids must be [batch, prompt_length >= 1], got {tuple(prompt_ids.shape)}")
        state = None
        for t in range(prompt_ids.shape[1]):
            logits, state = self.decode_step(prompt_ids[:, t], state)
        tokens = [prompt_ids]
        for _ in range(max_new_tokens):
            if temperature == 0:
                next_ids = logits.argmax(dim=-1)
            else:
                probs = torch.softmax(logits.float() / temperature, dim=-1)
                next_ids = torch.multinomial(probs, 1, generator=generator)[:, 0]
            tokens.append(next_ids[:, None])
            logits, state = self.decode_step(next_ids, state)
        return torch.cat(tokens, dim=1)


def projection_seed(feature_seed: int, step: int, layer_index: int) -> int:
    """A 63-bit torch seed that mixes (feature_seed, step, layer) so that nearby triples are unrelated."""
    entropy = np.random.SeedSequence([feature_seed, step, layer_index]).generate_state(1, dtype=np.uint64)[0]
    return int(entropy >> np.uint64(1))


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Parameters of `module`, shared (tied) tensors counted once."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


# conf/attention/*.yaml holds `kind` plus these; conf/model/*.yaml holds every other field except the
# three that come from the data and the objective (vocab_size, pad_idx, causal).
ATTENTION_GROUP_FIELDS = ("nb_features", "feature_redraw_interval", "feature_seed",
                          "combiner_block_size", "combiner_variant", "rpe_exact_distance", "rpe_max_distance")
_CALLER_FIELDS = ("vocab_size", "pad_idx", "causal")


def config_from_hydra(model_cfg: Mapping[str, Any] | DictConfig, attention_cfg: Mapping[str, Any] | DictConfig,
                      *, vocab_size: int, pad_idx: int | None, causal: bool) -> PerformerConfig:
    """Merge the `model` and `attention` config groups into one PerformerConfig.

    model_cfg: sizes (d_model, n_layers, n_heads, d_ff, dropout, max_length, position, tie_embeddings).
    attention_cfg: `kind` (-> PerformerConfig.attention) and its options (ATTENTION_GROUP_FIELDS).
    vocab_size and pad_idx come from the Alphabet; causal from the objective (clm -> True).
    A key in the wrong group, or unknown to PerformerConfig, raises ValueError naming the group.
    """
    model = _plain_dict(model_cfg, "model")
    attention = _plain_dict(attention_cfg, "attention")
    if "kind" not in attention:
        raise ValueError(f"the attention config needs `kind` (one of {ATTENTION_KINDS}); got keys {sorted(attention)}")
    model_fields = {f.name for f in dataclasses.fields(PerformerConfig)} - set(ATTENTION_GROUP_FIELDS) - {
        "attention", *_CALLER_FIELDS}
    misplaced = sorted(set(attention) - {"kind", *ATTENTION_GROUP_FIELDS})
    if misplaced:
        raise ValueError(f"conf/attention: unknown or misplaced keys {misplaced}; the attention group takes `kind` "
                         f"and {list(ATTENTION_GROUP_FIELDS)} (sizes and positions belong in conf/model)")
    misplaced = sorted(set(model) - model_fields)
    if misplaced:
        raise ValueError(f"conf/model: unknown or misplaced keys {misplaced}; the model group takes "
                         f"{sorted(model_fields)} (attention options belong in conf/attention; vocab_size, "
                         "pad_idx and causal come from the alphabet and the objective)")
    attention["attention"] = attention.pop("kind")
    return PerformerConfig.from_dict({**model, **attention, "vocab_size": vocab_size, "pad_idx": pad_idx,
                                      "causal": causal})


def _plain_dict(cfg: Mapping[str, Any] | DictConfig, group: str) -> dict[str, Any]:
    if isinstance(cfg, DictConfig):
        container = OmegaConf.to_container(cfg, resolve=True)  # resolves e.g. ${seed} against the root
        assert isinstance(container, dict)
        return {str(key): value for key, value in container.items()}
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise TypeError(f"the {group} config must be a mapping or DictConfig, got {type(cfg).__name__}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"PerformerConfig: {message}")
