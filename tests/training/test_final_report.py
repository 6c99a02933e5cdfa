"""The end-of-run printout: masked-only headline beside the frequency baseline on the same targets."""
from __future__ import annotations

from protein_performer.train import final_report
from protein_performer.training.baselines import Baselines


def _baseline(targets: int, frequency: float) -> Baselines:
    return Baselines(targets=targets, uniform=20.0, frequency=frequency, nonstandard=0)


def test_mlm_headline_is_masked_only_then_members_then_all_targets():
    metrics = {"val/perplexity": 14.46, "val/perplexity_masked": 17.09, "val/perplexity_masked_first": 17.5,
               "val/perplexity_masked_later": 16.0, "test/perplexity": 14.0, "test/perplexity_masked": 17.0,
               "test/accuracy_masked": 0.1, "train/perplexity": 12.0}
    baselines = {"all": _baseline(1000, 17.86), "masked": _baseline(800, 17.82),
                 "masked_first": _baseline(300, 17.70), "masked_later": _baseline(500, 17.90)}
    lines = final_report(metrics, baselines, "mlm").splitlines()
    assert lines[0].startswith("final validation perplexity, residues shown as <mask> (masked-only): 17.090 on 800 ")
    assert "frequencies 17.820 on the same targets (model / frequencies 0.959)" in lines[0]
    assert lines[0].endswith("uniform guessing among the 20 amino acids 20")
    assert lines[1].startswith("  first members of their cluster: 17.500 on 300 ")
    assert "(model / frequencies 0.989)" in lines[1]
    assert lines[2].startswith("  later members: 16.000 on 500 ") and "(model / frequencies 0.894)" in lines[2]
    assert lines[3].startswith("  all scored targets (80/10/10") and "14.460 on 1,000 " in lines[3]
    assert lines[4] == "test/perplexity 14.000  test/perplexity_masked 17.000"


def test_clm_headline_is_all_targets_with_members_apart():
    metrics = {"val/perplexity": 16.0, "val/perplexity_first": 17.0, "val/perplexity_later": 15.0}
    baselines = {"all": _baseline(900, 18.0), "first": _baseline(400, 18.1), "later": _baseline(500, 17.9)}
    lines = final_report(metrics, baselines, "clm").splitlines()
    assert lines[0].startswith("final validation perplexity, scored targets: 16.000 on 900 held-out targets")
    assert [line.split(":")[0] for line in lines[1:]] == ["  first members of their cluster", "  later members"]
    assert "masked" not in "\n".join(lines)


def test_without_validation_the_reason_is_printed():
    assert final_report({"test/perplexity": 3.0}, {}, "mlm", "the split is empty") == \
        "no validation perplexity: the split is empty\ntest/perplexity 3.000"
