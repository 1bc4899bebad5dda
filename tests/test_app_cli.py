"""dmem-chat's command line (checks made before the UI starts) and the δ-state pictures."""

from __future__ import annotations

import numpy as np
import pytest

from app.commands import COMMANDS, CommandError, parse_command
from app.heatmap import layer_norms, state_heatmap, value_color
from app.main import build_parser, main


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from dmem_mlx.tiny import make_tiny_dmem

    return make_tiny_dmem(tmp_path_factory.mktemp("tiny"))


def one_line_error(captured) -> str:
    err = captured.err.strip()
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    assert len(err.splitlines()) == 1, err
    return err


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--memory", "--temp", "--top-p", "--max-tokens", "--seed", "--system",
                 "--max-kv-tokens", "--read-only"):
        assert flag in out


@pytest.mark.parametrize("argv", [["--temp", "hot"], ["--bogus"], ["--max-tokens", "1.5"]])
def test_bad_flags_give_one_line(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert "dmem-chat: error:" in one_line_error(capsys.readouterr())


@pytest.mark.parametrize("argv, words", [
    (["--temp", "-1"], "--temp"), (["--top-p", "0"], "--top-p"),
    (["--max-tokens", "0"], "--max-tokens"), (["--max-kv-tokens", "8"], "--max-kv-tokens")])
def test_out_of_range_numbers_give_one_line(argv, words, tmp_path, capsys):
    assert main(argv + ["--model", str(tmp_path)]) == 1
    assert words in one_line_error(capsys.readouterr())


def test_missing_model_gives_one_line(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "no-such-model")]) == 1
    assert "no-such-model" in one_line_error(capsys.readouterr())


def test_directory_without_adapter_gives_one_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    assert main(["--model", str(tmp_path)]) == 1
    assert "adapter" in one_line_error(capsys.readouterr())


def test_without_demo_model_asks_for_model(capsys, monkeypatch):
    import dmem_mlx.demo

    monkeypatch.setattr(dmem_mlx.demo, "DEMO_DIR", dmem_mlx.demo.DEMO_DIR / "missing")
    assert main([]) == 1
    assert "--model" in one_line_error(capsys.readouterr())


def test_memory_names_live_in_the_data_directory(tmp_path):
    from dmem_mlx.runtime import default_memory_path

    from app.main import memory_location

    default = default_memory_path("dmem-demo")
    assert memory_location(None, "dmem-demo") == default
    assert memory_location("work", "dmem-demo") == default.with_name("work" + default.suffix)
    assert memory_location(str(tmp_path / "x.mem"), "dmem-demo") == tmp_path / "x.mem"


def test_locked_memory_is_refused_before_the_ui(tiny_model, tmp_path, capsys):
    from dmem_mlx.runtime import MemoryFile

    path = tmp_path / "shared.memory"
    holder = MemoryFile.open(path)
    try:
        before = path.read_bytes() if path.is_file() else None
        assert main(["--model", str(tiny_model), "--memory", str(path)]) == 1
        assert str(path.name) in one_line_error(capsys.readouterr())
        assert (path.read_bytes() if path.is_file() else None) == before
    finally:
        holder.close()


def test_parser_defaults_are_sampling_names():
    args = build_parser().parse_args([])
    assert (args.temp, args.top_p, args.seed, args.read_only) == (0.0, 1.0, None, False)


def test_slash_commands_parse():
    command, argument = parse_command("/snapshot before the trip")
    assert (command.name, argument) == ("snapshot", "before the trip")
    assert parse_command("/NEW")[0].name == "new"
    for bad in ("/nope", "/restore", "/forget everything"):
        with pytest.raises(CommandError):
            parse_command(bad)
    names = {c.name for c in COMMANDS}
    assert {"new", "forget", "readonly", "snapshot", "restore", "export", "info", "help",
            "quit"} <= names


def test_value_color_is_diverging():
    positive, negative, zero = value_color(1.0, 1.0), value_color(-1.0, 1.0), value_color(0, 1.0)
    assert positive.triplet.red > positive.triplet.blue
    assert negative.triplet.blue > negative.triplet.red
    assert zero.triplet != positive.triplet and zero.triplet != negative.triplet


def test_state_heatmap_draws_every_layer_and_head():
    states = {i: np.random.default_rng(i).normal(size=(2, 8, 8)) for i in range(5)}
    text = state_heatmap(states, width=40).plain
    for i in range(5):
        assert f"L{i}" in text
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 40
    cells = sum(line.count("▀") for line in lines)
    assert cells == 5 * 2 * 8 * 4  # layers × heads × columns × (rows / 2)
    # eight heads (the demo) do not fit one line of a 36-cell panel: they wrap, nothing is lost
    wide = {i: np.random.default_rng(i).normal(size=(8, 8, 8)) for i in range(4)}
    lines = state_heatmap(wide, width=36).plain.splitlines()
    assert max(len(line) for line in lines) <= 36
    assert sum(line.count("▀") for line in lines) == 4 * 8 * 8 * 4
    bars, top = layer_norms(states)
    assert len(bars.plain) == 5
    assert top == pytest.approx(max(np.linalg.norm(s) for s in states.values()), rel=1e-5)


def test_flush_pacer_keeps_the_ui_share_near_its_target(monkeypatch):
    import app.app as app_module

    clock = {"cpu": 0.0, "wall": 0.0}
    monkeypatch.setattr(app_module.time, "thread_time", lambda: clock["cpu"])
    monkeypatch.setattr(app_module.time, "perf_counter", lambda: clock["wall"])
    pacer = app_module.FlushPacer(shortest=0.05, longest=1.0, target=0.05)
    for _ in range(5):  # each update costs 20 ms of UI CPU: 0.02 / 0.05 = 0.4 s between updates
        interval = pacer.next_interval()
        clock["wall"] += interval
        clock["cpu"] += 0.02
    assert pacer.next_interval() == pytest.approx(0.4)
    for _ in range(3):  # cheap updates: back to the shortest interval
        clock["wall"] += pacer.interval
        clock["cpu"] += 0.0001
        pacer.next_interval()
    assert pacer.interval == pytest.approx(0.05)
    clock["wall"] += 0.05
    clock["cpu"] += 0.05  # the UI thread was busy all the time: capped at the longest interval
    assert pacer.next_interval() == 1.0
