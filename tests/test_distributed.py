"""The tracker under torch.distributed: two CPU ranks (gloo, file:// rendezvous) against one process.

- equal local batches: the records of a DDP run equal those of one process fed the global batch
  (float64, 1e-6 relative), including diffusion_var and ito, which need the global mean;
- unequal local batches (3 + 5 samples): the weighted estimators of lipfast.distributed against a hand
  computation from materialised per-sample gradients and LAPACK, for loss_reduction "mean" and "sum";
- a rank that sees a different model (other layer names at attach; weights changed outside DDP after
  attach) and a DDP model without a process group raise clear errors (never hang: every spawn has a
  deadline and the process groups a timeout);
- ``lipfast train --nproc 2`` writes the layers.csv of ``--nproc 1``; a rank that fails at step 3
  leaves a parseable run folder with every completed step, and the run resumes;
- a failing rank's own exception reaches the parent whether it raises in the middle of the run or after
  the last step, and even when its process dies of a signal after delivering it; a rank that dies
  without delivering anything is reported with its signal;
- under ``torchrun``, ``lipfast train`` exits 0 with the records of one process, and a rank that raises
  writes its own exception to standard error.

One spawn of two processes runs every tracker scenario (each rank saves what it saw), to keep the
file within its time budget on two cores.
"""

from __future__ import annotations

import datetime
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lipfast import Tracker, distributed, reference, runio
from lipfast.cli import main as cli_main
from lipfast.train import TrainConfig, train

SPAWN_TIMEOUT = 120.0   # seconds for a whole spawn; the process groups time out after PG_TIMEOUT
PG_TIMEOUT = 30.0
RTOL = 1e-6
STEPS = 3
B = 8
DATASET_SIZE = 50  # sampling without replacement: the finite-population factor needs the global batch
LR = 0.1
FORCE = ("sigma", "sigma2", "sigma_next", "delta_obs", "first_order", "second_order", "delta_pred", "drift",
         "diffusion_var", "ito", "ito_lo", "ito_hi", "gap", "residual")

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")


@pytest.fixture(scope="module", autouse=True)
def _collectives_time_out():
    """Process groups that lipfast creates (``--nproc``) give up after PG_TIMEOUT: nothing here can hang."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LIPFAST_PG_TIMEOUT", str(PG_TIMEOUT))
        yield


# ----------------------------------------------------------------------------------------------------
# The tracked problem: a float64 MLP, three global batches of 8
# ----------------------------------------------------------------------------------------------------
class Renamed(nn.Module):
    """The same parameter shapes as ``make_model`` under other names (DDP accepts it, the tracker must not)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def make_model(renamed: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = Renamed() if renamed else nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    return model.double()


def make_data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(STEPS, B, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (STEPS, B), generator=g)


SPLITS = {"equal": [(0, 4), (4, 8)], "unequal": [(0, 3), (3, 8)]}
OPT = dict(lr=LR, momentum=0.5, weight_decay=0.01)


def plain_lr(reduction: str) -> float:
    return LR if reduction == "mean" else LR / 4  # a summed loss takes N/R times larger steps


def ddp_run(split: str, reduction: str = "mean", records_on: str = "rank0", perturb: bool = False, **tracker_kwargs):
    """On one rank: DDP over make_model, this rank's slice of each global batch; the tracker's records."""
    rank = dist.get_rank()
    model = make_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), **(OPT if split == "equal" else dict(lr=plain_lr(reduction))))
    tracker = Tracker(ddp, opt, rank=8, loss_reduction=reduction, records_on=records_on, **tracker_kwargs)
    if perturb and rank == 1:
        with torch.no_grad():
            model[0].weight.mul_(1.01)  # outside DDP: this rank's replica now differs
    x, y = make_data()
    lo, hi = SPLITS[split][rank]
    try:
        for t in range(STEPS):
            opt.zero_grad()
            out = ddp(x[t, lo:hi])
            loss = F.cross_entropy(out, y[t, lo:hi], reduction=reduction)
            loss.backward()
            tracker.log(loss=loss)
            opt.step()
    finally:
        tracker.close()
    return dict(records=tracker.records, network=tracker.network)


