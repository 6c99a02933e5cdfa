"""Embeddings: the in-memory API, the resumable HDF5 writer, and the command line (protein_performer.embed)."""
from __future__ import annotations

import gzip
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hydra import compose as compose_config
from hydra import initialize_config_dir
from omegaconf import DictConfig

import protein_performer.embed as embed_module
from protein_performer.data import Alphabet, read_fasta
from protein_performer.embed import (
    EmbedError,
    _plan_batches,
    _settings,
    embed,
    embed_fasta,
    load_embeddings,
    run_cli,
)
from protein_performer.maps import tokenize
from protein_performer.model import PerformerConfig, ProteinPerformer
from protein_performer.training.module import ProteinLM

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


@pytest.fixture(scope="module")
def alphabet() -> Alphabet:
    return Alphabet()


@pytest.fixture(scope="module")
def flip_records(data_dir) -> list[tuple[str, str]]:
    """The first 40 FLIP chains (real PDB sequences, 20 to ~800 residues)."""
    records = read_fasta(data_dir / "flip_ss_sequences.fasta.gz")
    return [(record.accession, record.sequence) for _, record in zip(range(40), records)]


def tiny_model(alphabet: Alphabet, attention: str = "favor", *, position: str | None = None,
               max_length: int = 1024, n_layers: int = 2) -> ProteinPerformer:
    torch.manual_seed(0)
    config = PerformerConfig(vocab_size=len(alphabet), d_model=32, n_layers=n_layers, n_heads=2, d_ff=64,
                             dropout=0.0, attention=attention, nb_features=32, position=position,
                             max_length=max_length, pad_idx=alphabet.pad_idx)
    return ProteinPerformer(config).eval()


def reference(model: ProteinPerformer, alphabet: Alphabet, sequence: str, layer: int = -1) -> torch.Tensor:
    """Hidden states [L + 2, D] of one protein fed alone (no batch, no padding): <cls> residues <eos>."""
    return references(model, alphabet, sequence, [layer])[layer % (model.config.n_layers + 1)]


def references(model: ProteinPerformer, alphabet: Alphabet, sequence: str,
               layers: list[int]) -> dict[int, torch.Tensor]:
    with torch.no_grad():
        out = model(tokenize(alphabet, sequence)[None], repr_layers=layers)
    return {layer: states[0] for layer, states in out.hidden_states.items()}


def write_fasta(path: Path, records: list[tuple[str, str]]) -> Path:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt") as handle:
        for protein_id, sequence in records:
            handle.write(f">{protein_id} some description\n")
            for start in range(0, len(sequence), 60):
                handle.write(sequence[start:start + 60] + "\n")
    return path


# ---- in memory -------------------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["softmax", "favor"])
def test_batched_embeddings_equal_each_protein_alone(alphabet, flip_records, attention):
    """Length-sorted, padded batches change nothing: padding is invisible and order is restored."""
    model = tiny_model(alphabet, attention)
    records = flip_records[:10]
    sequences = {protein_id: sequence for protein_id, sequence in records}
    result = embed(model, alphabet, sequences, layers=[0, 1, -1], include=["mean", "per_residue", "cls"],
                   max_tokens=1200)
    assert result.ids == [protein_id for protein_id, _ in records]
    assert result.layers == (0, 1, 2)
    np.testing.assert_array_equal(result.lengths, [len(s) for _, s in records])
    assert result.per_residue[-1].shape == (sum(len(s) for _, s in records), 32)
    for protein_id, sequence in records:
        got = result[protein_id]
        for layer, states in references(model, alphabet, sequence, [0, 1, 2]).items():
            np.testing.assert_allclose(got.per_residue[layer], states[1:-1].numpy(), atol=2e-5, rtol=1e-4)
            np.testing.assert_allclose(got.mean[layer], states[1:-1].mean(0).numpy(), atol=2e-5, rtol=1e-4)
            np.testing.assert_allclose(got.cls[layer], states[0].numpy(), atol=2e-5, rtol=1e-4)
    # Negative layers name the same arrays as their non-negative index.
    assert result.mean[-1] is result.mean[2] and result.mean[-3] is result.mean[0]
    with pytest.raises(KeyError, match="not embedded"):
        result.mean[5]


def test_plan_batches_respects_the_token_budget(alphabet, flip_records):
    model = tiny_model(alphabet)
    settings = _settings(model, layers=[-1], include=["mean"], max_tokens=2000, window=None,
                         window_stride=None, device="cpu", precision="32")
    lengths = [len(s) for _, s in flip_records]
    batches = _plan_batches(lengths, settings)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    flat = [lengths[i] for batch in batches for i in batch]
    assert flat == sorted(flat)  # shortest first: neighbours in a batch have similar lengths
    for batch in batches:
        padded = len(batch) * (max(lengths[i] for i in batch) + 2)
        assert padded <= 2000 or len(batch) == 1
    assert len(batches) > 3


