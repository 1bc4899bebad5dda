"""benchmarks/bench_speed.py's command line (its figures are measured, never asserted here)."""

from repo_scripts import load_script


def load_bench():
    return load_script("benchmarks/bench_speed.py")


def test_breakdown_shape_is_an_option_and_an_unknown_one_is_refused_in_one_line(capsys):
    bench = load_bench()
    assert bench.build_parser().parse_args(["--breakdown-shape", "0.6b"]).breakdown_shape == "0.6b"
    assert bench.build_parser().parse_args([]).breakdown_shape == "tiny"
    assert bench.main(["--sections", "breakdown", "--breakdown-shape", "7b"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown shape(s) ['7b']" in err
