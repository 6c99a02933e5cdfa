"""The embeddings file: layout, load_embeddings, resuming a partial file (protein_performer.embedding.store)."""
from __future__ import annotations

import json
import logging

import h5py
import numpy as np
import pytest

from protein_performer.embedding import EmbedError, compute, embed, embed_fasta, load_embeddings

from .helpers import tiny_model, write_fasta


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

    real_forward = compute.forward_batch
    calls: list[int] = []  # proteins in each batch that was embedded
    fail_at_batch = 3

    def forward(*args, **kwargs):
        if len(calls) == fail_at_batch:
            raise RuntimeError(f"injected failure after {fail_at_batch} batches")
        calls.append(len(args[2]))
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(compute, "forward_batch", forward)
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

    monkeypatch.setattr(compute, "forward_batch", fail)
    with pytest.raises(RuntimeError):
        embed_fasta(model, alphabet, fasta, tmp_path / "out.h5", layers=[-1], progress=False)
    monkeypatch.undo()
    with pytest.raises(EmbedError, match=r"other settings \(layers\).*delete it"):
        embed_fasta(model, alphabet, fasta, tmp_path / "out.h5", layers=[0], progress=False)


def test_duplicate_ids_fail_before_any_work(alphabet, flip_records, tmp_path, monkeypatch):
    records = flip_records[:5] + [flip_records[2]]
    path = write_fasta(tmp_path / "dup.fasta", records)
    monkeypatch.setattr(compute, "forward_batch", lambda *a, **k: pytest.fail("embedded before checking ids"))
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


def test_finished_partial_file_is_renamed_on_the_next_run(alphabet, fasta, tmp_path, monkeypatch):
    """A run killed between its last write and the rename leaves a complete partial file: nothing to redo."""
    model = tiny_model(alphabet)
    output = embed_fasta(model, alphabet, fasta, tmp_path / "out.h5", progress=False)
    expected = load_embeddings(output).mean[-1]
    output.rename(tmp_path / "out.h5.partial")
    monkeypatch.setattr(compute, "forward_batch", lambda *a, **k: pytest.fail("re-embedded a finished file"))
    embed_fasta(model, alphabet, fasta, output, progress=False)
    np.testing.assert_array_equal(load_embeddings(output).mean[-1], expected)
    assert not (tmp_path / "out.h5.partial").exists()


def test_gaps_are_dropped_with_a_warning(alphabet, tmp_path, caplog):
    """Aligned input ('-', '.'): per-residue rows follow the ungapped sequence, and the user is told."""
    path = write_fasta(tmp_path / "aligned.fasta", [("A", "MK-TA..YIAK"), ("B", "MKTAYIAK")])
    with caplog.at_level(logging.WARNING, logger="protein_performer.embedding"):
        embed_fasta(tiny_model(alphabet), alphabet, path, tmp_path / "out.h5", include=["per_residue"], progress=False)
    assert "1 of 2 proteins hold gap characters" in caplog.text and "aligned.fasta:1 (record 1)" in caplog.text
    loaded = load_embeddings(tmp_path / "out.h5")
    assert loaded.lengths.tolist() == [8, 8]
    np.testing.assert_allclose(loaded.residues("A"), loaded.residues("B"), atol=1e-5)


def test_output_directory_is_created(alphabet, fasta, tmp_path):
    output = embed_fasta(tiny_model(alphabet), alphabet, fasta, tmp_path / "new" / "dir" / "out.h5", progress=False)
    assert output.is_file()