def test_long_protein_is_embedded_whole_beyond_the_training_window(alphabet, flip_records):
    """Rotary FAVOR+ takes any length: a protein 6x max_length comes back with every residue."""
    model = tiny_model(alphabet, "favor", max_length=64)
    sequence = "".join(s for _, s in flip_records[:3])[:400]
    result = embed(model, alphabet, [sequence], include=["per_residue"], max_tokens=100)
    assert result.per_residue[-1].shape == (400, 32)
    np.testing.assert_allclose(result.residues("0"), reference(model, alphabet, sequence, -1)[1:-1].numpy(),
                               atol=2e-5, rtol=1e-4)


def test_windowed_favor_rpe_embeds_a_30000_residue_protein_whole(alphabet, flip_records):
    """A windowed relative bias has the same parameters at any length: a model with max_length 1024
    embeds a titin-sized protein in one piece, as its own forward pass sees it. The full bias
    (rpe_max_distance null) is sized by max_length and asks for windows."""
    torch.manual_seed(0)
    config = PerformerConfig(vocab_size=len(alphabet), d_model=16, n_layers=1, n_heads=2, d_ff=32, dropout=0.0,
                             attention="favor_rpe", nb_features=16, max_length=1024, pad_idx=alphabet.pad_idx)
    model = ProteinPerformer(config).eval()
    with torch.no_grad():
        model.blocks[0].attention.rpe_bias.normal_()
    chains = "".join(s for _, s in flip_records)
    sequence = (chains * (30_000 // len(chains) + 1))[:30_000]
    result = embed(model, alphabet, [sequence], include=["per_residue", "mean"], max_tokens=4096)
    per_residue = result.residues("0")
    assert per_residue.shape == (30_000, 16) and np.isfinite(per_residue).all()
    np.testing.assert_allclose(per_residue, reference(model, alphabet, sequence, -1)[1:-1].numpy(),
                               atol=2e-5, rtol=1e-4)
    full = ProteinPerformer(PerformerConfig(**{**config.to_dict(), "rpe_max_distance": None})).eval()
    with pytest.raises(EmbedError, match=r"at most 1022 residues.*window="):
        embed(full, alphabet, [sequence[:2000]])


def test_learned_positions_need_windows_for_long_proteins(alphabet, flip_records):
    model = tiny_model(alphabet, "softmax", position="learned", max_length=130)
    sequence = next(s for _, s in flip_records if len(s) > 350)[:350]  # windows start at 0, 50, ..., 250
    with pytest.raises(EmbedError, match=r"at most 128 residues.*window="):
        embed(model, alphabet, [sequence])
    with pytest.raises(EmbedError, match="max_length=130"):
        embed(model, alphabet, [sequence], window=200)
    result = embed(model, alphabet, [sequence], include=["per_residue", "mean"], window=100, window_stride=50)
    assert result.per_residue[-1].shape == (len(sequence), 32)
    # Residues 0..49 are covered by the first window only, so they equal that window embedded alone.
    first_window = reference(model, alphabet, sequence[:100], -1)[1:-1]
    np.testing.assert_allclose(result.residues("0")[:50], first_window[:50].numpy(), atol=2e-5, rtol=1e-4)
    # ... and the last 50 by the last window only.
    last_window = reference(model, alphabet, sequence[-100:], -1)[1:-1]
    np.testing.assert_allclose(result.residues("0")[-50:], last_window[-50:].numpy(), atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(result.mean[-1][0], result.residues("0").mean(0), rtol=1e-5)


def test_window_larger_than_the_protein_changes_nothing(alphabet, flip_records):
    model = tiny_model(alphabet)
    sequences = [s for _, s in flip_records[:5]]
    whole = embed(model, alphabet, sequences, include=["per_residue"])
    windowed = embed(model, alphabet, sequences, include=["per_residue"], window=max(map(len, sequences)))
    np.testing.assert_array_equal(whole.per_residue[-1], windowed.per_residue[-1])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"layers": [3]}, r"layers \[3\] out of range"),
        ({"layers": []}, "layers is empty"),
        ({"include": ["pooled"]}, "subset of"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"precision": "8"}, "precision"),
        ({"window": 0}, "window must be"),
        ({"window": 50, "window_stride": 51}, "window_stride"),
        ({"window_stride": 10}, "window_stride is set but window is not"),
        ({"device": "gpu0"}, "not a torch device"),
    ],
    ids=["layer-range", "no-layers", "include", "budget", "precision", "window", "stride", "stride-alone", "device"],
)
def test_bad_options_fail_with_a_named_option(alphabet, options, message):
    with pytest.raises(EmbedError, match=message):
        embed(tiny_model(alphabet), alphabet, ["MKT"], **options)


