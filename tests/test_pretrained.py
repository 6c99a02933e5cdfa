"""Shared models: save_pretrained / from_pretrained round trips, versioned configs, damaged files, export."""
from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import pytest
import torch

from protein_performer import ProteinPerformer, load_model
from protein_performer.checkpoint import CheckpointError
from protein_performer.data import Alphabet
from protein_performer.embed import embed
from protein_performer.export import ExportError, export_checkpoint
from protein_performer.model import PerformerConfig
from protein_performer.model_card import training_summary
from protein_performer.pretrained import CONFIG_FILE, CONFIG_VERSION, WEIGHTS_FILE
from protein_performer.training.module import ProteinLM

ALPHABET = Alphabet()
KINDS = {  # every attention kind, favor_rpe windowed (default) and with the free bias
    "softmax": {}, "favor": {}, "favor_relu": {}, "favor_rpe": {},
    "favor_rpe-free": {"attention": "favor_rpe", "rpe_max_distance": None, "max_length": 64},
    "combiner": {"max_length": 64},
}
SEQUENCES = {"P1": "MKTAYIAKQRQISFVKSHFSRQ", "P2": "GSHMLEDPVDAFQ", "P3": "MADEEKLPPGWEKRMSRSSGRVYYFNHITNASQWERPSG"}


def tiny_config(attention: str = "favor", **changes) -> PerformerConfig:
    values = dict(vocab_size=len(ALPHABET), pad_idx=ALPHABET.pad_idx, d_model=32, n_layers=2, n_heads=2, d_ff=64,
                  dropout=0.0, attention=attention, nb_features=16, rpe_exact_distance=4, rpe_max_distance=8)
    return PerformerConfig(**{**values, **changes})


def trained_like(config: PerformerConfig) -> ProteinPerformer:
    """A model whose weights and random features differ from a fresh one of its config (as after training)."""
    torch.manual_seed(1)
    model = ProteinPerformer(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    model.redraw_projections(step=7)  # not the step-0 draw a fresh model of this config would make
    return model.eval()


def batch() -> torch.Tensor:
    rows = [[ALPHABET.cls_idx, *ALPHABET.encode(s), ALPHABET.eos_idx] for s in SEQUENCES.values()]
    width = max(map(len, rows))
    return torch.tensor([row + [ALPHABET.pad_idx] * (width - len(row)) for row in rows])


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_round_trip_gives_identical_logits_for_every_attention_kind(kind, causal, tmp_path):
    changes = {"attention": kind, **KINDS[kind], "causal": causal}
    model = trained_like(tiny_config(**changes))
    model.save_pretrained(tmp_path / "m")
    assert {p.name for p in (tmp_path / "m").iterdir()} == {CONFIG_FILE, WEIGHTS_FILE, "README.md"}

    loaded = ProteinPerformer.from_pretrained(tmp_path / "m")
    assert not loaded.training and loaded.config == model.config
    ids = batch()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    for name, tensor in model.state_dict().items():  # the projections as last drawn, not a fresh draw
        assert torch.equal(loaded.state_dict()[name], tensor), name
    if model.config.attention_kind.random_features:
        fresh = ProteinPerformer(model.config)
        assert any(not torch.equal(fresh.state_dict()[n], t) for n, t in loaded.state_dict().items()
                   if n.endswith("projection"))
    reloaded, alphabet = load_model(tmp_path / "m")  # load_model takes the directory too
    assert alphabet.tokens == ALPHABET.tokens and torch.equal(reloaded(ids).logits, loaded(ids).logits)


def test_config_json_is_versioned_and_names_the_alphabet(tmp_path):
    trained_like(tiny_config()).save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / CONFIG_FILE).read_text())
    assert saved["config_version"] == CONFIG_VERSION == 1
    assert saved["alphabet"] == list(ALPHABET.tokens)
    assert {k: v for k, v in saved.items() if k not in ("config_version", "alphabet")} == tiny_config().to_dict()


def test_an_unversioned_config_from_before_a_field_loads_as_a_checkpoint_would(tmp_path):
    # favor_rpe configs saved before the windowed bias existed had no rpe_max_distance: they meant the free bias.
    model = trained_like(tiny_config("favor_rpe", rpe_max_distance=None, max_length=64))
    model.save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / CONFIG_FILE
    old = json.loads(path.read_text())
    for key in ("config_version", "alphabet", "rpe_max_distance"):
        del old[key]
    path.write_text(json.dumps(old))
    loaded, _ = load_model(tmp_path / "m")
    assert loaded.config.rpe_max_distance is None and loaded.config == PerformerConfig.from_dict(old)
    with torch.no_grad():
        assert torch.equal(loaded(batch()).logits, model(batch()).logits)


def test_loading_never_unpickles(tmp_path, monkeypatch):
    trained_like(tiny_config()).save_pretrained(tmp_path / "m")

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling during from_pretrained")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    ProteinPerformer.from_pretrained(tmp_path / "m")


def damage(directory: Path, name: str, content: bytes | None) -> None:
    path = directory / name
    if content is None:
        path.unlink()
    else:
        path.write_bytes(content(path.read_bytes()) if callable(content) else content)


