"""PerformerConfig, the one typed config of a model, and ATTENTION, the registry of attention kinds.

Reading order: the registry (one AttentionKind row per kind: how a layer calls its op, whether it holds
random features or a relative bias, when causal decoding has a recurrent state, how long an input may
be, its defaults) -> PerformerConfig (every knob, validated; the kind's row fills its defaults) ->
config_from_hydra (the seam with `conf/model/*.yaml` + `conf/attention/*.yaml`).

Adding an attention kind: its op in `protein_performer.ops`, one row in ATTENTION, one file
`conf/attention/<kind>.yaml`; `SelfAttention`, the model and the tests read the row.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from protein_performer import ops
from protein_performer.ops.combiner import default_block_size

POSITION_KINDS = ("rotary", "learned", "none")
# What a position counts from: the window's first token, or the last <cls>/<eos> before it, so that every
# member of a homolog window numbers its residues 1, 2, ... (PoET's within-sequence positions).
POSITION_SCOPES = ("window", "member")
BAND_ORDERS = ("sequence", "member")
COMBINER_VARIANTS = ("fixed", "axial")


# --------------------------------------------------------------------------------------------------
# the registry of attention kinds
# --------------------------------------------------------------------------------------------------


class AttentionLayer(Protocol):
    """What a kind's row reads from the layer that owns its weights (`nn.SelfAttention`)."""

    causal: bool
    projection: Tensor | None  # [nb_features, head_dim] for kinds with random features
    combiner_block_size: int | None
    combiner_variant: str
    exact_window: int  # favor: exact softmax weights for |i//w - j//w| <= 1, w = exact_window (0 = off)

    def oprf_a(self, q: Tensor, k: Tensor, key_padding_mask: Tensor | None) -> Tensor | None: ...

    def relative_bias(self, length: int) -> Tensor | ops.WindowedBias: ...


Attend = Callable[[AttentionLayer, Tensor, Tensor, Tensor, "Tensor | None"], Tensor]
Weights = Callable[[AttentionLayer, Tensor, Tensor, "Tensor | None"], Tensor]
Step = Callable[[AttentionLayer, Tensor, Tensor, Tensor, int, Any], "tuple[Tensor, Any]"]


@dataclass(frozen=True)
class AttentionKind:
    """One attention kind: how a layer calls its op, and what the rest of the model needs to know.

    attend(layer, q, k, v, key_padding_mask) -> [batch, heads, length, head_dim];
    weights(layer, q, k, key_padding_mask) -> the [batch, heads, L, L] matrix attend applies to v;
    step(layer, q_t, k_t, v_t, position, state) -> (out_t, state): one causal decoding step on
        [batch, heads, head_dim], None for kinds without a recurrent state.
    """

    name: str
    attend: Attend
    weights: Weights
    step: Step | None = None
    random_features: bool = False  # holds a projection buffer, redrawn during training
    relative_bias: bool = False  # learns a relative-position bias (so it needs no other position signal)
    # True, False, or decided by the config: can a causal layer decode one token at a time?
    recurrent: bool | Callable[[PerformerConfig], bool] = False
    # A causal layer reads no padding mask on right-padded batches: right padding lies in every real
    # position's future, so outputs at real positions are those of the masked call, and the unmasked
    # call is the faster one (softmax: SDPA's is_causal kernels, flash on GPUs, instead of a dense mask).
    unmasked_right_padding: bool = False
    # Longest input the kind's parameters cover, from the config; None: any length.
    length_bound: Callable[[PerformerConfig], int | None] = lambda config: None
    # Values for the config fields left None (position: "rotary" unless the row says otherwise).
    defaults: Mapping[str, Callable[[PerformerConfig], Any]] = field(default_factory=dict)
    # Fields absent from configs saved before they existed, and the value such a model was trained with.
    legacy_defaults: Mapping[str, Any] = field(default_factory=dict)
    # Options of the random features this kind honours (others must keep their defaults, FEATURE_OPTIONS).
    feature_options: frozenset[str] = frozenset()

    def is_recurrent(self, config: PerformerConfig) -> bool:
        return self.recurrent(config) if callable(self.recurrent) else self.recurrent


def _softmax_attend(layer, q, k, v, key_padding_mask):
    return ops.softmax_attention(q, k, v, causal=layer.causal, key_padding_mask=key_padding_mask)


def _softmax_weights(layer, q, k, key_padding_mask):
    return ops.softmax_attention_weights(q, k, causal=layer.causal, key_padding_mask=key_padding_mask)


