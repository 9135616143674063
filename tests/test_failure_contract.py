"""The audit findings of issue 23, each reproduced through the CLI's main() (in-process) or, for the races, through
forked processes: no input ends in exit 70, concurrent starts give one winner and exit 5 for the others, messages
are the same in every process, and the export-only paths say what a directory is.

The exit-code contract is README "Exit codes" (singer_deploy/errors.py); the fuzzer is tests/test_fuzz_cli.py.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from singer_deploy.errors import EXIT_INPUT, EXIT_IO, EXIT_TRAINING, TrainingError
from singer_deploy.pipeline.cli import main
from singer_deploy.pipeline.rundir import LOCK, MARKER

from test_reliability import TINY, cli, config_file, copy_of, killed  # noqa: F401 - killed is a fixture

# Concurrent starts: processes per trial and trials; a trial takes ~0.1 s (fork + the run-directory step).
RACERS, TRIALS = 4, 25


def _race(config: str, out: str, start, losers_done, results) -> None:
    """One racer: wait for the others, start `distill`; the winner holds the directory until every loser is out."""
    start.wait()
    code = main(["distill", config, "--out-dir", out, "--no-progress"])
    if code != EXIT_TRAINING:
        with losers_done.get_lock():
            losers_done.value += 1
    results.put(code)


def test_concurrent_starts_give_one_winner_and_exit_5_for_the_others(tmp_path, monkeypatch):
    from singer_deploy.pipeline import api

    config = config_file(tmp_path)
    prepared = api.prepare(api.load_run_config(str(config)))   # built once: the race is in the directory step
    monkeypatch.setattr(api, "prepare", lambda _config: prepared)
    context = multiprocessing.get_context("fork")
    losers_done = context.Value("i", 0)

    def hold_until_the_losers_are_out(*args, **kwargs):
        while losers_done.value < RACERS - 1:
            os.sched_yield()
        raise TrainingError("the winner stops here")   # exit 4 marks the winner; nothing was written
    monkeypatch.setattr(api, "_run_in", hold_until_the_losers_are_out)

    outcomes = []
    for trial in range(TRIALS):
        losers_done.value = 0
        start, results = context.Barrier(RACERS), context.Queue()
        racers = [context.Process(target=_race, args=(str(config), str(tmp_path / f"out{trial}"), start,
                                                       losers_done, results)) for _ in range(RACERS)]
        for racer in racers:
            racer.start()
        for racer in racers:
            racer.join(60)
        codes = sorted(results.get(timeout=5) for _ in racers)
        outcomes.append(codes)
        # The winner failed before writing anything: at most its marker is left (when another racer created the
        # folder, the winner cannot tell it from one the user made, so it keeps it: a reusable, marked run folder).
        out = tmp_path / f"out{trial}"
        assert not out.exists() or os.listdir(out) == [MARKER], os.listdir(out)
    assert all(codes == [EXIT_TRAINING] + [EXIT_IO] * (RACERS - 1) for codes in outcomes), outcomes


# 1. A manifest.json that is not a run's.

@pytest.mark.parametrize("content, words", [
    ("{}", "no 'config' mapping (keys: none)"),
    ('{"config": 3, "files": {}}', "no 'config' mapping (keys: config, files)"),
    ("[1, 2]", "a JSON list"),
    ("{ not json", "JSONDecodeError"),
])
def test_export_of_a_directory_whose_manifest_is_not_a_runs(tmp_path, capsys, content, words):
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "manifest.json").write_text(content)
    code, err = cli(capsys, "export", folder, "--formats", "onnx")
    assert code == EXIT_INPUT and "is not a run manifest" in err and words in err and "Fix: point at" in err
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json"]


def test_export_of_a_plain_directory_says_it_is_not_a_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("plain").mkdir()
    code, err = cli(capsys, "export", "plain", "--formats", "onnx")
    assert code == EXIT_INPUT and f"plain (resolved against {tmp_path}) is not a run directory" in err


# 2. An unfinished run; 6. export RUN_DIR takes KEY=VALUE, also after --formats.

def test_export_of_an_unfinished_run_says_how_to_finish_it(killed, tmp_path, capsys):
    run = copy_of(killed, tmp_path)
    code, err = cli(capsys, "export", run, "--formats", "onnx")
    assert code == EXIT_INPUT and f"{run} holds an unfinished run" in err and "a checkpoint" in err
    assert f"`singer-deploy run CONFIG --out-dir {run}` command again" in err and "timm" not in err
    # As the message says: the same command finishes it, and then it exports, with the override applied.
    assert cli(capsys, "distill", config_file(tmp_path), "--out-dir", run)[0] == 0
    code, err = cli(capsys, "export", run, "--formats", "onnx", "export.polygraphy_goldens=true")
    assert code == 0, err
    reference = run / "export-fp32" / "goldens" / "reference"
    assert (run / "export-fp32" / "student.onnx").is_file() and (reference / "polygraphy_inputs.json").is_file()
    assert not (run / "export-fp32" / "student_fp32.xml").exists()   # --formats onnx held, the override was not
    # a format


def test_export_of_a_run_refuses_overrides_outside_export(killed, capsys):
    code, err = cli(capsys, "export", killed, "train.steps=3")
    assert code == EXIT_INPUT and "only export settings change when exporting a run" in err
    with pytest.raises(SystemExit) as usage:
        main(["export", str(killed), "--formats", "export.precision=fp16"])
    assert usage.value.code == 2 and "--formats needs at least one format name" in capsys.readouterr().err


# 5. The same message in every process.

def test_unknown_key_messages_are_the_same_in_every_process(tmp_path):
    path = config_file(tmp_path, stpes=3)
    errs = {subprocess.run([sys.executable, "-m", "singer_deploy.pipeline.cli", "check-config", str(path)],
                           capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": str(seed)}).stderr
            for seed in (1, 2, 3)}
    assert len(errs) == 1, errs
    assert "Expected: one of teacher, student, data, layers, singer, train, export, out_dir." in errs.pop()


# 6. Tracebacks only with -v; whole sentences; data: /folder; relative paths.

def test_an_internal_error_prints_its_traceback_only_with_v(tmp_path, capsys, monkeypatch):
    from singer_deploy.pipeline import cli as cli_module

    def bug(args):
        raise ZeroDivisionError("a planted bug")
    monkeypatch.setattr(cli_module, "_cmd_doctor", bug)
    parser = cli_module._parser
    monkeypatch.setattr(cli_module, "_parser", lambda: _with_handler(parser(), "doctor", bug))
    assert main(["doctor"]) == 70
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error" in err and "ZeroDivisionError: a planted bug" in err
    assert main(["-v", "doctor"]) == 70
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "a planted bug" in err


def _with_handler(parser, command: str, handler):
    parser._subparsers._group_actions[0].choices[command].set_defaults(handler=handler)
    return parser


def test_the_refused_pickle_message_keeps_whole_sentences(tmp_path, capsys):
    from test_reliability import _Payload, vit_teacher

    path = tmp_path / "teacher.pt"
    import torch
    torch.save({"blocks.0.norm1.weight": torch.ones(64), "evil": _Payload(tmp_path / "pwned")}, path)
    code, err = cli(capsys, "check-config", config_file(tmp_path, teacher=vit_teacher(path), layers=[1]))
    assert code == EXIT_INPUT and "Refused to load" in err
    found = err.split("Found: ", 1)[1].split(" (nothing in it was executed)")[0]
    assert found.endswith("."), found   # a sentence of PyTorch's message, not a cut one


def test_data_given_as_a_path_names_data_source(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**TINY, "data": str(tmp_path)}))
    code, err = cli(capsys, "check-config", path)
    assert code == EXIT_INPUT and "data: expected a mapping" in err
    assert f"data: {{source: {tmp_path}}}" in err and f"data.source={tmp_path}" in err


def test_a_relative_path_that_does_not_exist_names_where_it_was_looked_for(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config_file(tmp_path, data={"source": "images/train"})
    code, err = cli(capsys, "check-config", "run.yaml")
    assert code == EXIT_INPUT and f"images/train (resolved against {tmp_path})" in err
    code, err = cli(capsys, "check-config", "missing.yaml")
    assert code == EXIT_INPUT and f"missing.yaml (resolved against {tmp_path})" in err


# Found by the fuzzer (tests/fuzz_cli.py).

@pytest.mark.parametrize("section, value, words", [
    ("data", {"seed": -1}, "data.seed must be an integer in [0, 2**63)"),
    ("train", {"seed": 2 ** 63}, "train: TrainConfig.seed must be an integer in [0, 2**63)"),
    ("student", {"kwargs": {"img_size": 0, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}},
     "timm cannot build 'vit_tiny_patch16_224' with these kwargs values"),
])
def test_values_the_fuzzer_found_are_input_errors(tmp_path, capsys, section, value, words):
    code, err = cli(capsys, "check-config", config_file(tmp_path, **{section: value}))
    assert code == EXIT_INPUT and words in err, err


def test_a_fifo_as_data_source_is_refused_not_read(tmp_path, capsys):
    os.mkfifo(tmp_path / "fifo")
    code, err = cli(capsys, "check-config", config_file(tmp_path, data={"source": str(tmp_path / "fifo")}))
    assert code == EXIT_INPUT and "neither a folder nor a regular file" in err


# Found by the long fuzzer run (docs/reliability.md): planted-teacher values timm's VisionTransformer cannot be built
# with ended in exit 70 (AssertionError, TypeError, an overflowing seed); each is now named as the key it is.
@pytest.mark.parametrize("planted, message", [
    ({"embed_dim": 98}, "embed_dim of num_heads"),
    ({"img_size": 64.5}, "teacher.planted.img_size: wrong type"),
    ({"depth": 8.0}, "teacher.planted.depth: wrong type"),
    ({"seed": 10 ** 30}, "PlantedConfig.seed must be an integer in [0, 2**63)"),
    ({"patch_size": 0}, "PlantedConfig.patch_size must be a positive integer"),
    ({"seed": 2 ** 63}, "PlantedConfig.seed must be an integer in [0, 2**63)"),
    ({"mlp_ratio": float("inf")}, "PlantedConfig.mlp_ratio must be a finite number > 0"),
    ({"position_share": "a"}, "teacher.planted.position_share: wrong type"),
])
def test_planted_teacher_values_timm_cannot_build_are_input_errors(tmp_path, capsys, planted, message):
    code, err = cli(capsys, "check-config", config_file(tmp_path, teacher={"name": "planted", "planted": planted}))
    assert code == EXIT_INPUT and message in err
