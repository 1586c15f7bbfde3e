"""What each integration costs beyond the bare Tracker, measured side by side on the same model.

- ``one sink call``: each sink alone, handed one step's records of 14 layers (wall time per call).

Training cases, each timed interleaved (rounds of every variant back to back, so that a drift in machine load hits
all alike) on its own copy of the same model:
- ``sinks``: an MLP trained in a plain loop; bare ``Tracker`` (records kept in memory) vs the same tracker
  streaming into ``RunWriter`` (fsync every write, its default; every 50, the integrations' choice; never),
  ``TensorBoardWriter``, and both at once (``keep_records=False``).
- ``transformers``: a tiny BERT trained by ``transformers.Trainer`` (``logging_steps=1``: scalars logged at
  every step, the worst case); no tracker vs a bare Tracker attached by a minimal callback vs ``LipfastCallback``.
- ``lightning``: a small MLP ``LightningModule``; no tracker vs a bare Tracker (the minimal callback the
  integration needs: pre-step work at ``on_before_optimizer_step``) vs ``LipfastCallback`` (``log_every_n_steps=1``).
Correctness first: every variant's run must have a record per layer and step.

Times are this process's CPU time per step, not wall time (see ``_time_rounds``).

Usage: python bench/bench_integrations.py [--quick] [--threads 1]
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402

import lipfast  # noqa: E402
from lipfast import runio  # noqa: E402
from lipfast.integrations._common import unwrap_optimizer  # noqa: E402

# Framework deprecation chatter (Lightning's pytree helper on torch 2.13, transformers' notices) is not ours.
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", message=".*(LeafSpec|does not have many workers|litlogger|GPU available).*")
# BERT's position embeddings take a [1, T] input shared by every sample: the tracker skips them, and says so.
warnings.filterwarnings("ignore", message="lipfast: not tracking '.*position_embeddings'", category=lipfast.LipfastWarning)
warnings.filterwarnings("ignore", message="lipfast: layer '.*embeddings.*' .embedding. has no preconditioned",
                        category=lipfast.LipfastWarning)


def _have(name: str) -> bool:
    try:
        __import__(name)
        return True
    except ImportError:
        return False


# ---------------------------------------------------------------------------------------------------------
# Own loop: sinks
# ---------------------------------------------------------------------------------------------------------
def bench_sinks(tmp: Path, rounds: int, steps: int) -> list[H.Result]:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    x, y = torch.randn(128, 64), torch.randint(0, 10, (128,))
    variants, closers = [], []

    def variant(name, make_sinks, keep=True):
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        sinks = make_sinks(tmp / name.replace(" ", "_"))
        tracker = lipfast.Tracker(model, opt, rank=8, on_record=sinks or None, keep_records=keep)
        closers.append((tracker, sinks))

        def train():
            for _ in range(steps):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
        variants.append((name, train, ""))

    variant("bare tracker", lambda d: [])
    variant("+ RunWriter", lambda d: [lipfast.RunWriter(d)], keep=False)
    variant("+ RunWriter fsync_every=50", lambda d: [lipfast.RunWriter(d, fsync_every=50)], keep=False)
    variant("+ RunWriter fsync_every=0", lambda d: [lipfast.RunWriter(d, fsync_every=0)], keep=False)
    if _have("tensorboard"):
        from lipfast.integrations.tensorboard import TensorBoardWriter
        variant("+ TensorBoardWriter", lambda d: [TensorBoardWriter(d)], keep=False)
        variant("+ RunWriter + TensorBoardWriter",
                lambda d: [lipfast.RunWriter(d / "run"), TensorBoardWriter(d / "tb")], keep=False)
    config = H.Config("sinks", dict(model="MLP 64-256-256-10", batch=128, rank=8))
    results = _time_rounds(config, variants, rounds, steps)
    for tracker, sinks in closers:
        tracker.close()
        for s in sinks:
            s.close()
    run = runio.load_run(tmp / "+_RunWriter")  # correctness: every step streamed, 3 layers each
    assert len(run.layers) == 3 * len(run.network) > 0 and run.network[-1]["step"] == len(run.network) - 1
    return results


def bench_sink_calls(tmp: Path, calls: int) -> list[H.Result]:
    """One step's records (14 layers, a BERT-2x64's Linears) handed to each sink alone: what a sink adds to a
    step, without the training around it."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(32, 32) for _ in range(14)])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    got = []
    tracker = lipfast.Tracker(model, opt, rank=8, on_record=lambda rows, net: got.append((rows, net)))
    opt.zero_grad()
    model(torch.randn(16, 32)).square().mean().backward()
    opt.step()
    tracker.close()
    rows, net = got[0]
    from lipfast.integrations._common import scalars

    sinks = [("RunWriter (fsync every write)", lipfast.RunWriter(tmp / "c1")),
             ("RunWriter fsync_every=50", lipfast.RunWriter(tmp / "c2", fsync_every=50)),
             ("RunWriter fsync_every=0", lipfast.RunWriter(tmp / "c3", fsync_every=0)),
             ("scalars() for the loggers", lambda r, n: scalars(r, n, prefix="lipfast/"))]
    if _have("tensorboard"):
        from lipfast.integrations.tensorboard import TensorBoardWriter
        sinks.append(("TensorBoardWriter", TensorBoardWriter(tmp / "c4")))
    config = H.Config("one sink call", dict(layers=len(rows)))
    out = []
    for name, sink in sinks:
        t0 = time.perf_counter()
        for i in range(calls):
            sink(rows, dict(net, step=i))
        out.append(H.Result(config, name, (time.perf_counter() - t0) / calls, runs=calls,
                            note="wall time per call"))
        if hasattr(sink, "close"):
            sink.close()
    return out