def test_bf16_precision_is_close_to_float32(alphabet, flip_records):
    model = tiny_model(alphabet)
    sequences = [s for _, s in flip_records[:4]]
    full = embed(model, alphabet, sequences).mean[-1]
    half = embed(model, alphabet, sequences, precision="bf16").mean[-1]
    assert half.dtype == np.float32
    np.testing.assert_allclose(half, full, atol=0.1)
    assert not np.array_equal(half, full)


# ---- files -----------------------------------------------------------------------------------------


@pytest.fixture
def fasta(tmp_path, flip_records) -> Path:
    return write_fasta(tmp_path / "proteins.fasta.gz", flip_records[:25])


def test_file_layout_and_load_embeddings(alphabet, flip_records, fasta, tmp_path):
    model = tiny_model(alphabet)
    output = embed_fasta(model, alphabet, fasta, tmp_path / "out.h5", layers=[0, -1],
                         include=["mean", "per_residue", "cls"], max_tokens=2000, checkpoint="ckpt-path",
                         progress=False)
    records = flip_records[:25]
    lengths = [len(s) for _, s in records]
    with h5py.File(output) as file:
        assert file["ids"].dtype.kind == "O"
        assert [s.decode() for s in file["ids"][()]] == [protein_id for protein_id, _ in records]
        np.testing.assert_array_equal(file["lengths"][()], lengths)
        np.testing.assert_array_equal(file["offsets"][()], np.concatenate([[0], np.cumsum(lengths)]))
        assert file["mean/0"].shape == file["cls/2"].shape == (25, 32)
        assert file["per_residue/2"].shape == (sum(lengths), 32)
        assert "_done" not in file
        assert file.attrs["checkpoint"] == "ckpt-path"
        assert json.loads(file.attrs["config"])["attention"] == "favor"
        np.testing.assert_array_equal(file.attrs["layers"], [0, 2])
        assert file.attrs["package_version"]
    assert not (tmp_path / "out.h5.partial").exists()

    in_memory = embed(model, alphabet, dict(records), layers=[0, -1], include=["mean", "per_residue", "cls"])
    for lazy in (False, True):
        with load_embeddings(output, lazy=lazy) as loaded:
            assert len(loaded) == 25 and records[7][0] in loaded and "nope" not in loaded
            for kind in ("mean", "per_residue", "cls"):
                for layer in (0, -1):
                    np.testing.assert_allclose(np.asarray(getattr(loaded, kind)[layer]),
                                               getattr(in_memory, kind)[layer], atol=1e-5)
            protein = loaded[records[7][0]]
            assert protein.length == lengths[7]
            assert protein.per_residue[2].shape == (lengths[7], 32)
            np.testing.assert_allclose(protein.mean[2], protein.per_residue[2].mean(0), rtol=1e-4, atol=1e-6)
            with pytest.raises(KeyError, match="no protein with id 'nope'"):
                loaded["nope"]


def test_sequences_are_read_from_gzip_and_plain_fasta_alike(alphabet, flip_records, tmp_path):
    model = tiny_model(alphabet)
    plain = write_fasta(tmp_path / "a.fasta", flip_records[:6])
    packed = write_fasta(tmp_path / "b.fasta.gz", flip_records[:6])
    a = load_embeddings(embed_fasta(model, alphabet, plain, tmp_path / "a.h5", progress=False))
    b = load_embeddings(embed_fasta(model, alphabet, packed, tmp_path / "b.h5", progress=False))
    assert a.ids == b.ids
    np.testing.assert_array_equal(a.mean[-1], b.mean[-1])


