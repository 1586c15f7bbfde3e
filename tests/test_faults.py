"""Fault injection on tracked runs (issue 9): nothing a completed step wrote is ever lost.

Faults: the training process (``python -m lipfast train`` in a subprocess) killed with SIGKILL or SIGINT
after a random delay or once a random number of records are in layers.csv (also while it resumes); a full
disk, both real (``RLIMIT_FSIZE`` in the child: the kernel answers EFBIG once a file would grow past the
limit, as a full disk answers ENOSPC) and simulated (``os.write`` failing with ENOSPC for the run
folder's files, in process); an exception raised by a user's ``Tracker(on_record=...)`` callback.
After each fault:

- the partial run loads (``runio.load_run``) and holds a prefix of the uninterrupted run's records: every
  step it holds is complete (all layers) and equal, value for value, to the uninterrupted run's;
- the checkpoint, where there is one, is never ahead of the records;
- ``lipfast report DIR`` works on it (or, with no records yet, says so in one line, status 2);
- ``lipfast train --resume --out DIR`` completes it to exactly the uninterrupted run's records (parsed values
  compared exactly, NaN == NaN).

Safety: a checkpoint whose pickle would run code (``__reduce__``) is refused by ``--resume`` with one clear
line and never executed; layer names and config strings full of HTML/JS are escaped in report.html; a config
file that looks like code is only ever parsed as TOML.

The default suite runs a fast variant (one trial of each subprocess fault, ~5 trials); ``-m slow`` runs
the long randomised loop (``SLOW_TRIALS`` trials). Counts and outcomes: docs/RELIABILITY.md.
"""

from __future__ import annotations

import errno
import html
import json
import math
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lipfast import runio
from lipfast.cli import main
from lipfast.tracker import Tracker

# digits, 200 samples -> 160 train; batch 32 -> 5 steps per epoch. Momentum (optimizer state) and rank 3 <
# min(m, n) (warm-started truncated spectra) must both come back from the checkpoint; checkpoint_every 4
# does not divide 24, so a resume usually redoes steps recorded after the last checkpoint.
RUN_ARGS = ["train", "--dataset", "digits", "--n-samples", "200", "--batch-size", "32", "--widths", "16", "16",
            "--rank", "3", "--momentum", "0.9", "--steps", "24", "--checkpoint-every", "4", "--quiet",
            "--no-report"]
N_LAYERS = 3                  # Linear 64->16, 16->16, 16->10
N_STEPS = 24
SLOW_TRIALS = 24
TIMEOUT = 240                 # seconds for one subprocess (the shared 2-core machine can be slow)


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def same_value(a, b) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def assert_same_records(got: list[dict], want: list[dict], what: str) -> None:
    """Exact equality of parsed records, NaN == NaN."""
    assert len(got) == len(want), f"{what}: {len(got)} rows, expected {len(want)}"
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.keys() == b.keys(), what
        for k in a:
            assert same_value(a[k], b[k]), f"{what} row {i} (step {a.get('step')}) {k}: {a[k]!r} != {b[k]!r}"


def lipfast_cmd(*args: str, fsize_limit: int | None = None) -> list[str]:
    """``python -m lipfast ARGS``; with ``fsize_limit``, under RLIMIT_FSIZE (set in the child itself, so no
    preexec_fn runs in this multi-threaded process). Python ignores SIGXFSZ, so writes past the limit fail
    with EFBIG."""
    if fsize_limit is None:
        return [sys.executable, "-m", "lipfast", *args]
    boot = ("import resource, runpy, sys; "
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({fsize_limit}, {fsize_limit})); "
            "sys.argv = ['lipfast'] + sys.argv[1:]; runpy.run_module('lipfast', run_name='__main__')")
    return [sys.executable, "-c", boot, *args]


def run_cli(*args: str, fsize_limit: int | None = None, stderr: Path | None = None) -> subprocess.CompletedProcess:
    err = open(stderr, "wb") if stderr else subprocess.DEVNULL
    try:
        return subprocess.run(lipfast_cmd(*args, fsize_limit=fsize_limit), stdout=subprocess.DEVNULL, stderr=err,
                              timeout=TIMEOUT, check=False)
    finally:
        if stderr:
            err.close()


