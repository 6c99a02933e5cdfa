"""benchmarks/compare.py --quick: real training runs per cell, tables, figures, skip and resume."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import compare  # noqa: E402


def run_compare(out: Path, *args: str) -> str:
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "compare.py"), "--quick", "--out", str(out),
                             "--settings", "A", "C", "D", "--kinds", "softmax", "favor", *args],
                            capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_quick_comparison_trains_every_cell_reports_and_resumes(tmp_path):
    out = tmp_path / "cmp"
    first = run_compare(out)

    results = {f"{s}/{c}": json.loads((out / s / c / "result.json").read_text())
               for s, c in [("A", "softmax"), ("A", "favor"), ("C", "softmax"), ("C", "favor")]}
    for key, result in results.items():
        kind = key.split("/")[1]
        assert result["kind"] == kind and f"attention={kind}" in result["command"]
        assert result["command"].startswith("python -m protein_performer.train ")
        assert 1.0 < result["val_perplexity"] < 40 and 1.0 < result["test_perplexity"] < 40
        assert result["peak_rss_mb"] > 100 and result["tokens_per_sec"] > 0
        assert result["curve"]["val_perplexity"][-1] == result["val_perplexity"]
    # A trains both kinds for the same steps; C gives each the same calibrated seconds of training.
    assert results["A/softmax"]["steps"] == results["A/favor"]["steps"] == compare.QUICK.steps
    per_step = json.loads((out / "C" / "seconds_per_step.json").read_text())
    for kind in ("softmax", "favor"):
        expected = max(compare.QUICK.val_every, round(compare.QUICK.concat_seconds / per_step[kind]))
        assert results[f"C/{kind}"]["steps"] == expected
        assert results[f"C/{kind}"]["seconds_per_step"] == per_step[kind]

    report = (out / "results.md").read_text()
    assert report in first
    for setting in "ACD":
        assert f"### {setting}:" in report
        assert (out / f"compare_{setting}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # D's reference cell is A's favor run, reused rather than trained again.
    assert not (out / "D" / "favor").exists()
    d_rows = [line for line in report.split("### D:")[1].splitlines() if line.startswith("| favor |")]
    assert d_rows and f"| {results['A/favor']['val_perplexity']:.3f} |" in d_rows[0]

    # A rerun trains nothing: every finished cell is skipped.
    second = run_compare(out)
    assert second.count("done before, skipped") == 4 and "python -m protein_performer.train" not in second

    # --report trains nothing and rebuilds the same tables from the finished cells.
    (out / "results.md").unlink()
    reported = run_compare(out, "--report")
    assert "python -m protein_performer.train" not in reported and (out / "results.md").read_text() == report

    # A cell without its result (as if killed after its last checkpoint) resumes from that checkpoint,
    # and its earlier metrics are kept: the same final numbers come out.
    (out / "A" / "favor" / "result.json").unlink()
    third = run_compare(out)
    assert "A/favor: resuming" in third
    resumed = json.loads((out / "A" / "favor" / "result.json").read_text())
    assert resumed["resumed"] is True
    assert resumed["val_perplexity"] == results["A/favor"]["val_perplexity"]
    assert resumed["curve"] == results["A/favor"]["curve"]
    assert resumed["test_perplexity"] == pytest.approx(results["A/favor"]["test_perplexity"], rel=1e-6)


def test_metrics_of_a_resumed_run_merge_by_step_later_parts_winning(tmp_path):
    def write(name: str, rows: list[dict[str, str]]) -> None:
        keys = sorted({key for row in rows for key in row})
        with (tmp_path / name).open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)

    write("metrics-part0.csv", [{"step": "10", "train/loss": "3.0"}, {"step": "20", "val/perplexity": "15"},
                                {"step": "30", "train/loss": "2.9"}])  # step 30: logged, then killed
    write("metrics.csv", [{"step": "30", "train/loss": "2.5"}, {"step": "40", "val/perplexity": "14"},
                          {"step": "40", "test/perplexity": "13"}])
    rows = compare.read_metrics(tmp_path)
    assert [row["step"] for row in rows] == [10, 20, 30, 40]
    assert rows[2]["train/loss"] == 2.5
    assert rows[3] == {"step": 40, "val/perplexity": 14, "test/perplexity": 13}


def test_seed_spread_cells_rerun_a_with_only_the_seed_changed(tmp_path):
    from protein_performer.train import compose_config

    spread, a = compare.settings()["S"], compare.settings()["A"]
    def shared(setting):  # everything but the run name: the same data, model and optimiser
        overrides = compare.base_overrides(setting, compare.FULL, tmp_path / "x.fasta", tmp_path / "cache")
        return [o for o in overrides if not o.startswith("name=")]

    assert shared(spread) == shared(a)
    base = compare.base_overrides(spread, compare.FULL, tmp_path / "x.fasta", tmp_path / "cache")
    reused = {c.name: c.reuse for c in spread.cells if c.reuse is not None}
    assert reused == {"softmax": ("A", "softmax"), "favor": ("A", "favor")}
    for cell in spread.cells:
        if cell.reuse is None:
            cfg = compose_config([*base, *cell.overrides], tmp_path / cell.name)
            assert (cfg.seed, cfg.attention.kind, cfg.attention.get("feature_seed", 1)) == (1, cell.kind, 1)


def test_longer_setting_trains_a_kinds_four_times_as_many_steps_and_changes_nothing_else(tmp_path):
    longer, a = compare.settings()["L"], compare.settings()["A"]
    assert {c.kind for c in longer.cells} <= {c.kind for c in a.cells}
    assert longer.steps(compare.FULL) == 4 * a.steps(compare.FULL) == 2000
    assert longer.val_every(compare.FULL) == 2 * a.val_every(compare.FULL)

    def shared(setting):  # the same data, model and optimiser; only the evaluation cadence and name differ
        overrides = compare.base_overrides(setting, compare.FULL, tmp_path / "x.fasta", tmp_path / "cache")
        return [o for o in overrides if not o.startswith(("name=", "trainer.val_check_interval=",
                                                          "trainer.log_every_n_steps="))]

    assert shared(longer) == shared(a)
    from omegaconf import OmegaConf
    from protein_performer.train import compose_config

    # Its no_redraw cell is favor with the one redraw (at step 1,000 of 2,000) turned off, nothing else.
    base = compare.base_overrides(longer, compare.FULL, tmp_path / "x.fasta", tmp_path / "cache")
    cells = {c.name: c for c in longer.cells}
    favor, no_redraw = (compose_config([*base, *cells[name].overrides], tmp_path / name)
                        for name in ("favor", "no_redraw"))
    assert (favor.attention.feature_redraw_interval, no_redraw.attention.feature_redraw_interval) == (1000, 0)
    no_redraw.attention.feature_redraw_interval = 1000
    assert OmegaConf.to_container(no_redraw.attention) == OmegaConf.to_container(favor.attention)


def test_fidelity_setting_is_l_with_only_the_favor_variant_keys_changed(tmp_path):
    from omegaconf import OmegaConf
    from protein_performer.train import compose_config

    fidelity, longer = compare.settings()["F"], compare.settings()["L"]
    strip = lambda setting: [o for o in compare.base_overrides(setting, compare.FULL, tmp_path / "x.fasta",
                                                               tmp_path / "cache") if not o.startswith("name=")]
    assert strip(fidelity) == strip(longer) and fidelity.steps(compare.FULL) == 2000
    base = compare.base_overrides(fidelity, compare.FULL, tmp_path / "x.fasta", tmp_path / "cache")
    configs = {c.name: compose_config([*base, *c.overrides], tmp_path / c.name).attention for c in fidelity.cells}
    expected = {"favor_oprf": {"features": "oprf"}, "favor_window64": {"exact_window": 64},
                "favor_oprf_window64": {"features": "oprf", "exact_window": 64}}
    plain = OmegaConf.to_container(configs["favor"])
    for name, changes in expected.items():
        assert OmegaConf.to_container(configs[name]) == {**plain, **changes}, name
    assert configs["softmax"].kind == "softmax"


def test_equal_wall_clock_setting_g_is_c_with_the_exact_band_beside_softmax_and_favor(tmp_path):
    from protein_performer.train import compose_config

    band, concat = compare.settings()["G"], compare.settings()["C"]
    strip = lambda setting: [o for o in compare.base_overrides(setting, compare.FULL, tmp_path / "x.fasta",
                                                               tmp_path / "cache") if not o.startswith("name=")]
    assert strip(band) == strip(concat) and band.equal_wall_clock
    base = compare.base_overrides(band, compare.FULL, tmp_path / "x.fasta", tmp_path / "cache")
    configs = {c.name: compose_config([*base, *c.overrides], tmp_path / c.name).attention for c in band.cells}
    assert configs["favor_window64"].exact_window == 64 and configs["favor"].exact_window == 0
    assert configs["softmax"].kind == "softmax"


def test_homolog_settings_read_clusters_and_restart_positions_where_the_kind_has_rotary(tmp_path):
    from protein_performer.train import compose_config

    clusters = REPO / "data" / "swissprot_subset.clusters50.tsv.gz"
    for name, objective, length in (("H", "mlm", 4096), ("HC", "clm", 4096), ("HW", "mlm", 8192)):
        setting = compare.settings()[name]
        base = compare.base_overrides(setting, compare.FULL, tmp_path / "x.fasta", tmp_path / "cache", clusters)
        assert setting.length(compare.FULL) == length
        for cell in setting.cells:
            cfg = compose_config([*base, *cell.overrides], tmp_path / name / cell.name)
            assert (cfg.data.sampling, cfg.data.max_length, cfg.data.batch_size) == ("homologs", length,
                                                                                      8192 // length)
            assert cfg.model.max_length == length
            assert cfg.data.clusters == str(clusters) and cfg.data.min_cluster_members == 2
            assert cfg.objective == objective and cfg.attention.kind == cell.kind
            assert cfg.model.position_scope == ("window" if cell.kind == "favor_rpe" else "member")
            assert cfg.attention.band_order == ("member" if cell.name == "favor_member64" else "sequence")
        with pytest.raises(SystemExit, match="--clusters"):
            compare.base_overrides(setting, compare.FULL, tmp_path / "x.fasta", tmp_path / "cache")


def test_hw_gives_every_kind_four_times_c_seconds_and_calibrates_on_its_own_windows(tmp_path, monkeypatch):
    hw, c = compare.settings()["HW"], compare.settings()["C"]
    assert hw.equal_wall_clock and hw.seconds(compare.FULL) == 4 * c.seconds(compare.FULL)
    assert [cell.name for cell in hw.cells] == ["softmax", "favor", "favor_member64", "favor_rpe", "combiner"]
    assert [cell.name for cell in compare.settings()["HC"].cells] == ["softmax", "favor", "favor_rpe", "combiner",
                                                                     "favor_member64"]
    # calibration times steps of one 8192-token window: the rate logged by the run gives s/step
    commands = []

    def fake_run(command, log):
        run_dir = Path(next(a for a in command if a.startswith("hydra.run.dir=")).split("=", 1)[1])
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.csv").write_text("step,train/tokens_per_sec\n" + "".join(
            f"{i},{4096.0}\n" for i in range(1, 7)))
        commands.append(command)
        return 0, 1.0, 1.0

    monkeypatch.setattr(compare, "run_training", fake_run)
    seconds = compare.calibrate(hw, compare.FULL, [], tmp_path / "HW")
    assert seconds == dict.fromkeys(["softmax", "favor", "favor_member64", "favor_rpe", "combiner"], 2.0)  # 8192 / 4096
    assert len(commands) == len(hw.cells) * compare.FULL.calibration_repeats
    assert compare.calibrate(hw, compare.FULL, [], tmp_path / "HW") == seconds  # cached: nothing runs
    assert len(commands) == len(hw.cells) * compare.FULL.calibration_repeats


def test_calibration_cache_missing_kinds_times_them_beside_the_cheapest_cached_kind(tmp_path, monkeypatch, capsys):
    hw = compare.settings()["HW"]
    out = tmp_path / "HW"
    out.mkdir()
    cached = {"softmax": 8.0, "favor": 1.0, "favor_member64": 1.5, "gone": 0.1}  # "gone": a cell since removed
    (out / "seconds_per_step.json").write_text(json.dumps(cached))
    timed = []

    def fake_run(command, log):
        run_dir = Path(next(a for a in command if a.startswith("hydra.run.dir=")).split("=", 1)[1])
        run_dir.mkdir(parents=True, exist_ok=True)
        timed.append(run_dir.name.rsplit("-", 1)[0])
        (run_dir / "metrics.csv").write_text("step,train/tokens_per_sec\n" + "".join(
            f"{i},{8192.0 / 1.1}\n" for i in range(1, 7)))
        return 0, 1.0, 1.0

    monkeypatch.setattr(compare, "run_training", fake_run)
    seconds = compare.calibrate(hw, compare.FULL, [], out)
    assert timed == ["favor", "favor_rpe", "combiner"] * compare.FULL.calibration_repeats
    # cached kinds keep their figures (their runs trained with them); only the missing ones are added
    assert seconds == {**cached, "favor_rpe": pytest.approx(1.1), "combiner": pytest.approx(1.1)}
    assert json.loads((out / "seconds_per_step.json").read_text()) == seconds
    assert "drift check: favor 1.100 s/step now, 1.000 cached (1.100x)" in capsys.readouterr().out


def test_member_table_reports_later_over_first_and_the_share_of_softmax_gain():
    setting = compare.settings()["H"]
    results = [{"cell": "softmax", "kind": "softmax", "val_perplexity_masked_first": 10.0,
                "val_perplexity_masked_later": 4.0, "val_baseline_frequency_perplexity_masked_first": 17.0,
                "val_baseline_frequency_perplexity_masked_later": 18.0},
               {"cell": "favor", "kind": "favor", "val_perplexity_masked_first": 10.0,
                "val_perplexity_masked_later": 5.0}]
    text = compare.member_table(setting, results)
    softmax_row, favor_row = text.splitlines()[-2:]
    assert softmax_row.split(" | ")[1:4] == ["10.000", "4.000", "0.400"]
    assert softmax_row.rstrip(" |").endswith("1.000") and "0.222" in softmax_row  # 4 / 18
    assert favor_row.rstrip(" |").endswith(f"{math.log(2) / math.log(2.5):.3f}")  # ln 2 of softmax's ln 2.5
    curves = {"step": [100.0, 200.0], "val_perplexity_masked_first": [12.0, 10.0],
              "val_perplexity_masked_later": [11.0, 4.0]}
    table = compare.member_curve_table(setting, [{**results[0], "curve": curves}], {"favor": curves})
    assert "| 100 | 0.917 | 0.917 |" in table and "| 200 | 0.400 | 0.400 |" in table and "favor (running)" in table


def test_curve_table_lines_cells_up_by_step_with_running_cells_marked():
    setting = compare.settings()["L"]
    results = [{"cell": "softmax", "curve": {"step": [200.0, 400.0], "seconds": [1.0, 2.0],
                                             "val_perplexity": [15.2, 15.0]}},
               {"cell": "favor", "curve": {"step": [200.0, 400.0, 600.0], "seconds": [1.0, 2.0, 3.0],
                                           "val_perplexity": [15.09, 14.82, 14.75]}}]
    running = {"favor_rpe": {"step": [200.0], "seconds": [1.0], "val_perplexity": [15.196]}}
    lines = compare.curve_table(setting, results, running).splitlines()
    assert lines[2] == "| step | softmax | favor | favor_rpe (running) |"
    assert lines[4:] == ["| 200 | 15.200 | 15.090 | 15.196 |", "| 400 | 15.000 | 14.820 |  |",
                         "| 600 |  | 14.750 |  |"]


def test_curve_table_is_masked_only_when_every_cell_logged_it():
    setting = compare.settings()["F"]
    rows = [{"step": 200.0, "val/perplexity": 15.1, "val/perplexity_masked": 17.6, "val/elapsed_seconds": 5.0},
            {"step": 300.0, "train/loss": 2.7},
            {"step": 400.0, "val/perplexity": 14.8, "val/perplexity_masked": 17.3, "val/elapsed_seconds": 9.0}]
    masked = {"cell": "favor", "curve": compare.curve(rows)}
    assert masked["curve"] == {"step": [200.0, 400.0], "seconds": [5.0, 9.0], "val_perplexity": [15.1, 14.8],
                               "val_perplexity_masked": [17.6, 17.3]}
    lines = compare.curve_table(setting, [masked], {}).splitlines()
    assert lines[0].startswith("Validation perplexity, masked-only targets,") and lines[4] == "| 200 | 17.600 |"
    old = {"cell": "softmax", "curve": compare.curve([{k: v for k, v in row.items() if "masked" not in k}
                                                      for row in rows])}
    lines = compare.curve_table(setting, [masked, old], {}).splitlines()  # one cell without: all targets for all
    assert lines[0] == "Validation perplexity at each validation (F):" and lines[4] == "| 200 | 15.100 | 15.100 |"


def test_a_run_of_some_settings_keeps_the_other_settings_in_results_md():
    previous = "Data: old\n\n### A: a\n\n| a table |\n\n![A](compare_A.png)\n\n### L: l\n\n| l table |\n"
    merged = compare.merge_report(previous, "Data: new", {"F": "### F: f\n\n| f table |", "A": "### A: a2"})
    assert merged == "Data: new\n\n### A: a2\n\n### L: l\n\n| l table |\n\n### F: f\n\n| f table |\n"
    assert compare.merge_report("", "Data: x", {"L": "### L: l"}) == "Data: x\n\n### L: l\n"


def test_table_headlines_masked_only_and_marks_cells_finished_before_it():
    setting = compare.settings()["A"]
    common = {"steps": 500.0, "val_accuracy": 0.2, "test_perplexity": 14.5, "test_accuracy": 0.2,
              "tokens_per_sec": 1000.0, "peak_rss_mb": 900.0, "train_seconds": 600.0}
    results = [{"cell": "softmax", "kind": "softmax", "val_perplexity": 14.4, "val_perplexity_masked": 17.0,
                "val_accuracy_masked": 0.11, "val_baseline_frequency_perplexity_masked": 17.8, **common},
               {"cell": "favor", "kind": "favor", "val_perplexity": 14.6, "val_perplexity_masked": 17.17,
                "val_accuracy_masked": 0.1, "val_baseline_frequency_perplexity_masked": 17.8, **common},
               {"cell": "combiner", "kind": "combiner", "val_perplexity": 14.8, **common}]  # an old result.json
    lines = compare.table(setting, results).splitlines()
    assert lines[2].startswith("| cell | steps | val ppl masked-only | vs frequencies | vs ref (masked-only) |")
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in lines[4:]}
    assert rows["favor"][2:8] == ["17.170", f"{17.17 / 17.8:.3f}", "1.010", "0.100", "14.600", f"{14.6 / 14.4:.3f}"]
    assert rows["combiner"][2:8] == [compare.NOT_MEASURED, "", "", "", "14.800", f"{14.8 / 14.4:.3f}"]
    assert all(len(row) == len(rows["softmax"]) for row in rows.values())
    assert "nan" not in "\n".join(lines)


def test_summary_keeps_masked_only_metrics_and_baselines_where_logged():
    rows = [{"step": 100.0, "val/perplexity": 15.0, "val/perplexity_masked": 17.5, "val/elapsed_seconds": 9.0},
            {"step": 200.0, "val/perplexity": 14.0, "val/perplexity_masked": 17.0,
             "val/baseline_frequency_perplexity_masked": 17.8}]
    summary = compare.summarize(rows)
    assert summary["val_perplexity_masked"] == 17.0 and summary["val_baseline_frequency_perplexity_masked"] == 17.8
    assert "val_perplexity_masked_later" not in summary and "val_perplexity_masked" not in compare.summarize(rows[:0])


def test_recorded_commands_hold_no_machine_paths(tmp_path):
    command = compare.train_command(["data.fasta=/mnt/shared/uniref.fasta.gz",
                                     f"data.cache_dir={compare.REPO / 'benchmarks/results/compare/cache'}",
                                     "data.cache_dir=/elsewhere/wt-x/benchmarks/results/compare/cache",
                                     "attention=favor"], compare.REPO / "benchmarks/results/compare/A/favor")
    recorded = compare.portable_command(command)
    assert recorded == ("python -m protein_performer.train 'data.fasta=<data>/uniref.fasta.gz' "
                        "data.cache_dir=benchmarks/results/compare/cache "
                        "data.cache_dir=benchmarks/results/compare/cache attention=favor "
                        "hydra.run.dir=benchmarks/results/compare/A/favor")
    committed = list((compare.REPO / "benchmarks" / "results").rglob("result.json"))
    assert committed and not [p for p in committed if str(compare.REPO) in p.read_text() or '"/' in p.read_text()]
