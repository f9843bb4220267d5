"""Fault injection on the run folder: damaged outputs, a second writer, a killed lock holder, unsafe names and
paths, a full disk, SIGINT/SIGTERM during a stage, fsync, crash logs. Small fake stages on RunDir directly."""

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from calq import runs
from calq.errors import CalqError
from calq.interrupts import Interrupted, crash_line, save_crash, stop_signals
from calq.names import check_name
from calq.runs import RunDir, atomic_path, require_intact, verify, write_json

REPO = Path(__file__).resolve().parents[1]


# ---- three kinds of stage output: a JSON file, a safetensors file, a checkpoint folder --------------------------

def json_stage(run: RunDir):
    return {"result": write_json(run.path("eval", "v1.json"), {"ece": 0.0123, "bins": list(range(50))})}, {}


def safetensors_stage(run: RunDir):
    out = run.path("ranges.safetensors")
    with atomic_path(out) as tmp:
        save_file({"absmax": torch.arange(4096, dtype=torch.float32)}, str(tmp))
    return {"ranges": out}, {}


def folder_stage(run: RunDir):
    out = run.path("variants", "v1")
    with atomic_path(out) as tmp:
        (tmp / "sub").mkdir(parents=True)
        save_file({"w": torch.ones(64, 64)}, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps({"hidden_size": 64}))
        (tmp / "sub" / "recipe.yaml").write_text("quant_stage: {}\n")
    return {"model": out}, {}


STAGES = {"evaluate/v1": (json_stage, "eval/v1.json"),
          "ranges": (safetensors_stage, "ranges.safetensors"),
          "quantize/v1": (folder_stage, "variants/v1/model.safetensors")}


class Counted:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args):
        self.calls += 1
        return self.fn(*args)