def data_lines(path: Path) -> int:
    try:
        return max(path.read_bytes().count(b"\n") - 1, 0)
    except FileNotFoundError:
        return 0


def last_line(path: Path) -> str:
    """lipfast's one message line, which ends stderr; before it at most the run's own progress lines (a fault
    that lands after the last step's progress line, while the run writes its report, follows that line)."""
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert lines and "Traceback" not in text, f"expected lipfast's message on stderr, got {text!r}"
    assert all(ln.startswith("lipfast: step ") for ln in lines[:-1]), f"expected one message line, got {text!r}"
    return lines[-1]


def one_line(path: Path) -> str:
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in text, f"expected one line on stderr, got {text!r}"
    return lines[0]


@dataclass
class Outcome:
    label: str
    rc: int | None
    net_steps: int = 0
    layer_steps: int = 0
    checkpoint: int | None = None
    folder: bool = True


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> runio.Run:
    """The uninterrupted run, made the same way as the faulted ones (a subprocess)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert run_cli(*RUN_ARGS, "--out", str(out)).returncode == 0
    run = runio.load_run(out)
    assert len(run.network) == N_STEPS and len(run.layers) == N_STEPS * N_LAYERS
    return run


def check_partial(out: Path, ref: runio.Run, label: str, rc: int | None) -> Outcome:
    """What a faulted run left: a loadable prefix of complete steps equal to the reference's."""
    if not runio.is_run_folder(out):
        # stopped before the run folder was made: nothing was recorded, nothing is there to lose
        assert not (out / runio.LAYERS_FILE).exists(), label
        return Outcome(label, rc, folder=False)
    run = runio.load_run(out)
    net_steps = len(run.network)
    assert [r["step"] for r in run.network] == list(range(net_steps)), label
    assert len(run.layers) % N_LAYERS == 0, f"{label}: a step with only some of its layers"
    layer_steps = len(run.layers) // N_LAYERS
    assert [r["step"] for r in run.layers] == [s for s in range(layer_steps) for _ in range(N_LAYERS)], label
    assert 0 <= layer_steps - net_steps <= 1, f"{label}: {layer_steps} layer steps vs {net_steps} network steps"
    assert_same_records(run.layers, ref.layers[: len(run.layers)], f"{label}: layers.csv")
    assert_same_records(run.network, ref.network[:net_steps], f"{label}: network.csv")
    if (run.summary or {}).get("finished") is True:  # a signal after the run ended: it is all there
        assert net_steps == N_STEPS and layer_steps == N_STEPS, label
    ckpt = None
    if (out / runio.CHECKPOINT_FILE).exists():
        state = torch.load(out / runio.CHECKPOINT_FILE, weights_only=True)
        ckpt = int(state["step"])
        assert ckpt <= net_steps, f"{label}: checkpoint at step {ckpt} is ahead of {net_steps} recorded steps"
    return Outcome(label, rc, net_steps, layer_steps, ckpt)


def check_report(out: Path, capsys, outcome: Outcome) -> None:
    """``lipfast report`` on the partial run: a report, or one clear line when there is nothing to report."""
    if not outcome.folder:
        return
    capsys.readouterr()
    rc = main(["report", str(out)])
    _, err = capsys.readouterr()
    if outcome.layer_steps:
        assert rc == 0, f"{outcome.label}: report failed: {err}"
        text = (out / runio.REPORT_FILE).read_text(encoding="utf-8")
        assert "<figure>" in text and "Traceback" not in err
    else:
        assert rc == 2 and "no layer records" in err and len(err.splitlines()) == 1, (outcome.label, err)