def _capture(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        return {"error": f"{type(exc).__name__}: {exc}"}


def _scenarios(out_dir: str) -> None:
    """Every rank runs every scenario in the same order and saves what it saw."""
    results = {
        "equal": _capture(ddp_run, "equal", records_on="all", dataset_size=DATASET_SIZE),
        "every2": _capture(ddp_run, "equal", every=2),
        "unequal": _capture(ddp_run, "unequal"),
        "unequal_sum": _capture(ddp_run, "unequal", reduction="sum"),
        "diverged": _capture(ddp_run, "equal", perturb=True),
    }

    def renamed():
        model = make_model(renamed=dist.get_rank() == 1)
        ddp = nn.parallel.DistributedDataParallel(model)
        Tracker(ddp, torch.optim.SGD(model.parameters(), lr=LR))

    results["renamed"] = _capture(renamed)
    results["retired"] = _capture(retired_collectives)
    results["after_errors"] = _capture(ddp_run, "equal")  # the group still works after the errors above
    torch.save(results, Path(out_dir) / f"rank{dist.get_rank()}.pt")


def retired_collectives() -> dict:
    """Which step all-reduce the tracker still holds after each step and after close (see TrackerGroup.retire)."""
    model = make_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    tracker = Tracker(ddp, opt, rank=8)
    x, y = make_data()
    lo, hi = SPLITS["equal"][dist.get_rank()]
    held = []
    for t in range(STEPS):
        opt.zero_grad()
        F.cross_entropy(ddp(x[t, lo:hi]), y[t, lo:hi]).backward()
        opt.step()
        held.append(tracker._group._retired)
    tracker.close()
    return dict(one_per_step=len({id(w) for w in held}) == STEPS and None not in held,
                completed=all(w.is_completed() for w in held), last_kept=tracker._group._retired is held[-1])


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory):
    out = tmp_path_factory.mktemp("scenarios")
    distributed.spawn(_scenarios, 2, str(out), timeout=SPAWN_TIMEOUT, pg_timeout=PG_TIMEOUT)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def single_process_records(**tracker_kwargs):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), **OPT)
    tracker = Tracker(model, opt, rank=8, **tracker_kwargs)
    x, y = make_data()
    for t in range(STEPS):
        opt.zero_grad()
        loss = F.cross_entropy(model(x[t]), y[t])
        loss.backward()
        tracker.log(loss=loss)
        opt.step()
    tracker.close()
    return tracker.records, tracker.network


def assert_records_close(got: list[dict], want: list[dict], fields, what: str, rtol: float = RTOL) -> None:
    assert [(r["step"], r.get("layer")) for r in got] == [(r["step"], r.get("layer")) for r in want], what
    for g, w in zip(got, want):
        for f in fields:
            a, b = g[f], w[f]
            if isinstance(b, float) and math.isnan(b):
                assert isinstance(a, float) and math.isnan(a), f"{what} step {w['step']} {w.get('layer')}: {f} = {a}"
                continue
            assert a == pytest.approx(b, rel=rtol, abs=1e-12 * max(1.0, abs(b))), \
                f"{what} step {w['step']} {w.get('layer', '')}: {f} = {a!r}, expected {b!r}"