def _favor_kind(name: str, kernel: ops.favor.Kernel, options: frozenset[str]) -> AttentionKind:
    """FAVOR+ with the given feature kernel: random features, a constant-size causal state. The softmax
    kernel adds FAVOR++ features (layer.oprf_a) and an exact local band (layer.exact_window)."""

    def attend(layer, q, k, v, key_padding_mask):
        oprf_a = layer.oprf_a(q, k, key_padding_mask)
        if layer.exact_window:
            return ops.favor_window_attention(q, k, v, layer.projection, layer.exact_window, causal=layer.causal,
                                              key_padding_mask=key_padding_mask, oprf_a=oprf_a)
        return ops.favor_attention(q, k, v, layer.projection, causal=layer.causal, kernel=kernel,
                                   key_padding_mask=key_padding_mask, oprf_a=oprf_a)

    def weights(layer, q, k, key_padding_mask):
        oprf_a = layer.oprf_a(q, k, key_padding_mask)
        if layer.exact_window:
            return ops.implied_window_attention(q, k, layer.projection, layer.exact_window, causal=layer.causal,
                                                key_padding_mask=key_padding_mask, oprf_a=oprf_a)
        return ops.implied_attention(q, k, layer.projection, causal=layer.causal, kernel=kernel,
                                     key_padding_mask=key_padding_mask, oprf_a=oprf_a)

    def step(layer, q, k, v, position, state):
        oprf_a = layer.oprf_a(q[:, :, None], k[:, :, None], None)
        if layer.exact_window:
            return ops.favor_window_causal_step(q, k, v, layer.projection, layer.exact_window, state, oprf_a=oprf_a)
        return ops.favor_causal_step(q, k, v, layer.projection, state, kernel=kernel, oprf_a=oprf_a)

    return AttentionKind(name, attend, weights, step, random_features=True, recurrent=True, feature_options=options)


def _rpe_attend(layer, q, k, v, key_padding_mask):
    return ops.favor_rpe_attention(q, k, v, layer.projection, layer.relative_bias(q.shape[-2]), causal=layer.causal,
                                   key_padding_mask=key_padding_mask)


def _rpe_weights(layer, q, k, key_padding_mask):
    return ops.implied_rpe_attention(q, k, layer.projection, layer.relative_bias(q.shape[-2]), causal=layer.causal,
                                     key_padding_mask=key_padding_mask)


def _rpe_step(layer, q, k, v, position, state):
    return ops.favor_rpe_causal_step(q, k, v, layer.projection, layer.relative_bias(position + 1), state)


def _combiner_attend(layer, q, k, v, key_padding_mask):
    return ops.combiner_attention(q, k, v, causal=layer.causal, block_size=layer.combiner_block_size,
                                  variant=layer.combiner_variant, key_padding_mask=key_padding_mask)


def _combiner_weights(layer, q, k, key_padding_mask):
    return ops.combiner_attention_weights(q, k, causal=layer.causal, block_size=layer.combiner_block_size,
                                          variant=layer.combiner_variant, key_padding_mask=key_padding_mask)


ATTENTION: dict[str, AttentionKind] = {row.name: row for row in (
    # Exact softmax attention (torch SDPA): the quadratic baseline every other kind is compared with.
    AttentionKind("softmax", _softmax_attend, _softmax_weights, unmasked_right_padding=True),
    _favor_kind("favor", "softmax", frozenset({"features", "coupling", "exact_window", "band_order"})),
    _favor_kind("favor_relu", "relu", frozenset({"coupling"})),
    AttentionKind(
        "favor_rpe", _rpe_attend, _rpe_weights, _rpe_step, random_features=True, relative_bias=True,
        # a windowed bias keeps the last w keys plus a far state; the free bias reaches every past offset
        recurrent=lambda config: config.rpe_max_distance is not None, feature_options=frozenset({"coupling"}),
        # the free bias has one value per offset up to max_length; the windowed one fits any length
        length_bound=lambda config: config.max_length if config.rpe_max_distance is None else None,
        defaults={"position": lambda config: "none"},  # positions come from the bias
        legacy_defaults={"rpe_max_distance": None},  # saved before the windowed bias: the free bias
    ),
    AttentionKind(
        "combiner", _combiner_attend, _combiner_weights,
        # one block size per model (from max_length, not each batch's padded length) keeps the block
        # partition, and so every output, independent of how much padding a batch carries
        defaults={"combiner_block_size": lambda config: default_block_size(config.max_length)},
    ),
)}

# The random-feature options and their defaults (today's FAVOR+); a kind honours those in its feature_options.
FEATURE_OPTIONS: dict[str, Any] = {"features": "positive", "coupling": "orthogonal", "exact_window": 0,
                                   "band_order": "sequence"}

# Names that other code and DESIGN.md use, derived from the rows.
ATTENTION_KINDS = tuple(ATTENTION)
RANDOM_FEATURE_KINDS = tuple(name for name, row in ATTENTION.items() if row.random_features)
# Kinds whose causal layers always have a constant-size recurrent state (favor_rpe: only when windowed).
RECURRENT_KINDS = tuple(name for name, row in ATTENTION.items() if row.recurrent is True)