DAMAGED = {
    "weights-truncated": (WEIGHTS_FILE, lambda data: data[:len(data) // 2],
                          r"model\.safetensors: damaged or truncated"),
    "weights-garbage": (WEIGHTS_FILE, b"\x00" * 64, r"model\.safetensors: damaged or truncated"),
    "weights-missing": (WEIGHTS_FILE, None, r"model\.safetensors: missing"),
    "config-garbage": (CONFIG_FILE, b"{not json", r"config\.json: damaged, not JSON"),
    "config-a-list": (CONFIG_FILE, b"[1, 2]", r"config\.json: not a model config"),
    "config-bad-value": (CONFIG_FILE, lambda data: data.replace(b'"n_heads": 2', b'"n_heads": 3'),
                         r"config\.json: not a config this version can build .*not divisible by n_heads=3"),
    "config-newer": (CONFIG_FILE, lambda data: data.replace(b'"config_version": 1', b'"config_version": 99'),
                     r"config\.json: config_version 99 is newer"),
    "config-other-shape": (CONFIG_FILE, lambda data: data.replace(b'"d_ff": 64', b'"d_ff": 128'),
                           r"model\.safetensors: its weights do not fit the config in .*config\.json"),
}


@pytest.mark.parametrize("case", list(DAMAGED))
def test_a_damaged_directory_gets_one_line_naming_the_file(case, tmp_path):
    name, content, message = DAMAGED[case]
    trained_like(tiny_config()).save_pretrained(tmp_path / "m")
    damage(tmp_path / "m", name, content)
    with pytest.raises(CheckpointError, match=message) as error:
        load_model(tmp_path / "m")
    assert "\n" not in str(error.value)


def test_non_finite_weights_are_refused_unless_allowed(tmp_path):
    model = trained_like(tiny_config())
    with torch.no_grad():
        model.final_norm.weight[0] = float("nan")
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: 1 weight tensor\(s\) hold NaN"):
        ProteinPerformer.from_pretrained(tmp_path / "m")
    assert ProteinPerformer.from_pretrained(tmp_path / "m", allow_non_finite=True).final_norm.weight[0].isnan()


def test_a_missing_directory_is_not_looked_up_online_unless_it_names_a_repository(tmp_path):
    with pytest.raises(CheckpointError, match=r"not a model directory .* nor a Hub repository id"):
        ProteinPerformer.from_pretrained(tmp_path / "nowhere" / "deeper")
    with pytest.raises(CheckpointError, match=r"does not exist"):
        load_model(tmp_path / "nowhere")  # load_model never goes to the Hub


# ---- export --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A checkpoint as training writes it, with the final evaluation and token count train records."""
    torch.manual_seed(0)
    module = ProteinLM(tiny_config().to_dict(), "mlm", alphabet_tokens=ALPHABET.tokens)
    module.model.redraw_projections(step=3)
    evaluation = {"metrics": {"val/perplexity": 14.7372, "val/perplexity_masked": 15.1234, "test/perplexity": 14.5551,
                              "val/baseline_frequency_perplexity": 17.9901, "val/baseline_uniform_perplexity": 20.0},
                  "targets": 20924, "split_sizes": {"train": 17346, "valid": 361, "test": 363, "ood": 0}}
    path = tmp_path_factory.mktemp("ckpt") / "last.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "global_step": 350,
                "tokens_seen": 2_123_456, "evaluation": evaluation, "pytorch-lightning_version": "2.6.6",
                "datamodule_hyper_parameters": {"fasta": "/somewhere/swissprot_subset.fasta.gz", "sampling": "single",
                                                "max_length": 512, "valid_fraction": 0.02, "test_fraction": 0.02}},
               path)
    return path


def test_export_writes_a_directory_whose_model_and_embeddings_equal_the_checkpoints(checkpoint, tmp_path):
    output = export_checkpoint(checkpoint, tmp_path / "demo-model")
    from_ckpt, alphabet = load_model(checkpoint)
    from_dir, _ = load_model(output)
    with torch.no_grad():
        assert torch.equal(from_dir(batch()).logits, from_ckpt(batch()).logits)
    a = embed(from_ckpt, alphabet, SEQUENCES, include=["mean", "per_residue"])
    b = embed(from_dir, alphabet, SEQUENCES, include=["mean", "per_residue"])
    for protein in SEQUENCES:
        assert torch.equal(torch.as_tensor(a.residues(protein, -1)), torch.as_tensor(b.residues(protein, -1)))
    assert not list(tmp_path.glob(".*tmp*")), "the staging directory is gone"