def truncate(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_bit(path: Path):
    data = bytearray(path.read_bytes())
    data[len(data) - 3] ^= 0x04  # size unchanged: only the checksum can tell
    path.write_bytes(bytes(data))


def delete(path: Path):
    path.unlink()


@pytest.fixture
def run_dir(tmp_path):
    run = RunDir(tmp_path / "run")
    run.claim("faults")
    return run


def test_markers_record_size_and_sha256_and_reuse(run_dir):
    import hashlib

    for stage, (fn, _) in STAGES.items():
        run_dir.run_stage(stage, "k1", fn, run_dir)
    marker = json.loads((run_dir.meta / "stages" / "quantize" / "v1.json").read_text())
    assert set(marker["files"]) == {"variants/v1/model.safetensors", "variants/v1/config.json",
                                    "variants/v1/sub/recipe.yaml"}
    for rel, rec in marker["files"].items():
        data = (run_dir.root / rel).read_bytes()
        assert rec == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert verify(run_dir.root) == []
    again = RunDir(run_dir.root)
    for stage, (fn, _) in STAGES.items():
        counted = Counted(fn)
        rec = again.run_stage(stage, "k1", counted, again)
        assert rec.reused and counted.calls == 0 and rec.redone is None
    assert again.notes == []


@pytest.mark.parametrize("damage,kind", [(truncate, "truncated"), (flip_bit, "damaged"), (delete, "missing")])
@pytest.mark.parametrize("stage", list(STAGES))
def test_damaged_output_is_detected_and_the_stage_redone(run_dir, stage, damage, kind):
    fn, rel = STAGES[stage]
    run_dir.run_stage(stage, "k1", fn, run_dir)
    good = (run_dir.root / rel).read_bytes()
    damage(run_dir.root / rel)

    problems = verify(run_dir.root)
    assert [(p.stage, p.path, p.kind) for p in problems] == [(stage, rel, kind)]
    with pytest.raises(CalqError, match=rel):
        require_intact(run_dir.root)

    again = RunDir(run_dir.root)
    counted = Counted(fn)
    rec = again.run_stage(stage, "k1", counted, again)
    assert counted.calls == 1 and not rec.reused
    word = {"evaluate": "evaluation", "ranges": "range collection", "quantize": "quantization"}[stage.split("/")[0]]
    assert again.notes == [f"{rel} was {kind}: {word} redone"] and rec.redone == again.notes[0]
    assert json.loads((again.meta / "stages" / f"{stage}.json").read_text())["redone"] == rec.redone
    assert (run_dir.root / rel).read_bytes() == good
    assert verify(run_dir.root) == []


def test_unreadable_or_old_markers_are_redone(run_dir):
    run_dir.run_stage("ranges", "k1", safetensors_stage, run_dir)
    run_dir.run_stage("evaluate/v1", "k1", json_stage, run_dir)
    run_dir.run_stage("quantize/v1", "k1", folder_stage, run_dir)
    (run_dir.meta / "stages" / "ranges.json").write_text('{"key": "k1", "outp')  # torn marker
    old = json.loads((run_dir.meta / "stages" / "evaluate" / "v1.json").read_text())
    del old["files"]  # a marker from before checksums
    (run_dir.meta / "stages" / "evaluate" / "v1.json").write_text(json.dumps(old))
    edited = json.loads((run_dir.meta / "stages" / "quantize" / "v1.json").read_text())
    edited["files"]["variants/v1/config.json"] = "by hand"  # valid JSON, not a marker's shape
    (run_dir.meta / "stages" / "quantize" / "v1.json").write_text(json.dumps(edited))
    assert {(p.stage, p.kind) for p in verify(run_dir.root)} == {
        ("ranges", "unreadable"), ("evaluate/v1", "without checksums"), ("quantize/v1", "unreadable")}
    again = RunDir(run_dir.root)
    assert all(again.finished(stage, "k1") is None for stage in STAGES)
    assert again.notes == [".calq/stages/evaluate/v1.json was without checksums: evaluation redone",
                           ".calq/stages/ranges.json was unreadable: range collection redone",
                           ".calq/stages/quantize/v1.json was unreadable: quantization redone"]
    for stage in STAGES:
        again.run_stage(stage, "k1", STAGES[stage][0], again)
    assert verify(run_dir.root) == []


def test_quick_check_reads_sizes_only(run_dir):
    run_dir.run_stage("ranges", "k1", safetensors_stage, run_dir)
    flip_bit(run_dir.path("ranges.safetensors"))
    assert run_dir.finished("ranges", "k1", deep=False) is not None  # same size: not seen without reading bytes
    assert run_dir.finished("ranges", "k1") is None


def test_verify_refuses_a_folder_calq_did_not_make(tmp_path):
    with pytest.raises(CalqError, match="not a calq run folder"):
        verify(tmp_path)


# ---- one writer per folder ---------------------------------------------------------------------------------------

HOLDER = textwrap.dedent("""
    import sys, time
    from calq.runs import RunDir
    run = RunDir(sys.argv[1])
    with run.lock():
        run.claim("faults")
        print("locked", flush=True)
        time.sleep(60)
""")


def start_holder(folder: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_writer_is_refused_in_process(tmp_path):
    with RunDir(tmp_path / "run").lock(), pytest.raises(CalqError, match=f"in use by calq process {os.getpid()} "),\
            RunDir(tmp_path / "run").lock():
        pass
    with RunDir(tmp_path / "run").lock():  # released on exit
        pass


def test_lock_holder_killed_with_sigkill_is_taken_over(tmp_path):
    folder = tmp_path / "run"
    proc = start_holder(folder)
    try:
        with pytest.raises(CalqError, match=f"in use by calq process {proc.pid} ") as err, RunDir(folder).lock():
            pass
        assert f"kill {proc.pid}" in err.value.fix
    finally:
        proc.kill()  # SIGKILL: no cleanup code of the holder runs
        proc.wait()
    assert json.loads((folder / ".calq" / "lock").read_text())["pid"] == proc.pid  # its details are still there
    run = RunDir(folder)
    with run.lock():
        assert json.loads((folder / ".calq" / "lock").read_text())["pid"] == os.getpid()
        run.claim("faults")
        run.run_stage("ranges", "k1", safetensors_stage, run)


def test_lock_does_not_touch_a_foreign_folder_and_works_before_claim(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(CalqError, match="not made by calq"), RunDir(foreign).lock():
        pass
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    new = RunDir(tmp_path / "new")
    with new.lock():
        new.claim("faults")  # the lone lock file does not make the new folder "not empty"
    assert (tmp_path / "new" / ".calq" / "run.json").is_file()


# ---- names and paths ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["../escape", "a/b", "a\\b", "..", ".", ".hidden", "", "x" * 101, "with space",
                                 "tab\t", "new\nline", "nul", "COM1.txt", "ünïcode", 5, None])
def test_unsafe_names_are_refused(bad):
    with pytest.raises(CalqError) as err:
        check_name(bad, "variants[0].name")
    assert err.value.where == "variants[0].name" and err.value.fix
    assert "\n" not in err.value.line()


@pytest.mark.parametrize("good", ["quickstart", "awq-w4a16-g64", "v1.2_final", "a" * 100, "A.b-C_d"])
def test_safe_names_pass(good):
    assert check_name(good, "name") == good


def test_fix_suggests_a_safe_name():
    with pytest.raises(CalqError) as err:
        check_name("../my run/", "name")
    suggested = err.value.fix.split("'")[-2]
    assert check_name(suggested, "name") == "my-run"


def test_disk_full_while_creating_the_folder_names_an_existing_one(run_dir, monkeypatch):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "mkdir", no_space)
    with pytest.raises(CalqError, match="disk full while writing v1.json") as err, \
            atomic_path(run_dir.path("eval", "deeper", "v1.json")) as tmp:
        tmp.write_text("{}")
    assert err.value.where == str(run_dir.path("eval", "deeper"))