# --------------------------------------------------------------------------------------------------
# the config
# --------------------------------------------------------------------------------------------------


def _alphabet_size() -> int:
    from protein_performer.data.alphabet import Alphabet  # on first use: the data package reads FASTA too

    return len(Alphabet())


@dataclass
class PerformerConfig:
    """Everything that defines a ProteinPerformer; `conf/model` + `conf/attention` map onto it field by field."""

    vocab_size: int = field(default_factory=_alphabet_size)  # rows of the embedding and LM head: len(Alphabet())
    d_model: int = 512  # width of the residual stream
    n_layers: int = 6  # Transformer blocks
    n_heads: int = 8  # attention heads; each is d_model // n_heads wide
    d_ff: int = 2048  # hidden width of each feed-forward network
    dropout: float = 0.1  # on embeddings and on each residual branch (the Performer paper's 0.1)
    attention: str = "favor"  # a row of ATTENTION: "softmax" | "favor" | "favor_relu" | "favor_rpe" | "combiner"
    causal: bool = False  # True: position i sees keys <= i (causal LM); False: all keys (masked LM)
    nb_features: int = 256  # random features per head for the favor kinds (the paper's m = 256)
    feature_redraw_interval: int = 1000  # optimizer steps between redraws (the training callback); 0 = never
    feature_seed: int = 0  # projections derive from (feature_seed, step, layer): equal on all DDP ranks
    position: str | None = None  # "rotary" | "learned" | "none"; None: "none" for favor_rpe, else "rotary"
    position_scope: str = "window"  # "window": positions count from the input's start; "member": from the
    #                                 last <cls>/<eos>, so aligned residues of homologs share a position
    max_length: int = 1024  # longest input for learned positions and a full favor_rpe bias (others: any length)
    tie_embeddings: bool = True  # the LM head reuses the token embedding matrix (fewer parameters, better LM)
    pad_idx: int | None = None  # padding token id: its embedding row starts at zero and gets no gradient
    combiner_block_size: int | None = None  # Combiner block size; None = ceil(sqrt(max_length)) for combiner
    combiner_variant: str = "fixed"  # Combiner factorisation: "fixed" | "axial"
    rpe_exact_distance: int = 32  # favor_rpe: one learned bias per offset |j - i| below this (then log buckets)
    rpe_max_distance: int | None = 128  # favor_rpe: window w, one bias per direction beyond; None: free bias
    #                                     over every offset up to max_length (the paper's form, FFT/dense)
    features: str = "positive"  # favor: "positive" (FAVOR+) | "oprf" (FAVOR++, data-dependent, lower variance)
    coupling: str = "orthogonal"  # random-feature directions: "orthogonal" blocks | "simplex" (lower variance)
    exact_window: int = 0  # favor: exact weights for |i//w - j//w| <= 1 (all |i-j| < w), FAVOR beyond; 0 = off
    band_order: str = "sequence"  # favor with exact_window: the order the band is taken in; "member": tokens
    #                               sorted by position within their member, so the band holds the residues at
    #                               nearby positions of every member (homologs' aligned residues)

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
        _require(self.attention in ATTENTION,
                 f"unknown attention kind {self.attention!r}; choose one of {ATTENTION_KINDS}")
        _require(self.combiner_variant in COMBINER_VARIANTS,
                 f"unknown combiner_variant {self.combiner_variant!r}; choose one of {COMBINER_VARIANTS}")
        _require(self.pad_idx is None or (_is_int(self.pad_idx) and 0 <= self.pad_idx < self.vocab_size),
                 f"pad_idx must be None or an id in [0, vocab_size={self.vocab_size}), got {self.pad_idx!r}")
        _require(_is_int(self.rpe_exact_distance) and self.rpe_exact_distance > 0,
                 f"rpe_exact_distance must be a positive integer, got {self.rpe_exact_distance!r}")
        _require(self.rpe_max_distance is None or (_is_int(self.rpe_max_distance) and self.rpe_max_distance > 0),
                 f"rpe_max_distance (the favor_rpe window w) must be a positive integer or null (a free bias over "
                 f"every offset), got {self.rpe_max_distance!r}")
        _require(self.rpe_max_distance is None or self.rpe_exact_distance <= self.rpe_max_distance,
                 f"rpe_exact_distance={self.rpe_exact_distance} exceeds rpe_max_distance={self.rpe_max_distance}; "
                 "exact offsets must fit inside the window")
        _require(self.features in ops.favor.FEATURE_MAPS,
                 f"unknown features {self.features!r}; choose one of {ops.favor.FEATURE_MAPS}")
        _require(self.coupling in ops.favor.COUPLINGS,
                 f"unknown coupling {self.coupling!r}; choose one of {ops.favor.COUPLINGS}")
        _require(_is_int(self.exact_window) and self.exact_window >= 0,
                 f"exact_window must be a non-negative integer (0 = off), got {self.exact_window!r}")
        _require(self.band_order in BAND_ORDERS,
                 f"unknown band_order {self.band_order!r}; choose one of {BAND_ORDERS}")
        for name, default in FEATURE_OPTIONS.items():
            kinds = [kind for kind, row in ATTENTION.items() if name in row.feature_options]
            _require(getattr(self, name) == default or name in self.attention_kind.feature_options,
                     f"{name}={getattr(self, name)!r} is not available with attention={self.attention!r}, which "
                     f"allows only {name}={default!r}; {name} is an option of attention in {kinds}")
        block_size = self.combiner_block_size
        _require(block_size is None or (_is_int(block_size) and block_size > 0),
                 f"combiner_block_size must be a positive integer or None, got {self.combiner_block_size!r}")

        for name, default in self.attention_kind.defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, default(self))
        if self.position is None:
            self.position = "rotary"
        _require(self.position in POSITION_KINDS,
                 f"unknown position {self.position!r}; choose one of {POSITION_KINDS} (or null for the default)")
        _require(self.position != "rotary" or (self.d_model // self.n_heads) % 2 == 0,
                 f"rotary positions rotate channel pairs, so the head width d_model // n_heads = "
                 f"{self.d_model // self.n_heads} must be even; change d_model/n_heads or the position")
        _require(self.position_scope in POSITION_SCOPES,
                 f"unknown position_scope {self.position_scope!r}; choose one of {POSITION_SCOPES}")
        _require(self.position_scope == "window" or self.position in ("rotary", "learned"),
                 f"position_scope='member' restarts rotary or learned positions at each member, but this model "
                 f"has position={self.position!r} (attention={self.attention!r}); use position_scope='window'")
        # The member order sorts tokens by their position within their member: it needs those positions and a
        # band to take.
        _require(self.band_order == "sequence" or (self.exact_window > 0 and self.position_scope == "member"),
                 f"band_order='member' takes the exact band over tokens sorted by their position within their "
                 f"member: it needs exact_window > 0 (got {self.exact_window}) and position_scope='member' (got "
                 f"{self.position_scope!r})")
        # Bidirectional attention is permutation-equivariant: without positions an MLM cannot see residue
        # order at all. A causal model still can (the mask breaks the symmetry), so that combination stays.
        _require(self.position != "none" or self.causal or self.attention_kind.relative_bias,
                 f"position='none' with bidirectional attention={self.attention!r} leaves the model blind to "
                 "residue order; use position='rotary' or 'learned', attention='favor_rpe', or causal=True")

    @property
    def attention_kind(self) -> AttentionKind:
        """This config's row of the ATTENTION registry."""
        return ATTENTION[self.attention]

    @property
    def longest_input(self) -> int | None:
        """The longest input this model takes (learned positions, a full favor_rpe bias), None: any length."""
        bounds = [self.attention_kind.length_bound(self), self.max_length if self.position == "learned" else None]
        known = [bound for bound in bounds if bound is not None]
        return min(known) if known else None

    @property
    def recurrent_kind(self) -> bool:
        """True when this config's attention has a constant-size causal state (band_order='member' has
        none: a new token's band is the keys at nearby member positions anywhere before it)."""
        return self.attention_kind.is_recurrent(self) and self.band_order == "sequence"

    @property
    def recurrent(self) -> bool:
        """True when a causal model of this config can decode one token at a time (constant memory)."""
        return self.causal and self.recurrent_kind

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> PerformerConfig:
        """Build from a plain mapping (e.g. a checkpoint's saved config); unknown keys raise ValueError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        _require(not unknown, f"unknown PerformerConfig keys {unknown}; valid keys are {sorted(known)}")
        row = ATTENTION.get(values.get("attention", cls.attention))
        if row is not None:  # an unknown kind meets its error in __post_init__
            values = {**row.legacy_defaults, **values}
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-friendly dict; from_dict(to_dict()) rebuilds an equal config."""
        return dataclasses.asdict(self)

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.d_model // self.n_heads


# --------------------------------------------------------------------------------------------------
# the Hydra seam
# --------------------------------------------------------------------------------------------------

# conf/attention/*.yaml holds `kind` plus these; conf/model/*.yaml holds every other field except the
# three that come from the data and the objective (vocab_size, pad_idx, causal).
ATTENTION_GROUP_FIELDS = ("nb_features", "feature_redraw_interval", "feature_seed",
                          "combiner_block_size", "combiner_variant", "rpe_exact_distance", "rpe_max_distance",
                          "features", "coupling", "exact_window", "band_order")
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