def _time_rounds(config: H.Config, variants, rounds: int, steps: int) -> list[H.Result]:
    """Each variant's ``run()`` trains ``steps`` steps; interleaved rounds; this process's CPU time per step
    (``time.process_time``: on a machine shared with other jobs, wall time measures their load as much as ours;
    run with ``--threads 1`` so that CPU time is not inflated by idle-spinning worker threads)."""
    times = {name: [] for name, _, _ in variants}
    for _, run, _ in variants:  # warm-up: first-call costs (imports, lazy inits) are no part of a variant
        run()
    for _ in range(rounds):
        for name, run, _ in variants:
            t0 = time.process_time()
            run()
            times[name].append((time.process_time() - t0) / steps)
    out = []
    for name, _, note in variants:
        q1, med, q3 = H._quartiles(times[name])
        out.append(H.Result(config, name, med, q3 - q1, runs=rounds * steps, note=note, rounds=tuple(times[name])))
    return out


# ---------------------------------------------------------------------------------------------------------
# Hugging Face Trainer
# ---------------------------------------------------------------------------------------------------------
def bench_transformers(tmp: Path, rounds: int, steps: int) -> list[H.Result]:
    import transformers
    from transformers.utils import logging as hf_logging

    from lipfast.integrations.transformers import LipfastCallback

    hf_logging.set_verbosity_error()
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=128, max_position_embeddings=32, num_labels=3)

    class Tokens(torch.utils.data.Dataset):
        def __len__(self):
            return 16 * steps

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            return {"input_ids": torch.randint(0, 100, (16,), generator=g), "labels": torch.tensor(i % 3)}

    class BareTracker(transformers.TrainerCallback):
        """The least a Trainer needs: a Tracker on its model and torch optimizer, closed at the end."""

        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kw):
            self.tracker = lipfast.Tracker(model, unwrap_optimizer(optimizer), rank=8)

        def on_train_end(self, args, state, control, **kw):
            self.tracker.close()

    counter = iter(range(10**6))

    def run(callback_factory):
        def go():
            torch.manual_seed(0)
            out = tmp / f"hf{next(counter)}"
            args = transformers.TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=16,
                                                  logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                                                  disable_tqdm=True)
            cb = callback_factory()
            trainer = transformers.Trainer(model=transformers.BertForSequenceClassification(cfg), args=args,
                                           train_dataset=Tokens(), callbacks=[cb] if cb else None)
            trainer.remove_callback(transformers.trainer_callback.PrinterCallback)  # stdout is no part of it
            trainer.train()
            if isinstance(cb, LipfastCallback):  # correctness: a record per layer and step
                r = runio.load_run(cb.run_dir)
                assert len(r.network) == steps and len(r.layers) == steps * len(r.layer_names) == steps * 16  # 14 Linears, 2 Embeddings
        return go

    variants = [("Trainer, no tracker", run(lambda: None), ""),
                ("+ bare Tracker", run(BareTracker), ""),
                ("+ LipfastCallback", run(lambda: LipfastCallback(rank=8)), "run folder + trainer.log every step")]
    config = H.Config("transformers", dict(model="BERT 2x64", batch=16, steps=steps, rank=8))
    return _time_rounds(config, variants, rounds, steps)