def test_model_card_comes_from_the_checkpoint(checkpoint, tmp_path):
    card = (export_checkpoint(checkpoint, tmp_path / "demo-model") / "README.md").read_text()
    config = tiny_config()
    expected = [
        f"{ProteinPerformer(config).num_parameters():,} parameters", "2 pre-LayerNorm blocks", "d_model 32",
        "Attention `favor`: nb_features 16", "masked language model",
        "`swissprot_subset.fasta.gz`: 18,070 records (train 17,346, valid 361, test 363, ood 0)",
        "valid_fraction 0.02, test_fraction 0.02", "Optimizer steps: 350; tokens seen: 2,123,456",
        "| validation | 14.737 |", "| validation, positions shown as `<mask>` only | 15.123 |", "| test | 14.555 |",
        "| frequency baseline (ignores the sequence), on the validation targets | 17.990 |", "(20,924 of them)",
        "protein-performer-embed checkpoint=", "from_pretrained",
    ]
    missing = [text for text in expected if text not in card]
    assert not missing, f"not in the card: {missing}\n{card}"
    assert "/somewhere" not in card  # the data file's name, not this machine's path


def test_card_of_a_checkpoint_without_a_record_says_so(checkpoint, tmp_path):
    saved = torch.load(checkpoint, weights_only=True)
    for key in ("evaluation", "tokens_seen"):
        del saved[key]
    torch.save(saved, tmp_path / "old.ckpt")
    card = (export_checkpoint(tmp_path / "old.ckpt", tmp_path / "m") / "README.md").read_text()
    assert "No final evaluation was recorded" in card and "tokens seen" not in card
    assert training_summary(saved)["steps"] == 350


def test_export_refuses_an_existing_output_unless_overwrite(checkpoint, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "keep").write_text("x")
    with pytest.raises(ExportError, match=r"m: already exists; .*overwrite=true"):
        export_checkpoint(checkpoint, tmp_path / "m")
    assert (tmp_path / "m" / "keep").exists()
    export_checkpoint(checkpoint, tmp_path / "m", overwrite=True)
    assert not (tmp_path / "m" / "keep").exists() and (tmp_path / "m" / WEIGHTS_FILE).is_file()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match=r"file: is a file"):
        export_checkpoint(checkpoint, tmp_path / "file", overwrite=True)
    with pytest.raises(CheckpointError, match=r"nope\.ckpt does not exist"):
        export_checkpoint(tmp_path / "nope.ckpt", tmp_path / "m2")
    assert not (tmp_path / "m2").exists()


def test_the_card_reads_as_one_line_error_free_markdown(checkpoint, tmp_path):
    card = (export_checkpoint(checkpoint, tmp_path / "m") / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: protein-performer\n")
    assert re.search(r"^# m: a protein masked language model with `favor` attention$", card, re.M)


def test_the_embed_command_takes_an_exported_directory(checkpoint, tmp_path):
    from hydra import compose, initialize_config_dir

    from protein_performer.embed import load_embeddings, run
    from protein_performer.resources import conf_dir

    fasta = tmp_path / "p.fasta"
    fasta.write_text("".join(f">{name}\n{sequence}\n" for name, sequence in SEQUENCES.items()))
    exported = export_checkpoint(checkpoint, tmp_path / "m")
    outputs = {}
    for source in (checkpoint, exported):
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = compose("embed", overrides=[f"checkpoint={source}", f"input={fasta}", "include=[mean,per_residue]",
                                              f"output={tmp_path / (source.name + '.h5')}", "progress=false"])
        outputs[source] = load_embeddings(run(cfg))
    a, b = outputs.values()
    assert list(a.ids) == list(b.ids) == list(SEQUENCES)
    assert torch.equal(torch.as_tensor(a.mean[-1][:]), torch.as_tensor(b.mean[-1][:]))
    assert torch.equal(torch.as_tensor(a.per_residue[-1][:]), torch.as_tensor(b.per_residue[-1][:]))


@pytest.mark.slow
def test_a_run_with_export_ends_by_exporting_next_to_its_checkpoint(tmp_path, capsys):
    from protein_performer.train import compose_config, train

    overrides = ["model=tiny", "trainer=cpu", "logger=none", "data=sample", "data.max_length=64",
                 "data.tokens_per_batch=512", "callbacks.progress_bar.refresh_rate=0", "trainer.max_steps=4",
                 "trainer.val_check_interval=2", "trainer.limit_val_batches=2", "+trainer.limit_test_batches=2",
                 f"data.cache_dir={tmp_path / 'cache'}", "export=true"]
    result = train(compose_config(overrides, tmp_path / "run"))
    printed = capsys.readouterr().out
    exported = tmp_path / "run" / "model"
    assert f"checkpoint: {result.checkpoint}" in printed and f"exported model: {exported}" in printed
    from_ckpt, _ = load_model(result.checkpoint)
    from_dir, _ = load_model(exported)
    with torch.no_grad():
        assert torch.equal(from_dir(batch()).logits, from_ckpt(batch()).logits)
    saved = torch.load(result.checkpoint, weights_only=True)
    assert saved["tokens_seen"] > 0 and saved["evaluation"]["metrics"]["val/perplexity"] == result.val_perplexity
    card = (exported / "README.md").read_text()
    assert f"| validation | {result.val_perplexity:.3f} |" in card
    assert f"| test | {result.metrics['test/perplexity']:.3f} |" in card
    assert f"Optimizer steps: 4; tokens seen: {saved['tokens_seen']:,}" in card