def resume_and_compare(out: Path, ref: runio.Run, outcome: Outcome, tmp: Path, capsys=None) -> None:
    """``lipfast train --resume --out DIR`` completes the run to the uninterrupted run's records. A run stopped
    before its folder existed cannot be resumed (one clear line); the same command without --resume starts it.
    With ``capsys`` the command runs in this process (``lipfast.cli.main``), else as a subprocess."""
    err = tmp / f"{out.name}.resume.err"
    resume = ["train", "--resume", "--out", str(out), "--quiet", "--no-report"]

    def cli(args):
        if capsys is None:
            return run_cli(*args, stderr=err).returncode
        capsys.readouterr()
        rc = main(list(args))
        err.write_text(capsys.readouterr()[1], encoding="utf-8")
        return rc

    if not outcome.folder:
        assert cli(resume) == 2 and "cannot resume" in one_line(err), outcome.label
        rc = cli([*RUN_ARGS, "--out", str(out)])
    else:
        rc = cli(resume)
    assert rc == 0, f"{outcome.label}: resume exited {rc}: {err.read_text(errors='replace')}"
    got = runio.load_run(out)
    assert_same_records(got.layers, ref.layers, f"{outcome.label}: resumed layers.csv")
    assert_same_records(got.network, ref.network, f"{outcome.label}: resumed network.csv")
    assert got.dropped_lines == 0 and got.summary["finished"] is True and got.summary["steps"] == N_STEPS
    assert got.config == ref.config