# ---------------------------------------------------------------------------------------------------------
# Lightning
# ---------------------------------------------------------------------------------------------------------
def bench_lightning(tmp: Path, rounds: int, steps: int) -> list[H.Result]:
    import logging

    import lightning.pytorch as pl

    from lipfast.integrations.lightning import LipfastCallback

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))

        def training_step(self, batch, i):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    class BareTracker(pl.Callback):
        """The least Lightning needs (what LipfastCallback does, less the run folder and the logging)."""

        def on_fit_start(self, trainer, pl_module):
            self.tracker = lipfast.Tracker(pl_module, trainer.optimizers[0], rank=8)
            self.tracker._step_pre_handle.remove()  # backward runs inside optimizer.step(closure)

        def on_train_batch_start(self, trainer, pl_module, batch, i):
            self.tracker._on_root_forward(pl_module, tuple(batch), {})

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.tracker._on_step_pre(optimizer, (), {})

        def on_fit_end(self, trainer, pl_module):
            self.tracker.close()

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(128 * steps, 64, generator=g),
                                          torch.randint(0, 10, (128 * steps,), generator=g))
    counter = iter(range(10**6))

    def run(callback_factory):
        def go():
            root = tmp / f"pl{next(counter)}"
            cb = callback_factory()
            trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, default_root_dir=str(root),
                                 callbacks=[cb] if cb else [], enable_progress_bar=False, enable_model_summary=False,
                                 logger=pl.loggers.CSVLogger(str(root)), log_every_n_steps=1,
                                 enable_checkpointing=False)
            trainer.fit(Module(), torch.utils.data.DataLoader(data, batch_size=128))
            if isinstance(cb, LipfastCallback):
                r = runio.load_run(cb.run_dir)
                assert len(r.network) == steps and len(r.layers) == 3 * steps
        return go

    variants = [("fit, no tracker", run(lambda: None), ""),
                ("+ bare Tracker", run(BareTracker), ""),
                ("+ LipfastCallback", run(lambda: LipfastCallback(rank=8)), "run folder + loggers every step")]
    config = H.Config("lightning", dict(model="MLP 64-256-256-10", batch=128, steps=steps, rank=8))
    return _time_rounds(config, variants, rounds, steps)


def main() -> int:
    parser = H.make_parser(__doc__.splitlines()[0])
    args = parser.parse_args()
    if args.threads is None:
        args.threads = 1  # CPU time per step (see _time_rounds)
    device, _, _ = H.setup(args)
    if device != "cpu":
        raise SystemExit("bench_integrations: the frameworks are timed on the CPU only")
    rounds = 2 if args.quick else 5
    steps = 2 if args.quick else 10
    results = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        results += bench_sink_calls(tmp, 20 if args.quick else 200)
        results += bench_sinks(tmp, rounds, 3 * steps)
        if _have("transformers") and _have("accelerate"):
            results += bench_transformers(tmp, rounds, steps)
        if _have("lightning"):
            results += bench_lightning(tmp, rounds, steps)
    print("\n".join(H.environment_lines(device)))
    print()
    print("times: this process's CPU time per optimizer step (median over interleaved rounds)")
    print(H.format_table(results, baseline=["bare tracker", "+ bare Tracker"]))
    print()
    for case in dict.fromkeys(r.config.name for r in results):
        rows = {r.impl: r for r in results if r.config.name == case}
        base = rows.get("bare tracker") or rows.get("+ bare Tracker")
        if base is None:
            continue
        for r in rows.values():
            if r is not base and r.impl.startswith("+") and r.impl != "+ bare Tracker":
                extra_ms = (r.median_s - base.median_s) * 1e3
                print(f"{case}: {r.impl} vs bare tracker: {H.format_ratio(r, base)} per step, "
                      f"{extra_ms:+.2f} ms/step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