@pytest.mark.parametrize("parts", [("..", "x"), ("variants", "..", "..", "x"), ("/etc/passwd",), ("eval", "/tmp/x")])
def test_paths_outside_the_run_folder_are_refused(run_dir, parts):
    with pytest.raises(CalqError, match="leads outside the run folder"):
        run_dir.path(*parts)


def test_a_link_leading_outside_is_refused(run_dir, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (run_dir.root / "variants").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(CalqError, match="outside"):
        run_dir.path("variants", "v1")
    assert run_dir.path("variants-ok", "..", "eval", "v1.json") == run_dir.root / "variants-ok/../eval/v1.json"


# ---- a full disk -----------------------------------------------------------------------------------------------

def test_disk_full_removes_the_temp_keeps_earlier_results_and_names_the_folder(run_dir, monkeypatch):
    run_dir.run_stage("evaluate/v1", "k1", json_stage, run_dir)
    before = {p: p.read_bytes() for p in run_dir.root.rglob("*") if p.is_file() and p.name != "lock"}

    def fills_the_disk(run):
        out = run.path("variants", "v1")
        with atomic_path(out) as tmp:
            tmp.mkdir()
            (tmp / "part-1.bin").write_bytes(b"\0" * 100_000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return {"model": out}, {}

    with pytest.raises(CalqError) as err:
        run_dir.run_stage("quantize/v1", "k1", fills_the_disk, run_dir)
    line = err.value.line()
    assert err.value.where == str(run_dir.path("variants")) and "free on that disk" in line and "0.1 MB" in line
    assert list(run_dir.root.rglob(".*.tmp-*")) == []
    assert {p: p.read_bytes() for p in run_dir.root.rglob("*") if p.is_file() and p.name != "lock"} == before
    assert not (run_dir.meta / "stages" / "quantize").exists()
    assert verify(run_dir.root) == []


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MB tmpfs (needs the right to mount: root in a container with CAP_SYS_ADMIN), else the test is skipped."""
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True,
                             check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_a_real_full_disk(small_disk):
    run = RunDir(small_disk / "run")
    run.claim("faults")
    run.run_stage("evaluate/v1", "k1", json_stage, run)
    big = torch.zeros(1_000_000)  # 4 MB

    def big_checkpoint(run):
        out = run.path("variants", "v1")
        with atomic_path(out) as tmp:
            tmp.mkdir()
            save_file({"w": big}, str(tmp / "model.safetensors"))  # safetensors' own error type
        return {"model": out}, {}

    def big_json(run):
        return {"result": write_json(run.path("eval", "v2.json"), {"x": "y" * 3_000_000})}, {}

    for stage, fn in (("quantize/v1", big_checkpoint), ("evaluate/v2", big_json)):
        with pytest.raises(CalqError, match="disk full while writing .* free on that disk"):
            run.run_stage(stage, "k1", fn, run)
    assert list(run.root.rglob(".*.tmp-*")) == [] and verify(run.root) == []
    assert json.loads(run.path("eval", "v1.json").read_text())["ece"] == 0.0123


@pytest.mark.parametrize("where", ["library", "fsync"])
def test_disk_full_reported_by_a_library_or_by_fsync(run_dir, monkeypatch, where):
    if where == "fsync":
        monkeypatch.setattr(runs.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space")))
    with pytest.raises(CalqError, match="disk full while writing ranges.safetensors"), \
            atomic_path(run_dir.path("ranges.safetensors")) as tmp:
        tmp.write_bytes(b"x" * 10)
        if where == "library":  # safetensors' Rust writer raises its own type with the OS message
            raise RuntimeError("Error while serializing: IoError(No space left on device (os error 28))")
    assert not run_dir.path("ranges.safetensors").exists() and list(run_dir.root.rglob(".*.tmp-*")) == []


def test_other_errors_pass_through_unchanged(run_dir):
    with pytest.raises(ValueError, match="boom"), atomic_path(run_dir.path("x.json")) as tmp:
        tmp.write_text("{}")
        raise ValueError("boom")
    assert list(run_dir.root.rglob(".*.tmp-*")) == []


# ---- durability --------------------------------------------------------------------------------------------------

def test_every_file_and_folder_is_fsynced_before_and_after_the_rename(run_dir, monkeypatch):
    synced, real_fsync = [], os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(runs.os, "fsync", recording_fsync)
    folder_stage(run_dir)
    inside = [p.split("/.v1.tmp-", 1)[1].partition("/")[2] for p in synced if "/.v1.tmp-" in p]
    assert set(inside) == {"config.json", "model.safetensors", "sub/recipe.yaml", "sub", ""}  # files, folders, top
    assert synced[-1] == str(run_dir.root / "variants")  # the parent, after the rename
    synced.clear()
    with atomic_path(run_dir.path("x.json"), durable=False) as tmp:
        tmp.write_text("{}")
    assert synced == []


# ---- interrupts and crashes --------------------------------------------------------------------------------------

SLOW_RUN = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from calq.interrupts import Interrupted, stop_signals
    from calq.runs import RunDir, atomic_path, write_json

    run = RunDir(sys.argv[1])

    def first(run):
        return {"a": write_json(run.path("a.json"), {"a": 1})}, {}

    def slow(run):
        out = run.path("variants", "slow")
        with atomic_path(out) as tmp:
            tmp.mkdir()
            (tmp / "weights.bin").write_bytes(b"w" * 1_000_000)
            print("writing", flush=True)
            time.sleep(float(sys.argv[2]))
        return {"model": out}, {}

    try:
        with run.lock(), stop_signals(lambda: run.current_stage):
            run.claim("faults")
            run.run_stage("first", "k", first, run)
            run.run_stage("quantize/slow", "k", slow, run)
    except KeyboardInterrupt as exc:
        print(exc.line(), flush=True)
        sys.exit(exc.exit_code)
    print("done", flush=True)
""")


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_sigint_and_sigterm_during_a_stage_leave_a_resumable_folder(tmp_path, sig, code):
    folder = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_RUN, str(folder), "60"], stdout=subprocess.PIPE, text=True,
                            env=env)
    assert proc.stdout.readline().strip() == "writing"
    assert list(folder.rglob(".slow.tmp-*"))  # the half-written checkpoint exists under its temporary name
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == code
    assert out.strip() == (f"interrupted ({sig.name}) during quantize/slow; finished stages are kept; "
                           "run the same command to resume")
    assert list(folder.rglob(".*.tmp-*")) == [] and not (folder / "variants" / "slow").exists()
    assert (folder / ".calq" / "stages" / "first.json").is_file()
    assert (folder / ".calq" / "lock").read_text() == ""  # released and cleared

    again = subprocess.run([sys.executable, "-c", SLOW_RUN, str(folder), "0"], capture_output=True, text=True, env=env,
                           check=False)
    assert again.returncode == 0 and again.stdout.split()[-1] == "done"
    assert verify(folder) == [] and (folder / "variants" / "slow" / "weights.bin").stat().st_size == 1_000_000