# ----------------------------------------------------------------------------------------------------
# Equal local batches: the global batch's records
# ----------------------------------------------------------------------------------------------------
def test_equal_batches_give_the_single_process_records(scenarios):
    got = scenarios[0]["equal"]
    assert "error" not in got, got
    want_rows, want_net = single_process_records(dataset_size=DATASET_SIZE)
    assert len(want_rows) == STEPS * 2 and {r["batch"] for r in got["records"]} == {B}
    assert all(math.isfinite(r["ito"]) and math.isfinite(r["diffusion_var"]) for r in got["records"])
    assert_records_close(got["records"], want_rows, FORCE + ("batch", "lr", "m", "n", "degenerate", "nonfinite"),
                         "DDP vs one process")
    assert_records_close(got["network"], want_net, ("log_bound", "log_bound_next", "drift", "diffusion_var", "ito",
                                                     "loss"), "network")
    assert [r["flag_names"] for r in got["records"]] == [r["flag_names"] for r in want_rows]


def test_untracked_steps_communicate_nothing_and_tracked_ones_match(scenarios):
    got = scenarios[0]["every2"]
    assert "error" not in got, got
    want_rows, want_net = single_process_records(every=2)
    assert [n["step"] for n in got["network"]] == [0, 2]
    assert_records_close(got["records"], want_rows, FORCE + ("batch",), "every=2")


def test_each_step_s_finished_all_reduce_stays_referenced_past_close(scenarios):
    """Dropped at once, gloo's worker thread could hold its last reference and take the GIL to free its
    tensor while the interpreter exits: a finished run then aborted (TrackerGroup.retire)."""
    for rank, got in enumerate(scenarios):
        assert got["retired"] == dict(one_per_step=True, completed=True, last_kept=True), (rank, got["retired"])


def test_records_on_all_gives_every_rank_the_same_records_and_rank0_only_rank0(scenarios):
    r0, r1 = scenarios
    assert repr(r1["equal"]) == repr(r0["equal"])  # NaN (train_acc, not logged) equal too
    assert len(r0["unequal"]["records"]) == STEPS * 2
    assert r1["unequal"]["records"] == [] and r1["unequal"]["network"] == []


# ----------------------------------------------------------------------------------------------------
# Unequal local batches: weighted, against a hand computation
# ----------------------------------------------------------------------------------------------------
def per_sample_grads(model: nn.Module, x, y, names) -> dict[str, torch.Tensor]:
    mods = dict(model.named_modules())
    out = {n: [] for n in names}
    for i in range(x.shape[0]):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        for n in names:
            out[n].append(mods[n].weight.grad.detach().clone())
    return {n: torch.stack(v) for n, v in out.items()}


def hand_records(reduction: str):
    """Replays the DDP run of split "unequal" in one process and computes each record's terms from
    their definitions (lipfast.distributed): w_i = 1/(R·N_r), ḡ = Σ w_i G_i, W₂ = Σ w_i², ..."""
    R, (lo0, hi0), (lo1, hi1) = 2, *SPLITS["unequal"]
    sizes = [hi0 - lo0, hi1 - lo1]
    N = sum(sizes)
    model = make_model()
    lr = plain_lr(reduction)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    names = ["0", "2"]
    mods = dict(model.named_modules())
    x, y = make_data()
    if reduction == "mean":
        w = torch.cat([torch.full((n,), 1.0 / (R * n), dtype=torch.float64) for n in sizes])
    else:
        w = torch.full((N,), 1.0 / N, dtype=torch.float64)  # the step is -lr (N/R) mean_i G_i
    c = lr if reduction == "mean" else lr * N / R
    out = []
    for t in range(STEPS):
        G = per_sample_grads(model, x[t], y[t], names)
        rows = {}
        for n in names:
            W = mods[n].weight.detach().clone()
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            gbar = torch.einsum("i,imn->mn", w, G[n])
            s, hess = reference.persample_dense(W, G[n])
            h_gbar = float(reference.hessian_form_dense(W, gbar))
            W2 = float((w * w).sum())
            rows[n] = dict(sigma=float(S[0]), drift=-c * float(w @ s), batch=N,
                           diffusion_var=c * c * W2 * float(s.var(unbiased=True)),
                           ito=c * c / 2 * W2 * (float(hess.sum()) - N * h_gbar) / (N * (1 - W2)))
        # The step DDP takes: (1/R) Σ_r (local loss_r)'s gradient.
        opt.zero_grad()
        losses = [F.cross_entropy(model(x[t, lo:hi]), y[t, lo:hi], reduction=reduction)
                  for lo, hi in SPLITS["unequal"]]
        (sum(losses) / R).backward()
        opt.step()
        for n in names:
            rows[n]["sigma_next"] = float(torch.linalg.matrix_norm(mods[n].weight.detach(), 2))
            out.append(dict(step=t, layer=n, **rows[n]))
    return out


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_unequal_batches_are_weighted_as_ddp_weights_them(scenarios, reduction):
    got = scenarios[0]["unequal" if reduction == "mean" else "unequal_sum"]
    assert "error" not in got, got
    want = hand_records(reduction)
    assert_records_close(got["records"], want, ("sigma", "sigma_next", "drift", "diffusion_var", "ito", "batch"),
                         f"weighted ({reduction})", rtol=1e-7)
    for r in got["records"]:  # plain SGD: the drift (weighted mean) is the realised first-order change
        assert r["drift"] == pytest.approx(r["first_order"], rel=1e-7), r
    if reduction == "mean":  # the weighted terms differ from the unweighted (equal-split) ones
        equal = scenarios[0]["equal"]["records"]
        assert got["records"][0]["diffusion_var"] != pytest.approx(equal[0]["diffusion_var"], rel=1e-3)


