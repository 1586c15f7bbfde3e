"""``lipfast`` command line: demo, train, sweep, report, simulate (API.md "Command line").

``main(argv=None) -> int`` so tests can call it. A usage error or bad input exits with status 2 and one
line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import traceback
from pathlib import Path

__all__ = ["main"]

EXIT_USAGE = 2
DEMO_OUT = "lipfast-runs/demo"


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (and exit status 2)."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise _UsageError(f"{self.prog}: error: {message} (see --help)")


def _train_options(p: argparse.ArgumentParser) -> None:
    from .train import OPTIMIZERS, TrainConfig

    defaults = TrainConfig()
    g = p.add_argument_group("training options (also settable in --config FILE, TOML, same names)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        help_text = _HELP.get(f.name, "") + f" (default: {default})"
        if isinstance(default, bool):
            g.add_argument(flag, dest=f.name, default=None, action=argparse.BooleanOptionalAction, help=help_text)
        elif f.name == "optimizer":
            g.add_argument(flag, dest=f.name, default=None, choices=OPTIMIZERS, help=help_text)
        elif f.name == "widths":
            g.add_argument(flag, dest=f.name, default=None, type=int, nargs="+", metavar="W", help=help_text)
        else:
            typ = {"int | None": int, "float": float, "int": int, "str": str, "str | None": str}.get(str(f.type), str)
            g.add_argument(flag, dest=f.name, default=None, type=typ, metavar=f.name.upper(), help=help_text)


_HELP = {
    "dataset": "digits | mnist-sample | synthetic (offline); mnist1d (offline, pip install \"lipfast[data]\"); "
               "mnist | fashion-mnist | cifar10 (torchvision, downloads)",
    "n_samples": "use only this many samples of the dataset",
    "test_fraction": "held-out fraction",
    "data_root": "folder for torchvision datasets (downloads there)",
    "model": "mlp | cnn | resnet",
    "widths": "hidden widths (mlp) or channels (cnn, resnet)",
    "init_scale": "factor on every Linear/Conv2d weight after the default init",
    "batchnorm": "BatchNorm in cnn/resnet (couples samples: see the Tracker docs)",
    "label_noise": "symmetric label-noise rate in [0, 1)",
    "label_smoothing": "cross-entropy label smoothing in [0, 1)",
    "mixup": "Mixup with lambda ~ Beta(ALPHA, ALPHA) per step (0: off)",
    "optimizer": "sgd | adam | adamw (lipfast models all three exactly: docs/MATH.md §7)",
    "batch_size": "samples per step",
    "lr": "learning rate",
    "momentum": "SGD heavy-ball momentum",
    "nesterov": "Nesterov momentum",
    "weight_decay": "SGD weight decay",
    "steps": "optimizer steps (or use --epochs)",
    "epochs": "epochs, when --steps is not given",
    "seed": "initialisation seed",
    "data_seed": "data order (and split) seed, separate from the initialisation",
    "noise_seed": "label-noise seed",
    "sampling": "permutation (each epoch a shuffle) | replacement (every batch drawn independently, as the SDE assumes)",
    "sampling_seed": "seed of the mini-batches only (unset: data_seed)",
    "rank": "top-k singular triplets tracked per layer",
    "every": "track every k-th step",
    "iters": "sweep budget per spectrum update (fewer once sigma1 and sigma2 have converged)",
    "gap_tol": "flag a step small_gap when the relative spectral gap (s1 - s2)/s1 is below this",
    "step_tol": "flag a step large_step when max(||dW v1||, ||dW^T u1||) / (s1 - s2) exceeds this",
    "closure_tol": "flag a step closure when |delta_obs - delta_pred| > this * |delta_obs| + 1e-6 * s1",
    "device": "cpu | cuda | cuda:N",
    "dtype": "float32 | float64",
    "checkpoint_every": "steps between checkpoints (for --resume)",
    "eval_every": "steps between log lines with --quiet",
    "sde_paths": "Euler-Maruyama paths for the SDE band",
    "sde_seed": "seed of the SDE paths",
}


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lipfast", description="How, and why, does my network's Lipschitz constant change while "
                     "it trains? Tracks the three Ito forces on every layer's operator norm.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    demo = sub.add_parser("demo", help="the main job on embedded defaults (offline digits, small MLP)")
    demo.add_argument("--out", default=DEMO_OUT, help=f"run folder (default: {DEMO_OUT}; replaced if it is a run)")
    demo.add_argument("--steps", type=int, default=300, help="tracked SGD steps (default: 300)")
    demo.add_argument("--quiet", action="store_true", help="log lines instead of a progress bar")
    demo.add_argument("--overwrite", action="store_true",
                      help="write into --out even if it holds other files (lipfast's own files are replaced)")

    train = sub.add_parser("train", help="one tracked run")
    train.add_argument("--config", help="TOML file of training options")
    train.add_argument("--out", required=True, help="run folder")
    train.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    train.add_argument("--quiet", action="store_true", help="log lines instead of a progress bar")
    train.add_argument("--no-report", dest="report", action="store_false", help="skip simulate + report at the end")
    train.add_argument("--nproc", type=int, default=1, metavar="N",
                       help="data-parallel ranks on this machine (DDP; gloo on CPU, nccl on CUDA); --batch-size is "
                            "the global batch. Or launch: torchrun --nproc_per_node N -m lipfast train ... (default: 1)")
    _train_options(train)

    report = sub.add_parser("report", help="figures and report.html of a finished run")
    report.add_argument("run_dir", help="run folder")

    simulate = sub.add_parser("simulate", help="SDE bands from a finished run's recorded coefficients")
    simulate.add_argument("run_dir", help="run folder")
    simulate.add_argument("--paths", type=int, default=4096, help="Euler-Maruyama paths (default: 4096)")
    simulate.add_argument("--seed", type=int, default=0, help="seed of the paths (default: 0)")
    simulate.add_argument("--noise", choices=("auto", "independent", "epoch"), default="auto",
                          help="SDE noise model; auto follows the run's --sampling (default: auto)")
    _add_sweep_parser(sub)
    _add_ensemble_parser(sub)
    return parser


def _add_ensemble_parser(sub) -> None:
    ens = sub.add_parser("ensemble", help="N runs differing only in mini-batch sampling; observed mean and variance "
                         "of log K and each sigma1 against the SDE's")
    ens.add_argument("--runs", type=int, required=True, metavar="N", help="members (>= 2)")
    ens.add_argument("--jobs", type=int, default=1, help="members trained at once, one process each (default: 1)")
    ens.add_argument("--config", help="TOML file of training options (every member's)")
    ens.add_argument("--out", required=True, help="ensemble folder (members in OUT/members/000, 001, ...)")
    ens.add_argument("--overwrite", action="store_true", help="retrain members already in --out")
    ens.add_argument("--quiet", action="store_true", help="no line per finished member")
    ens.add_argument("--report", action="store_true", help="also write each member's figures and report.html")
    ens.set_defaults(resume=False)
    _train_options(ens)


def _add_sweep_parser(sub) -> None:
    from .sweep import FACTORS

    sweep = sub.add_parser("sweep", help="several runs over one factor; comparison figures and table")
    sweep.add_argument("--factor", required=True, choices=FACTORS, help="the option the runs vary")
    sweep.add_argument("--values", nargs="+", metavar="V",
                       help="the factor's values (for data_seed: the data-order seeds; default 0..SEEDS-1)")
    sweep.add_argument("--seeds", type=int, default=1,
                       help="replicates per value: seed, data_seed and noise_seed + r (default: 1; for "
                       "--factor data_seed, the number of data seeds when --values is omitted)")
    sweep.add_argument("--jobs", type=int, default=1, help="runs trained at once, one process each (default: 1)")
    sweep.add_argument("--config", help="TOML file of training options (the base of every run)")
    sweep.add_argument("--out", required=True, help="sweep folder (runs in OUT/<factor>=<value>/seed=<seed>)")
    sweep.add_argument("--overwrite", action="store_true", help="retrain runs already in --out")
    sweep.add_argument("--quiet", action="store_true", help="no line per finished run")
    sweep.add_argument("--no-report", dest="report", action="store_false",
                       help="skip each run's figures and report.html (the sweep's own are written)")
    sweep.set_defaults(resume=False)
    _train_options(sweep)


def _config_from_args(args) -> "object":
    from . import runio
    from .train import TrainConfig, load_config_file

    given = load_config_file(args.config) if args.config else {}
    for f in dataclasses.fields(TrainConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            given[f.name] = tuple(v) if f.name == "widths" else v
    if not (args.resume and runio.is_run_folder(args.out)):
        return TrainConfig.from_mapping(given, where=args.config or "options")
    # --resume: the run's own options, overridden by those given now (train() refuses the ones that
    # would change the run), so `lipfast train --resume --out DIR` alone continues the run.
    values = dict(runio.load_run(args.out).config)
    if "steps" in given and "epochs" not in given:
        values["epochs"] = None
    if "epochs" in given and "steps" not in given:
        values["steps"] = None
    values.update(given)
    return TrainConfig.from_mapping(values, where=args.config or "options")


def _cmd_demo(args) -> int:
    from . import report as reporting
    from . import runio
    from .train import TrainConfig, train

    out = Path(args.out)
    overwrite = args.overwrite or runio.is_run_folder(out)
    cfg = TrainConfig(steps=args.steps)
    print(f"lipfast demo: {cfg.model} {list(cfg.widths)} on {cfg.dataset}, {cfg.steps} SGD steps, rank {cfg.rank} "
          f"-> {out}", flush=True)
    train(cfg, out, overwrite=overwrite, quiet=args.quiet)
    run = runio.load_run(out)
    print(reporting.summary_table(run))
    print(f"report: {(out / runio.REPORT_FILE).resolve()}")
    return 0


def _cmd_train(args) -> int:
    from . import report as reporting
    from . import runio
    from .train import train

    if args.overwrite and args.resume:
        raise _UsageError("lipfast train: error: --overwrite and --resume exclude each other")
    if args.nproc < 1:
        raise _UsageError(f"lipfast train: error: --nproc must be >= 1, got {args.nproc}")
    cfg = _config_from_args(args)
    out = train(cfg, args.out, overwrite=args.overwrite, resume=args.resume, quiet=args.quiet, report=args.report,
                nproc=args.nproc)
    if os.environ.get("RANK", "0") != "0":  # a torchrun rank other than 0: rank 0 reports
        return 0
    if args.report:
        print(reporting.summary_table(runio.load_run(out)))
        print(f"report: {(Path(out) / runio.REPORT_FILE).resolve()}")
    else:
        print(f"run: {Path(out).resolve()}")
    return 0


def _cmd_report(args) -> int:
    from . import report as reporting
    from . import runio

    run = runio.load_run(args.run_dir)
    path = reporting.make_report(args.run_dir)
    print(reporting.summary_table(run))
    print(f"report: {Path(path).resolve()}")
    return 0


def _cmd_simulate(args) -> int:
    from . import analysis
    from . import runio

    if args.paths < 2:
        raise _UsageError(f"lipfast simulate: error: --paths must be >= 2, got {args.paths}")
    run = runio.load_run(args.run_dir)
    if not run.layers:
        raise runio.RunFolderError(f"{run.path} has no layer records yet: nothing to simulate")
    result = analysis.write_simulation(args.run_dir, n_paths=args.paths, seed=args.seed,
                                       noise=None if args.noise == "auto" else args.noise)
    print(_simulation_lines(result))
    return 0


def _simulation_lines(result) -> str:
    if not isinstance(result, dict):
        return str(result)
    lines = []
    for name, info in (result.get("layers") or {}).items():
        if isinstance(info, dict) and "coverage" in info:
            lines.append(f"{name}: SDE band coverage {info['coverage']:.2f}")
    net = result.get("network")
    if isinstance(net, dict) and "coverage" in net:
        lines.append(f"log_bound: SDE band coverage {net['coverage']:.2f}")
    model = result.get("noise_model")
    if isinstance(model, dict) and model.get("note"):
        lines.append(model["note"])
    return "\n".join(lines) or "simulation written"


def _cmd_sweep(args) -> int:
    from . import sweep as sweeping

    if args.seeds < 1:
        raise _UsageError(f"lipfast sweep: error: --seeds must be >= 1, got {args.seeds}")
    if args.jobs < 1:
        raise _UsageError(f"lipfast sweep: error: --jobs must be >= 1, got {args.jobs}")
    if getattr(args, args.factor, None) is not None:
        flag = "--" + args.factor.replace("_", "-")
        raise _UsageError(f"lipfast sweep: error: {flag} conflicts with --factor {args.factor} (the sweep sets it "
                          "from --values)")
    base = _config_from_args(args)
    result = sweeping.run_sweep(args.factor, args.values, base, args.out, seeds=args.seeds, jobs=args.jobs,
                                report=args.report, overwrite=args.overwrite,
                                log=None if args.quiet else (lambda line: print(line, flush=True)))
    out = Path(args.out)
    print((out / sweeping.TABLE_MD_FILE).read_text(encoding="utf-8").split("\n## Layers", 1)[0].rstrip())
    print(f"table: {(out / sweeping.TABLE_MD_FILE).resolve()}")
    print(f"figures: {(out / sweeping.FIGURES_DIR).resolve()} ({len(result['per_run'])} runs)")
    return 0


def _cmd_ensemble(args) -> int:
    from . import ensemble

    if args.runs < 2:
        raise _UsageError(f"lipfast ensemble: error: --runs must be >= 2, got {args.runs}")
    if args.jobs < 1:
        raise _UsageError(f"lipfast ensemble: error: --jobs must be >= 1, got {args.jobs}")
    base = _config_from_args(args)
    res = ensemble.run_ensemble(base, args.out, runs=args.runs, jobs=args.jobs, report=args.report,
                                overwrite=args.overwrite,
                                log=None if args.quiet else (lambda line: print(line, flush=True)))
    print(f"{res['n_runs']} runs; SDE noise model: {res['noise_model']['note']}")
    for name, st in res["series"].items():
        for which in ("own", "averaged"):
            r = st[which]
            print(f"{name}: var ratio observed/SDE ({which} coefficients, 2nd half) {r['ratio']:.3g}, 95% interval "
                  f"{r['interval'][0]:.3g}-{r['interval'][1]:.3g} ({'within' if r['within'] else 'outside'} the "
                  f"range {r['range_if_sde'][0]:.2f}-{r['range_if_sde'][1]:.2f} of an SDE-true ratio 1)")
    out = Path(args.out)
    print(f"table: {(out / ensemble.ENSEMBLE_CSV_FILE).resolve()}")
    print(f"figure: {(out / ensemble.ENSEMBLE_FIGURE_FILE).resolve()}")
    return 0


_COMMANDS = {"demo": _cmd_demo, "train": _cmd_train, "report": _cmd_report, "simulate": _cmd_simulate,
             "sweep": _cmd_sweep, "ensemble": _cmd_ensemble}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``lipfast`` and ``python -m lipfast``; returns the exit status."""
    try:
        parser = _build_parser()
        args, extra = parser.parse_known_args(argv)
        if extra:  # argparse would blame the top-level parser: name the subcommand, suggest its option
            _unknown_arguments(parser, args.command, extra)
        return _dispatch(args)
    except _UsageError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return _interrupted()
    except Exception as exc:
        # Ctrl-C inside a class body being created (torch imports torch._dynamo lazily when an optimizer is made)
        # reaches us wrapped: "Error calling __set_name__ ..." with the KeyboardInterrupt as its cause.
        if _caused_by_interrupt(exc):
            return _interrupted()
        raise