def test_interrupted_is_not_swallowed_by_except_exception():
    caught = None
    with stop_signals(lambda: "evaluate/v1"):
        try:
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            except Exception:  # noqa: BLE001 - what a library's broad handler would do
                pytest.fail("SIGTERM was swallowed")
        except Interrupted as exc:
            caught = exc
    assert caught.exit_code == 143 and caught.stage == "evaluate/v1"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the previous handler is back


def test_current_stage_names_the_running_stage_and_the_one_that_raised(run_dir):
    seen = []

    def fails(run):
        seen.append(run.current_stage)
        raise KeyboardInterrupt

    run_dir.run_stage("ranges", "k1", lambda run: seen.append(run.current_stage) or safetensors_stage(run), run_dir)
    assert run_dir.current_stage is None
    with pytest.raises(KeyboardInterrupt):
        run_dir.run_stage("quantize/v1", "k1", fails, run_dir)
    assert seen == ["ranges", "quantize/v1"] and run_dir.current_stage == "quantize/v1"


def test_save_crash_writes_the_traceback_under_logs(tmp_path):
    try:
        {}["missing key"]
    except KeyError as exc:
        path = save_crash(exc, tmp_path / "run" / "logs")
        second = save_crash(exc, tmp_path / "run" / "logs")
        line = crash_line(exc, path)
    assert path.parent == tmp_path / "run" / "logs" and path.name.startswith("crash-") and second != path
    text = path.read_text()
    assert "Traceback (most recent call last)" in text and "KeyError: 'missing key'" in text
    assert "test_save_crash_writes_the_traceback_under_logs" in text
    assert "\n" not in line and str(path) in line and line.startswith("internal error: KeyError")