def test_interrupted_run_resumes_and_equals_a_straight_run(alphabet, fasta, tmp_path, monkeypatch):
    model = tiny_model(alphabet)
    options = dict(layers=[1, -1], include=["mean", "per_residue", "cls"], max_tokens=1200, progress=False)
    straight = embed_fasta(model, alphabet, fasta, tmp_path / "straight.h5", **options)

    real_forward = embed_module._forward_batch
    calls: list[int] = []  # proteins in each batch that was embedded
    fail_at_batch = 3

    def forward(*args, **kwargs):
        if len(calls) == fail_at_batch:
            raise RuntimeError(f"injected failure after {fail_at_batch} batches")
        calls.append(len(args[2]))
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(embed_module, "_forward_batch", forward)
    output = tmp_path / "resumed.h5"
    with pytest.raises(RuntimeError, match="injected"):
        embed_fasta(model, alphabet, fasta, output, **options)
    assert not output.exists()
    partial = tmp_path / "resumed.h5.partial"
    committed = sum(calls)
    with h5py.File(partial) as file:
        assert file["_done"][()].sum() == committed > 0

    calls.clear()
    fail_at_batch = -1  # never
    embed_fasta(model, alphabet, fasta, output, **options)
    assert sum(calls) == 25 - committed  # only the proteins not yet committed were embedded
    assert not partial.exists()

    with h5py.File(straight) as a, h5py.File(output) as b:
        names = []
        a.visit(names.append)
        other = []
        b.visit(other.append)
        assert names == other
        for name in names:
            if isinstance(a[name], h5py.Dataset):
                np.testing.assert_array_equal(a[name][()], b[name][()], err_msg=name)
        assert {k: str(v) for k, v in a.attrs.items()} == {k: str(v) for k, v in b.attrs.items()}


def test_partial_file_from_other_settings_is_not_mixed_in(alphabet, fasta, tmp_path, monkeypatch):
    model = tiny_model(alphabet)
    def fail(*args, **kwargs):
        raise RuntimeError("stop")

    monkeypatch.setattr(embed_module, "_forward_batch", fail)
    with pytest.raises(RuntimeError):
        embed_fasta(model, alphabet, fasta, tmp_path / "out.h5", layers=[-1], progress=False)
    monkeypatch.undo()
    with pytest.raises(EmbedError, match=r"other settings \(layers\).*delete it"):
        embed_fasta(model, alphabet, fasta, tmp_path / "out.h5", layers=[0], progress=False)


def test_duplicate_ids_fail_before_any_work(alphabet, flip_records, tmp_path, monkeypatch):
    records = flip_records[:5] + [flip_records[2]]
    path = write_fasta(tmp_path / "dup.fasta", records)
    monkeypatch.setattr(embed_module, "_forward_batch", lambda *a, **k: pytest.fail("embedded before checking ids"))
    where = r"\S*dup.fasta:10 \(record 3\) and \S*dup.fasta:27 \(record 6\)"
    with pytest.raises(EmbedError, match=rf"duplicate ids '{flip_records[2][0]}' \({where}\)"):
        embed_fasta(tiny_model(alphabet), alphabet, path, tmp_path / "out.h5", progress=False)
    assert list(tmp_path.iterdir()) == [path]


def test_existing_output_is_never_overwritten_silently(alphabet, fasta, tmp_path):
    model = tiny_model(alphabet)
    output = tmp_path / "out.h5"
    output.write_text("precious")
    with pytest.raises(EmbedError, match="already exists.*overwrite=true"):
        embed_fasta(model, alphabet, fasta, output, progress=False)
    assert output.read_text() == "precious"
    embed_fasta(model, alphabet, fasta, output, overwrite=True, progress=False)
    assert len(load_embeddings(output)) == 25


def test_empty_record_is_named(alphabet, flip_records, tmp_path):
    path = tmp_path / "empty.fasta"
    path.write_text(f">A\n{flip_records[0][1]}\n>B\n>C\n{flip_records[1][1]}\n")
    with pytest.raises(EmbedError, match=r"empty.fasta:3 \(record 2\): 'B' has no residues"):
        embed_fasta(tiny_model(alphabet), alphabet, path, tmp_path / "out.h5", progress=False)


# ---- command line ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, alphabet) -> Path:
    """A checkpoint as training writes it (weights under `model.`, the config in hyper_parameters)."""
    config = tiny_model(alphabet).config
    module = ProteinLM(config.to_dict(), alphabet_tokens=alphabet.tokens)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path


