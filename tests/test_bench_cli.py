"""The benchmark CLIs check every argument before any work (issue 13): a bad one
ends the run at once with one line on stderr and exit status 2, never after a long
run and never with a traceback or an empty table."""
import os
import subprocess
import sys
import time

import pytest

from jattri import bench
from jattri.benchmark import ensembles


def _refused(main, argv, capsys, text):
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: "), err
    assert text in err, err
    assert time.perf_counter() - t0 < 5.0  # nothing was loaded or trained


@pytest.fixture(autouse=True)
def no_work(monkeypatch):
    """Loading a setting is the first piece of work: it must never be reached."""
    from jattri import benchmark

    def refuse(*a, **k):
        raise AssertionError("a setting was loaded before the arguments were checked")

    monkeypatch.setattr(benchmark, "load", refuse)
    monkeypatch.setattr(ensembles, "run_ensembles", refuse)
    import jattri.benchmark.mislabel as mislabel
    monkeypatch.setattr(mislabel, "run_mislabel", refuse)


@pytest.mark.parametrize("argv,text", [
    (["--setting", " , "], "--setting ' , ' names no setting"),
    (["--methods", ","], "--methods ',' names no method"),
    (["--methods", "grad_dot,nope"], "unknown method: nope"),
    (["--setting", "digits_lr,mnist"], "unknown setting: mnist"),
    (["--mislabel", "1.5"], "--mislabel must be a fraction in (0, 0.5)"),
    (["--mislabel", "0"], "--mislabel must be a fraction"),
    (["--mislabel", "nan"], "--mislabel must be a fraction"),
    (["--mislabel", "-0.1"], "--mislabel must be a fraction"),
    (["--ensemble", "--mislabel", "0.1"], "separate experiments"),
    (["--ensemble", "--methods", "trak_1"], "--methods does not apply to --ensemble"),
    (["--ensemble", "--setting", "digits_lr,digits_mlp"], "one --setting"),
    (["--json", "/nonexistent-dir/rows.json"], "does not exist"),
])
def test_bench_refuses_before_work(argv, text, capsys):
    _refused(bench.main, argv, capsys, text)


def test_bench_refuses_unwritable_outputs(tmp_path, capsys):
    _refused(bench.main, ["--json", str(tmp_path)], capsys, "is a directory")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _refused(bench.main, ["--cache", str(blocker)], capsys, "is not a directory")
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        _refused(bench.main, ["--json", str(locked / "rows.json")], capsys, "not writable")
    existing = tmp_path / "rows.json"
    existing.write_text("keep")
    with pytest.raises(AssertionError, match="loaded before"):  # accepted: work starts
        bench.main(["--setting", "digits_lr", "--methods", "grad_dot",
                    "--json", str(existing)])
    assert existing.read_text() == "keep"  # the check did not touch the file


@pytest.mark.parametrize("argv,text", [
    (["--methods", "trak,nope"], "unknown method: nope"),
    (["--kinds", ","], "--kinds ',' names no kind"),
    (["--sizes", "1,0"], "--sizes must be comma-separated positive ints"),
    (["--sizes", "a"], "--sizes must be"),
    (["--cg-test", "-1"], "--cg-test must be >= 0"),
    (["--lora-rank", "0"], "--lora-rank must be >= 1"),
    (["--setting", "nope"], "unknown setting: nope"),
])
def test_ensembles_cli_refuses_before_work(argv, text, capsys):
    _refused(ensembles.main, argv, capsys, text)


def test_cli_exit_status_in_a_fresh_process():
    """As a user runs it: status 2, one line, no traceback."""
    out = subprocess.run([sys.executable, "-m", "jattri.bench", "--methods", ","],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        "error: --methods ',' names no method; choose from " + ", ".join(
            bench.METHODS)]
    assert out.stdout == ""