def test_hash_recorded_at_write_time_matches_the_bytes(run_dir, monkeypatch):
    out, _ = safetensors_stage(run_dir)
    path = out["ranges"]
    assert str(path) in runs._written
    reads = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: reads.append(p) or real_open(p, *a, **k))
    digest = runs.file_digest(path)
    assert reads == []  # taken from the write, not read again
    monkeypatch.undo()
    assert digest == runs.file_digest(path)  # the second call reads the file: the same sha256
    assert load_file(str(path))["absmax"].shape == (4096,)


# ---- end to end through `calq run` on the tiny recipe ------------------------------------------------------------

def test_calq_run_redoes_exactly_the_damaged_stages(tiny_recipe, write_recipe, tmp_path):
    from typer.testing import CliRunner

    from calq.cli import app

    def calq_run(out):
        result = CliRunner().invoke(app, ["run", str(write_recipe(tiny_recipe)), "--out", str(out)])
        assert result.exit_code == 0, result.output
        report = json.loads((out / "report.json").read_text())
        return [{k: v[k] for k in ("variant", "ppl", "accuracy", "ece", "brier", "tokens")} for v in report["variants"]]

    out = tmp_path / "run"
    first = calq_run(out)
    assert verify(out) == []
    stages = out / ".calq" / "stages"
    before = {m.relative_to(stages).as_posix(): m.stat().st_mtime_ns for m in stages.rglob("*.json")}
    flip_bit(out / "eval" / "minmax-w8a8.json")
    truncate(out / "variants" / "minmax-w4a16-g32" / "model.safetensors")
    assert {(p.stage, p.kind) for p in verify(out)} == {("evaluate/minmax-w8a8", "damaged"),
                                                        ("quantize/minmax-w4a16-g32", "truncated")}

    assert calq_run(out) == first
    after = {m.relative_to(stages).as_posix(): m.stat().st_mtime_ns for m in stages.rglob("*.json")}
    redone = {name for name in before if after[name] != before[name]}
    assert redone == {"evaluate/minmax-w8a8.json", "quantize/minmax-w4a16-g32.json"}
    assert verify(out) == []
