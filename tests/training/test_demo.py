"""The `make train` demo: the bundled Swiss-Prot subset, and a final report beside context-free baselines."""
from __future__ import annotations

import gzip
import re

import pytest

from protein_performer.train import compose_config, train


def test_bundled_swissprot_subset_is_real_unique_and_large_enough(data_dir):
    with gzip.open(data_dir / "swissprot_subset.fasta.gz", "rt") as handle:
        titles = [line for line in handle if line.startswith(">")]
    accessions = [title.split("|")[1] for title in titles]
    assert 15_000 <= len(accessions) == len(set(accessions)) <= 20_000
    assert all(title.startswith(">sp|") for title in titles)


@pytest.mark.slow
def test_demo_run_reports_perplexity_beside_baselines_on_the_same_targets(tmp_path, capsys):
    # The demo experiment as make train runs it, shrunk to a tiny model and a few steps.
    cfg = compose_config(["experiment=demo", "model=tiny", "trainer.max_steps=3", "trainer.val_check_interval=3",
                          "trainer.num_sanity_val_steps=0", "logger=none", "+trainer.limit_test_batches=2",
                          "data.max_length=128", "data.tokens_per_batch=1024", "callbacks.progress_bar.refresh_rate=0",
                          f"data.cache_dir={tmp_path / 'cache'}"], tmp_path / "run")
    assert cfg.data.fasta == "data/swissprot_subset.fasta.gz"
    result = train(cfg)
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("final validation perplexity"))
    number = r"([\d.]+) on ([\d,]+) held-out targets; the training split's amino-acid frequencies ([\d.]+) "
    masked = re.search(r"masked-only\): " + number + r".*uniform guessing among the 20 amino acids 20$", lines[at])
    assert masked, lines[at]
    everything = next(line for line in lines[at + 1:] if line.startswith("  all scored targets"))
    scored = re.search(number, everything)
    assert scored, everything
    assert float(scored.group(1)) == pytest.approx(result.val_perplexity, abs=1e-3)
    assert float(masked.group(1)) == pytest.approx(result.metrics["val/perplexity_masked"], abs=1e-3)
    # About 80% of the scored (15%) residues are shown as <mask>: ~2% of 18k proteins held out.
    masked_targets, all_targets = (int(match.group(2).replace(",", "")) for match in (masked, scored))
    assert all_targets > 10_000 and 0.75 < masked_targets / all_targets < 0.85
    # Swiss-Prot's amino-acid composition: well below uniform's 20, nowhere near a trained model.
    assert 16.5 < float(masked.group(3)) < 19.5 and 16.5 < float(scored.group(3)) < 19.5
    assert result.metrics["val/baseline_frequency_perplexity"] == pytest.approx(float(scored.group(3)), abs=1e-3)
    assert result.metrics["val/baseline_frequency_perplexity_masked"] == pytest.approx(float(masked.group(3)),
                                                                                       abs=1e-3)
    # The test split ran after validation (as in make train) and is reported on the next line.
    assert re.search(r"^test/perplexity [\d.]+  test/perplexity_masked [\d.]+$", printed, re.MULTILINE), printed