# ----------------------------------------------------------------------------------------------------
# Errors: a different model, no process group, FSDP
# ----------------------------------------------------------------------------------------------------
def test_a_rank_with_other_layer_names_fails_at_attach_on_every_rank(scenarios):
    for r in range(2):
        err = scenarios[r]["renamed"].get("error", "")
        assert err.startswith("RuntimeError") and "a rank sees a different model" in err, err
        assert "rank 0" in err and "rank 1" in err and "'a'" in err, err


def test_weights_changed_outside_ddp_are_detected_on_every_rank(scenarios):
    for r in range(2):
        err = scenarios[r]["diverged"].get("error", "")
        assert "a rank sees a different model" in err and "layer '0'" in err and "step 0" in err, err


def test_the_group_works_after_the_errors(scenarios):
    assert "error" not in scenarios[0]["after_errors"]
    assert len(scenarios[0]["after_errors"]["records"]) == STEPS * 2


def test_ddp_model_without_a_process_group_is_refused(tmp_path):
    dist.init_process_group("gloo", init_method=(tmp_path / "rdv").resolve().as_uri(), rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=PG_TIMEOUT))
    try:
        model = make_model()
        ddp = nn.parallel.DistributedDataParallel(model)
    finally:
        dist.destroy_process_group()
    with pytest.raises(RuntimeError, match="no torch.distributed process group is initialised"):
        Tracker(ddp, torch.optim.SGD(model.parameters(), lr=LR))
    assert not model[0]._forward_hooks  # nothing attached


def test_records_on_is_checked():
    model = make_model()
    with pytest.raises(ValueError, match="records_on must be 'rank0' or 'all'"):
        Tracker(model, torch.optim.SGD(model.parameters(), lr=LR), records_on="rank1")


def test_fsdp_is_refused_with_what_support_would_cost():
    FSDP = pytest.importorskip("torch.distributed.fsdp").FullyShardedDataParallel
    fake = FSDP.__new__(FSDP)  # no process group needed: the type is what the tracker refuses
    nn.Module.__init__(fake)
    fake.inner = make_model()
    with pytest.raises(TypeError, match="FSDP is not supported yet.*all-gathering every tracked weight"):
        Tracker(fake, torch.optim.SGD(fake.inner.parameters(), lr=LR))