def run_module(*overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "protein_performer.embed", *overrides,
                           f"hydra.run.dir={cwd / 'hydra'}"],
                          capture_output=True, text=True, cwd=cwd, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def compose(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose_config("embed", overrides=list(overrides))


def test_command_line_writes_the_file(checkpoint, fasta, tmp_path):
    result = run_module(f"checkpoint={checkpoint}", f"input={fasta}", f"output={tmp_path / 'cli.h5'}",
                        "layers=[0,-1]", "include=[mean,cls]", "max_tokens=3000", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "res/s" in result.stderr and "seq/s" in result.stderr
    loaded = load_embeddings(tmp_path / "cli.h5")
    assert len(loaded) == 25 and loaded.layers == (0, 2)
    assert len(loaded.cls) == 2 and len(loaded.per_residue) == 0
    assert loaded.attrs["checkpoint"] == str(checkpoint.resolve())


def test_entry_point_exits_with_the_error_status(checkpoint, fasta, tmp_path, capsys):
    """@hydra.main lets SystemExit through, so the status run_cli returns is the process's exit status."""
    cfg = compose(f"checkpoint={tmp_path / 'missing.ckpt'}", f"input={fasta}", f"output={tmp_path / 'x.h5'}")
    with pytest.raises(SystemExit) as exit_info:
        embed_module.main.__wrapped__(cfg)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "missing.ckpt" in err and "Traceback" not in err
    assert not (tmp_path / "x.h5").exists() and not (tmp_path / "x.h5.partial").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["input={fasta}", "output={out}"], r"checkpoint=\.\.\. is required"),
        (["checkpoint={ckpt}", "input={fasta}", "output={fasta}"], "already exists"),
        (["checkpoint={ckpt}", "input={tmp}/nope.fasta", "output={out}"], "nope.fasta: no such file"),
        (["checkpoint={ckpt}", "input={fasta}", "output={out}", "layers=7"], r"layers \[7\] out of range"),
        (["checkpoint={ckpt}", "input={fasta}", "output={fasta}/out.h5"], "is a file, not a directory"),
    ],
    ids=["missing-key", "output-exists", "missing-input", "bad-layer", "output-under-a-file"],
)
def test_command_line_errors_are_one_line_with_status_2(checkpoint, fasta, tmp_path, capsys, overrides, message):
    values = {"fasta": fasta, "out": tmp_path / "out.h5", "ckpt": checkpoint, "tmp": tmp_path}
    cfg = compose(*(override.format(**values) for override in overrides))
    assert run_cli(cfg) == 2
    err = capsys.readouterr().err
    assert err.startswith("embed: error: ") and err.count("\n") == 1
    assert re.search(message, err), err
    assert not (tmp_path / "out.h5").exists() and not (tmp_path / "out.h5.partial").exists()


def test_command_line_takes_scalars_for_one_element_lists(checkpoint, fasta, tmp_path):
    cfg = compose(f"checkpoint={checkpoint}", f"input={fasta}", f"output={tmp_path / 'one.h5'}", "layers=0",
                  "include=cls", "progress=false")
    assert run_cli(cfg) == 0
    loaded = load_embeddings(tmp_path / "one.h5")
    assert loaded.layers == (0,) and len(loaded.cls) == 1 and len(loaded.mean) == 0


def test_finished_partial_file_is_renamed_on_the_next_run(alphabet, fasta, tmp_path, monkeypatch):
    """A run killed between its last write and the rename leaves a complete partial file: nothing to redo."""
    model = tiny_model(alphabet)
    output = embed_fasta(model, alphabet, fasta, tmp_path / "out.h5", progress=False)
    expected = load_embeddings(output).mean[-1]
    output.rename(tmp_path / "out.h5.partial")
    monkeypatch.setattr(embed_module, "_forward_batch", lambda *a, **k: pytest.fail("re-embedded a finished file"))
    embed_fasta(model, alphabet, fasta, output, progress=False)
    np.testing.assert_array_equal(load_embeddings(output).mean[-1], expected)
    assert not (tmp_path / "out.h5.partial").exists()


def test_gaps_are_dropped_with_a_warning(alphabet, tmp_path, caplog):
    """Aligned input ('-', '.'): per-residue rows follow the ungapped sequence, and the user is told."""
    path = write_fasta(tmp_path / "aligned.fasta", [("A", "MK-TA..YIAK"), ("B", "MKTAYIAK")])
    with caplog.at_level(logging.WARNING, logger="protein_performer.embed"):
        embed_fasta(tiny_model(alphabet), alphabet, path, tmp_path / "out.h5", include=["per_residue"], progress=False)
    assert "1 of 2 proteins hold gap characters" in caplog.text and "aligned.fasta:1 (record 1)" in caplog.text
    loaded = load_embeddings(tmp_path / "out.h5")
    assert loaded.lengths.tolist() == [8, 8]
    np.testing.assert_allclose(loaded.residues("A"), loaded.residues("B"), atol=1e-5)


def test_output_directory_is_created(alphabet, fasta, tmp_path):
    output = embed_fasta(tiny_model(alphabet), alphabet, fasta, tmp_path / "new" / "dir" / "out.h5", progress=False)
    assert output.is_file()
