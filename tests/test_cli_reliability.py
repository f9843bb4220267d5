"""The reliability of `calq run` / `calq report` / `calq verify` on the tiny recipe: one writer per folder,
SIGTERM during a stage, an internal error (exit 3 + crash log), a damaged folder, unsafe names."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from calq.cli import app
from calq.runs import verify

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in output, output
    return lines[0]


def test_a_second_calq_run_on_a_locked_folder_exits_2_naming_the_holder(tiny_recipe, write_recipe, tmp_path):
    out = tmp_path / "run"
    holder = textwrap.dedent("""
        import sys, time
        from calq.runs import RunDir
        run = RunDir(sys.argv[1])
        with run.lock():
            run.claim("tiny")
            print("locked", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", holder, str(out)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout.readline().strip() == "locked"
        result = runner.invoke(app, ["run", str(write_recipe(tiny_recipe)), "--out", str(out)])
        assert result.exit_code == 2
        assert f"in use by calq process {proc.pid}" in one_error_line(result.output)
        assert not (out / ".calq" / "stages").exists()  # nothing ran
    finally:
        proc.kill()
        proc.wait()


# `calq run` whose first checkpoint save (quantize/minmax-w8a8) writes its files, then says so in a file and waits:
# the signal reaches a stage known to be running, with a temporary folder to clean up.
PAUSED_RUN = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from transformers import PreTrainedModel
    from calq.cli import app

    save, flag = PreTrainedModel.save_pretrained, Path(sys.argv.pop(1))

    def save_then_wait(self, *args, **kwargs):
        save(self, *args, **kwargs)
        flag.touch()
        time.sleep(120)

    PreTrainedModel.save_pretrained = save_then_wait
    app()
""")


def test_sigterm_during_a_stage_exits_143_and_the_run_resumes(tiny_recipe, write_recipe, tmp_path):
    path, out, flag = write_recipe(tiny_recipe), tmp_path / "run", tmp_path / "saved"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", PAUSED_RUN, str(flag), "run", str(path), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not flag.exists() and proc.poll() is None:
        time.sleep(0.05)
    assert flag.exists(), proc.communicate()[0]
    assert list(out.rglob(".minmax-w8a8.tmp-*"))  # the checkpoint, half saved
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, output
    assert "interrupted (SIGTERM) during quantize/minmax-w8a8" in output and "run the same command to resume" in output
    assert "Traceback" not in output
    assert list(out.rglob(".*.tmp-*")) == []
    result = runner.invoke(app, ["run", str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert verify(out) == []


def test_an_internal_error_exits_3_with_one_line_and_a_crash_log(tiny_recipe, write_recipe, tmp_path, monkeypatch):
    from calq.stage_kinds import ranges

    def broken(ctx, *args):
        raise ZeroDivisionError("a bug in a stage")

    monkeypatch.setattr(ranges, "stage_ranges", broken)
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", str(write_recipe(tiny_recipe)), "--out", str(out)])
    assert result.exit_code == 3
    line = one_error_line(result.output)
    crash = next((out / "logs").glob("crash-*.txt"))
    assert "internal error: ZeroDivisionError: a bug in a stage" in line and str(crash) in line
    assert "Traceback (most recent call last)" in crash.read_text() and "def broken" not in line
    assert (out / ".calq" / "stages" / "samples.json").is_file()  # the stage before it is kept


def test_damaged_folder_verify_report_and_rerun(tiny_recipe, write_recipe, tmp_path):
    path, out = write_recipe(tiny_recipe), tmp_path / "run"
    assert runner.invoke(app, ["run", str(path), "--out", str(out)]).exit_code == 0
    assert runner.invoke(app, ["verify", str(out)]).exit_code == 0
    victim = out / "eval" / "minmax-w8a8.json"
    victim.write_bytes(victim.read_bytes()[:100])

    checked = runner.invoke(app, ["verify", str(out)])
    assert checked.exit_code == 2 and "eval/minmax-w8a8.json" in checked.output and "truncated" in checked.output
    refused = runner.invoke(app, ["report", str(out)])
    assert refused.exit_code == 2 and "eval/minmax-w8a8.json" in one_error_line(refused.output)

    redone = runner.invoke(app, ["run", str(path), "--out", str(out)])
    assert redone.exit_code == 0, redone.output
    note = "eval/minmax-w8a8.json was truncated: evaluation redone"
    assert note in redone.output and note in json.loads((out / "report.json").read_text())["notes"]
    assert runner.invoke(app, ["verify", str(out)]).exit_code == 0
    assert runner.invoke(app, ["report", str(out)]).exit_code == 0


@pytest.mark.parametrize("where", ["recipe", "variant"])
def test_unsafe_names_are_refused_before_any_work(tiny_recipe, write_recipe, tmp_path, where):
    if where == "recipe":
        tiny_recipe["name"] = "../escape"
    else:
        tiny_recipe["variants"][0]["name"] = "../../escape"
    result = runner.invoke(app, ["run", str(write_recipe(tiny_recipe)), "--dry-run", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "escape" in one_error_line(result.output)


def test_the_console_shows_calqs_lines_and_not_the_libraries_bars_or_warnings(tiny_recipe, write_recipe, tmp_path):
    """lm-eval draws its bars with `disable=` given, which TQDM_DISABLE alone cannot hide, and torch and the exporters
    warn on their own: without --verbose, a run with a tasks stage shows calq's lines only."""
    data = tmp_path / "data"
    (data / "mc").mkdir(parents=True)
    questions = [{"query": f"Question: Which colour goes with {i}?", "choices": ["red", "green", "blue"], "gold": i % 3}
                 for i in range(6)]
    (data / "mc" / "arc_easy.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    tiny_recipe["variants"] = tiny_recipe["variants"][1:]
    tiny_recipe["evaluation"]["tasks"] = {"names": ["arc_easy"], "limit": 6, "bootstrap": 50}
    # calq.cli, imported by this test module, set these in this process: the CLI below must set them itself
    env = {k: v for k, v in os.environ.items() if k not in ("TQDM_DISABLE", "LLM_COMPRESSOR_LOG_LEVEL")}
    proc = subprocess.run([sys.executable, "-m", "calq.cli", "run", str(write_recipe(tiny_recipe)),
                           "--out", str(tmp_path / "run"), "--data-dir", str(data)],
                          capture_output=True, text=True, env={**env, "PYTHONPATH": str(REPO)})
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "✓ tasks/baseline" in output and "report:" in output
    assert "Tokenizing inputs" not in output and "it/s]" not in output
    assert not [line for line in output.splitlines() if "warn" in line.lower()], output
