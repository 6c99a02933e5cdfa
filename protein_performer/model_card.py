"""The README.md model card of an exported model, built only from what the model and its checkpoint hold.

`training_summary(checkpoint)` reads a training checkpoint (as `protein_performer.train` writes it) into
a plain dict: data file, records per split and the split rule, steps and tokens seen, the final metrics
with their frequency baseline. `render_model_card(model, summary)` writes the card; without a summary
(a bare `save_pretrained`) it says what the model is and how to load it, and nothing about training.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from protein_performer.config import ATTENTION, ATTENTION_GROUP_FIELDS, PerformerConfig

__all__ = ["render_model_card", "training_summary"]

# Metrics shown in the evaluation table, in this order (present ones only): (key, what it scores).
_EVALUATIONS = (
    ("val/perplexity", "validation"),
    ("val/perplexity_masked", "validation, positions shown as `<mask>` only"),
    ("test/perplexity", "test"),
    ("test/perplexity_masked", "test, positions shown as `<mask>` only"),
    ("ood/perplexity", "out-of-distribution hold-out"),
)
_BASELINES = ("frequency", "uniform")


def training_summary(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """What a training checkpoint says about how its weights were made (plain values, JSON-friendly)."""
    hparams = checkpoint.get("hyper_parameters", {})
    data = dict(checkpoint.get("datamodule_hyper_parameters") or {})
    evaluation = dict(checkpoint.get("evaluation") or {})
    source = data.get("store") or data.get("fasta")
    split_rule = {key: data[key] for key in ("valid_fraction", "test_fraction", "ood_regex", "ood_accessions",
                                             "clusters") if data.get(key) is not None}
    return {
        "objective": hparams.get("objective"),
        "seed": hparams.get("seed"),
        "data_file": Path(str(source)).name if source else None,
        "sampling": {key: data[key] for key in ("sampling", "max_length", "tokens_per_batch", "batch_size")
                     if data.get(key) is not None},
        "split_rule": split_rule,
        "split_sizes": evaluation.get("split_sizes"),
        "steps": checkpoint.get("global_step"),
        "tokens_seen": checkpoint.get("tokens_seen"),
        "optimizer": {key: hparams[key] for key in ("lr", "warmup_steps", "weight_decay", "decay")
                      if key in hparams},
        "metrics": {key: float(value) for key, value in (evaluation.get("metrics") or {}).items()},
        "targets": evaluation.get("targets"),
        "lightning_version": checkpoint.get("pytorch-lightning_version"),
    }


def _attention_settings(config: PerformerConfig) -> dict[str, Any]:
    """The attention group's fields that mean something for this config's kind, plus its positions."""
    row = ATTENTION[config.attention]

    def applies(name: str) -> bool:
        if name.startswith("rpe_"):
            return row.relative_bias
        if name.startswith("combiner_"):
            return config.attention == "combiner"
        return row.random_features

    settings = {name: getattr(config, name) for name in ATTENTION_GROUP_FIELDS
                if hasattr(config, name) and applies(name)}
    return {**settings, "position": config.position, "causal": config.causal}


def _number(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def render_model_card(model: Any, summary: Mapping[str, Any] | None = None, *, name: str = "this model") -> str:
    """README.md text for `model` (a ProteinPerformer); `summary` from training_summary adds the training."""
    from protein_performer import __version__

    config: PerformerConfig = model.config
    objective = (summary or {}).get("objective") or ("clm" if config.causal else "mlm")
    task = "causal (next-residue) language model" if objective == "clm" else "masked language model"
    lines = ["---", "library_name: protein-performer", "tags:", "- protein-language-model", "- performer",
             f"- {config.attention}", "---", "",
             f"# {name}: a protein {task} with `{config.attention}` attention", "",
             "## Architecture", "",
             f"ProteinPerformer, {model.num_parameters():,} parameters: {config.n_layers} pre-LayerNorm blocks, "
             f"d_model {config.d_model}, {config.n_heads} heads of {config.head_dim}, feed-forward {config.d_ff}, "
             f"vocabulary {config.vocab_size}, dropout {config.dropout}"
             f"{', LM head tied to the token embedding' if config.tie_embeddings else ''}.", "",
             f"Attention `{config.attention}`: "
             + ", ".join(f"{key} {_number(value)}" for key, value in _attention_settings(config).items()) + ".", ""]
    if summary:
        lines += _training_section(summary)
    source = "<this directory or Hub repository>"
    lines += ["## Use", "",
              "```python",
              "import torch",
              "from protein_performer import ProteinPerformer, load_model",
              "",
              f'model, alphabet = load_model("{source}")  # or ProteinPerformer.from_pretrained(...)',
              "ids = torch.tensor([[alphabet.cls_idx, *alphabet.encode(\"MKTAYIAKQR\"), alphabet.eos_idx]])",
              "with torch.no_grad():",
              "    out = model(ids, repr_layers=[-1])",
              "out.logits, out.hidden_states[model.config.n_layers]",
              "```", "",
              "Embeddings of a FASTA file into columnar HDF5:", "",
              "```bash",
              f"protein-performer-embed checkpoint={source} input=proteins.fasta output=emb.h5",
              "```", "",
              f"Written by protein-performer {__version__}. Loading reads `config.json` and `model.safetensors` "
              "only; nothing is unpickled.", ""]
    return "\n".join(lines)


def _training_section(summary: Mapping[str, Any]) -> list[str]:
    lines = ["## Training", ""]
    data_file = summary.get("data_file")
    sizes = summary.get("split_sizes")
    if data_file:
        records = (f": {sum(sizes.values()):,} records (" + ", ".join(f"{split} {count:,}"
                                                                      for split, count in sizes.items()) + ")"
                   if sizes else "")
        lines.append(f"- Data: `{data_file}`{records}.")
    rule = summary.get("split_rule") or {}
    if rule:
        parts = [f"{key} {value}" for key, value in rule.items()]
        lines.append("- Splits: by a hash of each record's accession"
                     + (" (clusters kept whole)" if "clusters" in rule else "") + "; " + ", ".join(parts) + ".")
    if summary.get("sampling"):
        lines.append("- Batches: " + ", ".join(f"{key} {_number(value)}" for key, value in summary["sampling"].items())
                     + ".")
    steps, tokens = summary.get("steps"), summary.get("tokens_seen")
    if steps is not None:
        lines.append(f"- Optimizer steps: {steps:,}" + (f"; tokens seen: {tokens:,} (non-padding)"
                                                         if tokens is not None else "") + ".")
    if summary.get("optimizer"):
        lines.append("- Optimizer: AdamW, " + ", ".join(f"{key} {value}" for key, value in summary["optimizer"].items())
                     + (f", seed {summary['seed']}" if summary.get("seed") is not None else "") + ".")
    lines.append("")
    metrics = summary.get("metrics") or {}
    rows = [(label, metrics[key]) for key, label in _EVALUATIONS if key in metrics]
    if rows:
        lines += ["## Evaluation", "", "| perplexity on | value |", "|---|---:|"]
        lines += [f"| {label} | {value:.3f} |" for label, value in rows]
        baselines = [(kind, metrics[f"val/baseline_{kind}_perplexity"]) for kind in _BASELINES
                     if f"val/baseline_{kind}_perplexity" in metrics]
        targets = summary.get("targets")
        lines += [f"| {kind} baseline (ignores the sequence), on the validation targets | {value:.3f} |"
                  for kind, value in baselines]
        lines += ["", "The frequency baseline predicts the training split's amino-acid frequencies at every position; "
                  "it is scored on the same validation targets as the model"
                  + (f" ({targets:,} of them)" if targets else "") + ".", ""]
    else:
        lines += ["No final evaluation was recorded in the checkpoint (it predates that record, or the run did "
                  "not finish).", ""]
    return lines