def kill_run(out: Path, sig: int, trigger: str, amount: float, tmp: Path, extra: tuple[str, ...] = (),
             resume: bool = False) -> tuple[int | None, Path]:
    """Start ``lipfast train`` (or ``--resume``) into ``out`` and send ``sig`` once ``trigger`` fires:
    ``"records"``: ``amount`` data lines are in layers.csv; ``"delay"``: ``amount`` seconds after the first
    record (of this process) appeared; ``"config"``: ``amount`` seconds after config.json appeared (a resume:
    after the start); ``"start"``: ``amount`` seconds after the process started. Returns (exit status, stderr
    file)."""
    err = tmp / f"{out.name}.{'resume' if resume else 'run'}.err"
    args = ("train", "--resume", "--out", str(out), "--quiet", "--no-report") if resume else (*RUN_ARGS, "--out", str(out))
    with open(err, "wb") as ferr:
        proc = subprocess.Popen(lipfast_cmd(*args, *extra), stdout=subprocess.DEVNULL, stderr=ferr)
        t0 = time.monotonic()
        t_cfg = t0 if resume else None
        t_rec = None
        lines0 = data_lines(out / runio.LAYERS_FILE)
        try:
            while proc.poll() is None:
                now = time.monotonic()
                if now - t0 > TIMEOUT:
                    raise AssertionError(f"lipfast train did not finish in {TIMEOUT} s")
                if t_cfg is None and (out / runio.CONFIG_FILE).exists():
                    t_cfg = now
                lines = data_lines(out / runio.LAYERS_FILE)
                if t_rec is None and lines > lines0:
                    t_rec = now
                fire = ((trigger == "records" and lines >= amount)
                        or (trigger == "delay" and t_rec is not None and now - t_rec >= amount)
                        or (trigger == "config" and t_cfg is not None and now - t_cfg >= amount)
                        or (trigger == "start" and now - t0 >= amount))
                if fire:
                    proc.send_signal(sig)
                    break
                time.sleep(0.002)
            rc = proc.wait(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return rc, err


def check_signal_exit(rc: int, sig: int, err: Path, out: Path, label: str, resume: bool = False) -> None:
    """SIGKILL: killed (or it had just finished). SIGINT: lipfast's one line pointing at --resume, and status
    130 or death by SIGINT (-2, which a shell also reports as 130): CPython re-raises SIGINT at exit when the
    interrupt landed in source it ran through ``exec(str)`` (dataclass and namedtuple creation, here in
    torch's lazy import of torch._dynamo when the optimizer is created), even after lipfast handled it. With no line at all,
    the interrupt came while Python still imported lipfast and torch, before lipfast's main() ran: no run
    folder then (a resume leaves the folder as it was)."""
    if rc == 0:
        return  # the signal arrived after the run had finished
    if sig == signal.SIGKILL:
        assert rc == -signal.SIGKILL, f"{label}: exit {rc}"
        return
    text = err.read_text(encoding="utf-8", errors="replace")
    if "lipfast: interrupted" in text:
        assert rc in (130, -signal.SIGINT), f"{label}: exit {rc}: {text}"
        assert "--resume" in last_line(err), f"{label}: {text!r}"
    else:
        # No line: either the interrupt came while Python still imported lipfast and torch (no run folder
        # yet), or after lipfast had finished its work, at interpreter shutdown (it had printed its last
        # step). Either way the checks that follow (records, report, resume) decide whether anything was lost.
        started = "lipfast: step" in text
        assert rc == -signal.SIGINT and (resume or started or not runio.is_run_folder(out)), f"{label}: exit {rc}: {text}"


# ----------------------------------------------------------------------------------------------
# One trial of each subprocess fault
# ----------------------------------------------------------------------------------------------
def signal_trial(tmp: Path, ref, capsys, name: str, sig: int, trigger: str, amount: float,
                 kill_resume: tuple[str, float] | None = None, inprocess_resume: bool = False) -> Outcome:
    out = tmp / name
    label = f"{name}: {signal.Signals(sig).name} on {trigger}={amount:.3g}"
    rc, err = kill_run(out, sig, trigger, amount, tmp)
    check_signal_exit(rc, sig, err, out, label)
    outcome = check_partial(out, ref, label, rc)
    if kill_resume is not None and outcome.folder:
        # interrupted again while resuming
        rc2, err2 = kill_run(out, sig, kill_resume[0], kill_resume[1], tmp, resume=True)
        label += f", then its resume on {kill_resume[0]}={kill_resume[1]:.3g}"
        check_signal_exit(rc2, sig, err2, out, label, resume=True)
        outcome = check_partial(out, ref, label, rc2)
    check_report(out, capsys, outcome)
    resume_and_compare(out, ref, outcome, tmp, capsys if inprocess_resume else None)
    return outcome


def disk_full_trial(tmp: Path, ref, capsys, name: str, limit: int, inprocess_resume: bool = False) -> Outcome:
    """A real full disk for the child: RLIMIT_FSIZE ``limit`` bytes per file."""
    out = tmp / name
    label = f"{name}: RLIMIT_FSIZE {limit} bytes"
    err = tmp / f"{name}.err"
    rc = run_cli(*RUN_ARGS, "--out", str(out), fsize_limit=limit, stderr=err).returncode
    if rc != 0:
        line = last_line(err)
        assert rc == 2 and re.search(r"cannot (write|open|create).*File too large", line), (label, line)
        assert "[Errno" not in line, line
    outcome = check_partial(out, ref, label, rc)
    check_report(out, capsys, outcome)
    resume_and_compare(out, ref, outcome, tmp, capsys if inprocess_resume else None)
    return outcome


def enospc_trial(tmp: Path, ref, capsys, monkeypatch, name: str, after: int, inprocess_resume: bool = False) -> Outcome:
    """``os.write`` fails with ENOSPC for every file of the run folder after ``after`` successful writes
    (layers.csv, network.csv, checkpoint.pt alike), in process through ``lipfast.cli.main``."""
    out = tmp / name
    label = f"{name}: ENOSPC after {after} writes"
    real_write = os.write
    count = [0]
    root = str(out)

    def failing_write(fd, data):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if target.startswith(root):
            count[0] += 1
            if count[0] > after:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    capsys.readouterr()
    with monkeypatch.context() as m:
        m.setattr(os, "write", failing_write)
        rc = main([*RUN_ARGS, "--out", str(out)])
    _, err = capsys.readouterr()
    if rc != 0:
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and "No space left on device" in lines[0], (label, err)
    outcome = check_partial(out, ref, label, rc)
    leftovers = [p.name for p in out.iterdir() if ".lipfast-tmp-" in p.name] if out.exists() else []
    assert not leftovers, f"{label}: temporary files left behind: {leftovers}"
    check_report(out, capsys, outcome)
    resume_and_compare(out, ref, outcome, tmp, capsys if inprocess_resume else None)
    return outcome


@pytest.mark.skipif(not hasattr(signal, "SIGKILL") or not Path("/proc/self/fd").exists(), reason="POSIX only")
def test_faults_fast(tmp_path, reference, capsys, monkeypatch):
    """One trial of each fault (5), at fixed points inside the run; the resumes run in this process (the slow
    loop runs them as subprocesses too)."""
    kw = dict(inprocess_resume=True)
    outcomes = [
        signal_trial(tmp_path, reference, capsys, "kill-records", signal.SIGKILL, "records", 7 * N_LAYERS, **kw),
        signal_trial(tmp_path, reference, capsys, "int-records", signal.SIGINT, "records", 14 * N_LAYERS, **kw),
        signal_trial(tmp_path, reference, capsys, "kill-config", signal.SIGKILL, "config", 0.0, **kw),
        # layers.csv grows ~0.9 kB a step: 2500 bytes run out in step 2's write
        disk_full_trial(tmp_path, reference, capsys, "efbig", 2500, **kw),
        # writes: config.json, 2 headers, then 2 a step and checkpoint.pt after step 3: the 20th, step 7's
        # network row, fails after its layer rows went in
        enospc_trial(tmp_path, reference, capsys, monkeypatch, "enospc", 19, **kw),
    ]
    assert outcomes[0].net_steps >= 6 and outcomes[0].rc == -signal.SIGKILL
    assert outcomes[3].rc == 2 and 0 < outcomes[3].layer_steps < N_STEPS  # the limit bites mid-run
    # step 7's layer rows went in, its network row did not: an uncommitted step, which load_run leaves out
    assert outcomes[4].rc == 2 and (outcomes[4].net_steps, outcomes[4].layer_steps) == (7, 7)


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL") or not Path("/proc/self/fd").exists(), reason="POSIX only")
def test_faults_random_loop(tmp_path, reference, capsys, monkeypatch):
    """SLOW_TRIALS random faults: signal x trigger x point, kills during resume, real and simulated full disks.
    With LIPFAST_FAULT_LOG=FILE the outcomes (where each fault landed) are written there as JSON."""
    rng = random.Random(20261127)
    outcomes = []
    for i in range(SLOW_TRIALS):
        kind = ("kill", "int", "kill", "int", "efbig", "enospc")[i % 6]
        inproc = rng.random() < 0.5  # resume in this process or as a subprocess
        name = f"t{i:02d}-{kind}"
        if kind in ("kill", "int"):
            sig = signal.SIGKILL if kind == "kill" else signal.SIGINT
            trigger = rng.choice(["records", "records", "delay", "config", "start"])
            amount = {"records": rng.randint(1, N_STEPS * N_LAYERS), "delay": rng.uniform(0.0, 0.8),
                      "config": rng.uniform(0.0, 1.5), "start": rng.uniform(0.5, 4.0)}[trigger]
            again = None
            if rng.random() < 0.3:  # and again while it resumes
                again = rng.choice([("records", rng.randint(1, N_STEPS * N_LAYERS)), ("delay", rng.uniform(0, 0.8))])
            outcome = signal_trial(tmp_path, reference, capsys, name, sig, trigger, amount, kill_resume=again,
                                   inprocess_resume=inproc)
        elif kind == "efbig":
            # log-uniform 316 B .. 50 kB: config.json (0.8 kB), layers.csv (~0.9 kB a step), checkpoint.pt (35 kB,
            # after step 3) or nothing runs out first
            outcome = disk_full_trial(tmp_path, reference, capsys, name, int(10 ** rng.uniform(2.5, 4.7)),
                                      inprocess_resume=inproc)
        else:
            outcome = enospc_trial(tmp_path, reference, capsys, monkeypatch, name, rng.randint(0, 2 * N_STEPS + 8),
                                   inprocess_resume=inproc)
        outcomes.append(dict(vars(outcome), resume="in process" if inproc else "subprocess"))
    if os.environ.get("LIPFAST_FAULT_LOG"):
        Path(os.environ["LIPFAST_FAULT_LOG"]).write_text(json.dumps(outcomes, indent=1), encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# A RunWriter whose os.write fails at a random write: earlier rows intact, the writer usable after
# ----------------------------------------------------------------------------------------------
def _rows(step: int, names=("a", "b")) -> tuple[list[dict], dict]:
    layers = []
    for j, name in enumerate(names):
        row = {c: float(step + j) / 7 for c in runio.LAYER_COLUMNS}
        row.update(step=step, layer=name, kind="linear", m=3, n=2, batch=4, degenerate=False, nonfinite=False,
                   flag_names="", ito=math.nan, group=-1, shared_with="")
        layers.append(row)
    net = {c: float(step) / 3 for c in runio.NETWORK_COLUMNS}
    net["step"] = step
    return layers, net


@pytest.mark.parametrize("trial", range(6))
def test_run_writer_disk_full_at_a_random_write(tmp_path, monkeypatch, trial):
    rng = random.Random(trial)
    fail_at = rng.randint(1, 30)
    torn = rng.random() < 0.5          # part of the block reaches the file before the error
    path = tmp_path / "run"
    real_write = os.write
    count = [0]

    def flaky(fd, data):
        count[0] += 1
        if count[0] == fail_at:
            if torn:
                real_write(fd, bytes(data[: max(len(data) // 2, 1)]))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    written = []
    with runio.RunWriter(path, {"trial": trial}) as w:
        monkeypatch.setattr(runio.os, "write", flaky)
        for step in range(12):
            layers, net = _rows(step)
            try:
                w.write_layers(layers)
                w.write_network(net)
                written.append(step)
            except runio.RunWriteError as exc:
                assert exc.errno == errno.ENOSPC and "No space left" in str(exc)
        monkeypatch.undo()
    run = runio.load_run(path)
    assert run.dropped_lines == 0
    # every completed step is there; the failed one left at most its layer rows (written before network)
    net_steps = [r["step"] for r in run.network]
    assert set(written) <= set(net_steps) and len(net_steps) >= 11
    want = {s: _rows(s) for s in range(12)}
    for r in run.network:
        assert_same_records([r], [want[r["step"]][1]], "network")
    for r in run.layers:
        assert_same_records([r], [x for x in want[r["step"]][0] if x["layer"] == r["layer"]], "layers")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores folder permissions")
def test_unwritable_run_folder_mid_run(tmp_path):
    path = tmp_path / "run"
    with runio.RunWriter(path, {}) as w:
        w.write_layers(_rows(0)[0])
        os.chmod(path, 0o500)
        try:
            with pytest.raises(runio.RunWriteError):
                w.write_summary({"x": 1})
        finally:
            os.chmod(path, 0o700)
    assert len(runio.load_run(path).layers) == 2


# ----------------------------------------------------------------------------------------------
# An exception in the user's on_record callback
# ----------------------------------------------------------------------------------------------
def _loop(seed: int, steps: int, on_record, catch: bool):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    g = torch.Generator().manual_seed(seed)
    failures = 0
    tracker = Tracker(model, opt, rank=2, on_record=on_record)
    for _ in range(steps):
        x = torch.randn(5, 6, generator=g, dtype=torch.float64)
        y = torch.randint(3, (5,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        try:
            opt.step()
        except RuntimeError as exc:
            if not catch or "callback failed" not in str(exc):
                raise
            failures += 1
    tracker.close()
    return tracker, failures


@pytest.mark.parametrize("trial", range(4))
def test_on_record_exception_loses_nothing(trial):
    """A callback that raises at random steps: the exception reaches the training loop, which may go on; the
    tracker keeps every step's records, numbers the next steps on, and they equal a run without the fault."""
    rng = random.Random(100 + trial)
    steps = 8
    bad = set(rng.sample(range(steps), rng.randint(1, 3)))
    seen = []

    def flaky(rows, net):
        seen.append(net["step"])
        if net["step"] in bad:
            raise RuntimeError(f"user callback failed at step {net['step']}")

    got, failures = _loop(trial, steps, flaky, catch=True)
    want, _ = _loop(trial, steps, lambda rows, net: None, catch=False)
    assert failures == len(bad)
    assert seen == list(range(steps)), "the callback must be called once per step, numbered on after a failure"
    assert got.step == steps and [n["step"] for n in got.network] == list(range(steps))
    assert_same_records(got.records, want.records, "records")
    assert_same_records(got.network, want.network, "network")


# ----------------------------------------------------------------------------------------------
# Safety: a malicious checkpoint, hostile names in a report, a config file that looks like code
# ----------------------------------------------------------------------------------------------
class _Payload:
    """Unpickling this runs ``open(marker, "w")``: it must never happen."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("fmt", ["torch.save", "pickle", "garbage", "not-a-dict"])
def test_malicious_checkpoint_is_refused_and_never_run(tmp_path, capsys, fmt):
    out = tmp_path / "run"
    marker = tmp_path / "PWNED"
    assert main(["train", "--dataset", "digits", "--n-samples", "200", "--widths", "16", "--rank", "3", "--steps", "4",
                 "--checkpoint-every", "2", "--quiet", "--no-report", "--out", str(out)]) == 0
    ckpt = out / runio.CHECKPOINT_FILE
    payload = {"step": 2, "model": _Payload(marker), "optimizer": {}, "tracker": {}, "rng": torch.zeros(1)}
    if fmt == "torch.save":
        torch.save(payload, ckpt)
    elif fmt == "pickle":
        ckpt.write_bytes(pickle.dumps(payload, protocol=2))
    elif fmt == "garbage":
        ckpt.write_bytes(b"PK\x03\x04 definitely not a checkpoint")
    else:
        torch.save([1, 2, 3], ckpt)
    before = runio.load_run(out)
    capsys.readouterr()
    rc = main(["train", "--resume", "--out", str(out), "--quiet", "--no-report"])
    _, err = capsys.readouterr()
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.search(r"cannot resume from .*checkpoint\.pt", lines[0]), lines[0]
    if fmt in ("torch.save", "pickle"):
        assert "refuses to unpickle" in lines[0] and "may be malicious" in lines[0]
    assert not marker.exists(), "the checkpoint's payload ran"
    after = runio.load_run(out)  # the refused resume changed no records
    assert_same_records(after.layers, before.layers, "layers")
    assert_same_records(after.network, before.network, "network")


HOSTILE = ["<script>alert(1)</script>", "\"><img src=x onerror=alert('x')>", "it's \"quoted\"", "a&amp;b<c>",
           "</code></td></tr></table><script>", "$\\alpha^{2}$ cost $5", "javascript:alert(1)"]


def _hostile_model() -> nn.Sequential:
    model = nn.Sequential()
    widths = [5, 6, 4, 5, 3, 4, 6, 3]
    for i, name in enumerate(HOSTILE):
        model.add_module(name, nn.Linear(widths[i], widths[i + 1]))
        if i < len(HOSTILE) - 1:
            model.add_module(f"act{i}", nn.Tanh())
    return model.double()


def test_hostile_layer_names_are_escaped_in_the_report(tmp_path, capsys):
    """A real model whose module names are HTML/JS, tracked and written through RunWriter, config strings and
    the run folder's own name hostile too: report.html carries each only escaped, and no script at all."""
    torch.manual_seed(0)
    model = _hostile_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    out = tmp_path / "<script>alert('dir')</script>"
    config = {"dataset": "<script>alert('cfg')</script>", "note": "\"'&<>", "nested": {"<b>key</b>": "<i>v</i>"}}
    g = torch.Generator().manual_seed(0)
    with runio.RunWriter(out, config) as writer, Tracker(model, opt, rank=2, on_record=lambda rows, net: (
            writer.write_layers(rows), writer.write_network(net))) as tracker:
        for _ in range(12):
            x = torch.randn(8, 5, generator=g, dtype=torch.float64)
            y = torch.randint(3, (8,), generator=g)
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            tracker.log(loss=loss)
            opt.step()
        writer.write_summary({"finished": True, "layers": list(tracker.captures), "<script>": "</script>"})
    run = runio.load_run(out)
    assert run.layer_names == HOSTILE
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    stdout, _ = capsys.readouterr()
    text = (out / runio.REPORT_FILE).read_text(encoding="utf-8")
    assert re.search(r"<script", text, re.I) is None, "a <script> tag reached report.html"
    imgs = re.findall(r"<img\b[^>]*>", text, re.I)
    assert imgs and all(re.fullmatch(r'<img src="data:image/png;base64,[A-Za-z0-9+/=]+" alt="[\w.]+">', t) for t in imgs), \
        "an <img> tag other than the embedded figures reached report.html"
    body = text.split("</style>", 1)[1]
    tags = {t.lower() for t in re.findall(r"</?([A-Za-z][\w-]*)", body)}
    assert tags <= {"head", "body", "html", "h1", "h2", "p", "code", "table", "thead", "tbody", "tr", "th", "td",
                    "figure", "img", "figcaption", "sub", "sup", "br", "span", "div", "ul", "li", "b", "i", "em",
                    "strong", "small", "details", "summary", "pre", "a", "section"}, tags
    assert not re.search(r"<[^>]*\son\w+\s*=", body, re.I), "an event-handler attribute reached report.html"
    for s in HOSTILE + ["<script>alert('cfg')</script>", "\"'&<>", "<i>v</i>", "<b>key</b>"]:
        if any(c in s for c in "<>&\"'"):
            assert s not in text, f"{s!r} appears unescaped in report.html"
    for name in HOSTILE:
        assert html.escape(name, quote=True) in text, f"{name!r} is missing (escaped) from report.html"
    assert "default-src 'none'" in text  # the Content-Security-Policy stays
    for name in HOSTILE:
        assert name in stdout  # the plain-text table prints names as they are (a terminal runs no HTML)


@pytest.mark.parametrize("case", ["python", "shell", "yaml-tag", "string-values", "inline-table", "dunder-key",
                                  "valid-with-code-in-comments"])
def test_config_file_is_only_parsed_as_toml(tmp_path, capsys, case):
    marker = tmp_path / "PWNED"
    code = f"__import__('os').system('touch {marker}')"
    texts = {
        "python": f"import os\nos.system('touch {marker}')\n",
        "shell": f"$(touch {marker})\n`touch {marker}`\n",
        "yaml-tag": f"!!python/object/apply:os.system ['touch {marker}']\n",
        "string-values": f'dataset = "{code}"\nmodel = "mlp"\n',
        "inline-table": f'model = {{ __reduce__ = "{code}" }}\n',
        "dunder-key": f'__class__ = "{code}"\n',
        "valid-with-code-in-comments": f"# {code}\n# $(touch {marker})\nn_samples = 200 # `touch {marker}`\n"
                                       "widths = [8]\nsteps = 2\n",
    }
    expect = {
        "python": "not valid TOML", "shell": "not valid TOML", "yaml-tag": "not valid TOML",
        "string-values": "dataset must be one of", "inline-table": "tables are not supported",
        "dunder-key": "unknown option '__class__'", "valid-with-code-in-comments": None,
    }[case]
    cfg = tmp_path / "config.toml"
    cfg.write_text(texts[case], encoding="utf-8")
    out = tmp_path / "run"
    capsys.readouterr()
    rc = main(["train", "--config", str(cfg), "--out", str(out), "--quiet", "--no-report"])
    _, err = capsys.readouterr()
    if expect is None:
        assert rc == 0, err
        assert runio.load_run(out).config["widths"] == [8]
    else:
        assert rc == 2 and len(err.strip().splitlines()) == 1 and expect in err, err
        assert not out.exists()
    assert not marker.exists(), "content of the config file was executed"


def test_signal_exit_check_accepts_progress_lines_before_the_message(tmp_path):
    """The checker of the random loop: an interrupt that lands after the last step's progress line (while the
    run writes its report) leaves that line before lipfast's message; anything else on stderr is a failure."""
    err = tmp_path / "err"
    message = ("lipfast: interrupted; every completed step's records are in the run folder (resume with lipfast "
               "train --resume --out DIR)\n")
    err.write_text("lipfast: step 24/24 loss 1.5102 log_bound 0.6689\n" + message, encoding="utf-8")
    check_signal_exit(130, signal.SIGINT, err, tmp_path / "run", "progress then message")
    for bad in ("Traceback (most recent call last):\n" + message, "lipfast: something else\n" + message):
        err.write_text(bad, encoding="utf-8")
        with pytest.raises(AssertionError):
            check_signal_exit(130, signal.SIGINT, err, tmp_path / "run", "bad")