def _interrupted() -> int:
    print("lipfast: interrupted; every completed step's records are in the run folder (resume with "
          "lipfast train --resume --out DIR)", file=sys.stderr)
    return 130


def _caused_by_interrupt(exc: BaseException) -> bool:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _unknown_arguments(parser: argparse.ArgumentParser, command: str, extra: list[str]) -> None:
    import difflib

    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    options = [o for o in sub._option_string_actions if o.startswith("--")]
    hints = []
    for word in extra:
        if word.startswith("-"):
            close = difflib.get_close_matches(word.split("=", 1)[0], options, n=1, cutoff=0.6)
            if close:
                hints.append(f"did you mean {close[0]} (for {word})?")
    sub.error(f"unrecognized arguments: {' '.join(extra)}" + (f"; {' '.join(hints)}" if hints else ""))


# The library's messages name its keyword arguments; at the command line the same choices are flags.
_CLI_WORDS = {"overwrite=True": "--overwrite", "resume=True": "--resume"}


def _dispatch(args) -> int:
    from .data import DatasetUnavailable
    from .runio import RunFolderError, RunWriteError

    from .distributed import DistributedRunError

    try:
        return _COMMANDS[args.command](args)
    except DistributedRunError as exc:
        print(f"lipfast {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except (ValueError, RunFolderError, RunWriteError, DatasetUnavailable, FileNotFoundError, ImportError) as exc:
        if _caused_by_interrupt(exc):  # a Ctrl-C wrapped on its way (an import it interrupted): main says so
            raise
        print(f"lipfast {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE


def _one_line(exc: BaseException) -> str:
    from .runio import RunWriteError

    text = str(exc)
    for api, flag in _CLI_WORDS.items():
        text = text.replace(api, flag)
    if isinstance(exc, RunWriteError) and exc.strerror:  # str() would add "[Errno N]" and the file name again
        text = exc.strerror.removeprefix("lipfast: ")
    return " ".join(text.split())


def run() -> None:
    """The ``lipfast`` console command (and ``python -m lipfast``): :func:`main`, then exit with its status.

    A rank of a ``torchrun`` launch leaves with ``os._exit`` once its output is flushed: a normal exit
    finalises the process group's C++ objects in no fixed order and can abort (SIGABRT,
    ``terminate called without an active exception``) after a run that succeeded or failed cleanly,
    which torchrun would then report instead of this rank's own status and message."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        sys.exit(main())
    from .distributed import flush_stdio

    code = 1
    try:
        code = main()
    except SystemExit as exc:  # --help, --version
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - printed here, then the rank leaves without finalising
        traceback.print_exc()
    finally:
        flush_stdio()
        os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    run()