# ----------------------------------------------------------------------------------------------------
# lipfast train --nproc 2
# ----------------------------------------------------------------------------------------------------
TINY = dict(dataset="synthetic", n_samples=200, batch_size=16, widths=(16,), rank=4, steps=6, checkpoint_every=3,
            eval_every=100, dtype="float64")
TINY_ARGS = ["--dataset", "synthetic", "--n-samples", "200", "--batch-size", "16", "--widths", "16", "--rank", "4",
             "--steps", "6", "--checkpoint-every", "3", "--eval-every", "100", "--dtype", "float64"]
CSV_FIELDS = FORCE + ("batch", "lr", "degenerate", "nonfinite")


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    assert cli_main(["train", "--out", str(out), "--no-report", "--quiet", *TINY_ARGS]) == 0
    return runio.load_run(out)


def test_train_nproc_2_writes_the_layers_csv_of_nproc_1(tmp_path, single_run, capsys):
    out = tmp_path / "run"
    rc = cli_main(["train", "--nproc", "2", "--out", str(out), "--no-report", "--quiet", *TINY_ARGS])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    run = runio.load_run(out)
    assert run.config == single_run.config
    assert_records_close(run.layers, single_run.layers, CSV_FIELDS, "layers.csv --nproc 2 vs 1")
    assert_records_close(run.network, single_run.network, ("log_bound", "drift", "diffusion_var", "ito", "loss",
                                                           "train_acc"), "network.csv")
    assert run.summary["finished"] and run.summary["layers"] == single_run.summary["layers"]
    assert run.summary["test_acc"] == pytest.approx(single_run.summary["test_acc"])
    assert str(out.resolve()) in captured.out


def test_batch_not_divisible_by_nproc_is_a_usage_error(tmp_path, capsys):
    assert cli_main(["train", "--nproc", "3", "--out", str(tmp_path / "r"), "--no-report", *TINY_ARGS]) == 2
    err = capsys.readouterr().err
    assert "batch_size must be a multiple of the 3 data-parallel ranks" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def _train_failing_on_rank1(config: TrainConfig, out: str, at_step: int):
    if dist.get_rank() == 1:
        original = Tracker._on_step_pre

        def failing(self, *args):
            if self.step == at_step:
                raise RuntimeError(f"injected failure at step {at_step}")
            return original(self, *args)

        Tracker._on_step_pre = failing
    return train(config, out, quiet=True, report=False)


def test_a_failing_rank_leaves_a_parseable_run_folder_that_resumes(tmp_path, single_run):
    out = tmp_path / "run"
    config = TrainConfig(**TINY)
    with pytest.raises(distributed.DistributedRunError, match="rank 1 of 2 failed: RuntimeError: injected failure"):
        distributed.spawn(_train_failing_on_rank1, 2, config, str(out), 3, timeout=SPAWN_TIMEOUT,
                          pg_timeout=PG_TIMEOUT)
    run = runio.load_run(out)
    layers = single_run.layer_names
    assert [r["step"] for r in run.network] == [0, 1, 2]   # every step completed before the failure
    assert [(r["step"], r["layer"]) for r in run.layers] == [(s, n) for s in range(3) for n in layers]
    assert_records_close(run.layers, single_run.layers[:3 * len(layers)], CSV_FIELDS, "before the failure")
    assert not (run.summary or {}).get("finished")
    train(config, out, resume=True, quiet=True, report=False, nproc=2)
    run = runio.load_run(out)
    assert_records_close(run.layers, single_run.layers, CSV_FIELDS, "resumed --nproc 2 vs uninterrupted --nproc 1")
    assert run.summary["finished"]


def _train_failing_on_rank1_after_the_last_step(config: TrainConfig, out: str):
    result = train(config, out, quiet=True, report=False)
    if dist.get_rank() == 1:
        raise RuntimeError("injected failure after the last step")
    return result


def test_a_rank_failing_after_the_last_step_reports_its_own_error(tmp_path, single_run):
    out = tmp_path / "run"
    with pytest.raises(distributed.DistributedRunError,
                       match="rank 1 of 2 failed: RuntimeError: injected failure after the last step"):
        distributed.spawn(_train_failing_on_rank1_after_the_last_step, 2, TrainConfig(**TINY), str(out),
                          timeout=SPAWN_TIMEOUT, pg_timeout=PG_TIMEOUT)
    run = runio.load_run(out)  # rank 0 finished the run: the folder is whole
    assert run.summary["finished"]
    assert_records_close(run.layers, single_run.layers, CSV_FIELDS, "rank 0's records")


class _AbortingStream:
    """A standard error whose flush kills its process with SIGABRT, as a C++ teardown abort would."""

    def write(self, text):
        return len(text)

    def flush(self):
        os.kill(os.getpid(), signal.SIGABRT)


def _rank1_raises_then_aborts():
    dist.barrier()
    if dist.get_rank() == 1:
        sys.stderr = _AbortingStream()  # the rank's exit flushes it: SIGABRT after the error is delivered
        raise ValueError("the rank's own message")
    return "rank 0 done"


def _rank1_aborts_at_once():
    dist.barrier()
    if dist.get_rank() == 1:
        os.kill(os.getpid(), signal.SIGABRT)
    return "rank 0 done"


def test_the_rank_s_own_error_wins_over_a_signal_that_kills_it_after_delivery():
    with pytest.raises(distributed.DistributedRunError) as info:
        distributed.spawn(_rank1_raises_then_aborts, 2, timeout=SPAWN_TIMEOUT, pg_timeout=PG_TIMEOUT)
    assert "rank 1 of 2 failed: ValueError: the rank's own message" in str(info.value)
    assert "ValueError: the rank's own message" in info.value.remote_traceback
    assert "SIGABRT" not in str(info.value)


def test_a_rank_that_dies_without_delivering_is_reported_with_its_signal():
    with pytest.raises(distributed.DistributedRunError, match=r"rank 1 of 2 died \(process 1 terminated with "
                                                              r"signal SIGABRT\)"):
        distributed.spawn(_rank1_aborts_at_once, 2, timeout=SPAWN_TIMEOUT, pg_timeout=PG_TIMEOUT)


# ----------------------------------------------------------------------------------------------------
# torchrun
# ----------------------------------------------------------------------------------------------------
def _torchrun(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, LIPFAST_PG_TIMEOUT=str(PG_TIMEOUT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "--max-restarts", "0", *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=SPAWN_TIMEOUT)


def test_torchrun_lipfast_train_exits_0_with_the_records_of_one_process(tmp_path, single_run):
    out = tmp_path / "run"
    done = _torchrun(tmp_path, "-m", "lipfast", "train", "--out", str(out), "--no-report", "--quiet", *TINY_ARGS)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "terminate called" not in done.stderr
    run = runio.load_run(out)
    assert run.summary["finished"]
    assert_records_close(run.layers, single_run.layers, CSV_FIELDS, "layers.csv under torchrun vs --nproc 1")


def test_torchrun_a_rank_that_raises_writes_its_own_error(tmp_path):
    script = tmp_path / "failing.py"
    script.write_text(textwrap.dedent(f"""
        import torch.distributed as dist
        from lipfast import Tracker
        from lipfast.train import TrainConfig, train

        original = Tracker._on_step_pre

        def failing(self, *args):
            if self.step == 3 and dist.get_rank() == 1:
                raise RuntimeError("injected failure at step 3")
            return original(self, *args)

        Tracker._on_step_pre = failing
        train(TrainConfig(**{TINY!r}), {str(tmp_path / "run")!r}, quiet=True, report=False)
    """))
    done = _torchrun(tmp_path, str(script))
    assert done.returncode != 0
    assert "lipfast: rank 1 of 2 failed: RuntimeError: injected failure at step 3" in done.stderr, done.stderr[-3000:]
