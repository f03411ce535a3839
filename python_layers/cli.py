"""The ``eidetic`` command: argument parsing and ``main``.

``eidetic train --config FILE.yaml --out RUN_DIR [--resume] [--nproc N] [key=value ...]`` trains a run
(``python_layers.run``; the config keys: ``python_layers.config``; checkpoints: ``python_layers.checkpoints``);
``eidetic export --run RUN_DIR --task T --out FILE`` saves one finished task as a plain torch.nn module.
``--resume`` continues the run in RUN_DIR from its last checkpoint, or starts it from its config (``--config``,
overrides, or RUN_DIR/config.yaml) where RUN_DIR holds no checkpoint yet.

The names other code reaches through this module (``load_config``, ``Run``, ``train``, ``CRASH_ENV``, ...) are
re-exported from the modules that define them.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import socket
import sys
import warnings
from pathlib import Path

from . import distributed as dist_mod
from .config import OPTIONS, ConfigError, default_config, keys_help, load_config, parse_overrides
from .run import RUN_LOCK_ENV, export, run_config, run_folder_lock, train

# re-exported: tests and scripts reach these through python_layers.cli
from .checkpoints import CHECKPOINT_FORMAT, CRASH_ENV, CRASH_EXIT_CODE, rng_state, set_rng_state  # noqa: F401
from .checkpoints import seed_everything as _seed_everything  # noqa: F401
from .run import Run  # noqa: F401
from .run import trainer_supports_resume as _trainer_supports_resume  # noqa: F401

__all__ = ["main", "train", "load_config", "default_config", "OPTIONS", "ConfigError"]


# set by ``launch`` for its processes: each one writes its error message there instead of printing it, and the
# launcher prints one (a process may be stopped by the launcher before it could print)
ERROR_DIR_ENV = "EIDETIC_ERROR_DIR"
LAUNCHER_PID_ENV = "EIDETIC_LAUNCHER_PID"  # the launcher's process id, for its processes (_stop_with_launcher)
_LAUNCHER_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")  # torchrun's launcher handles these


def launch(nproc: int, argv: list[str], folder_locked: bool = False) -> int:
    """``eidetic train --nproc N ...``: the same command on N local processes through torchrun's launcher
    (``torchrun --standalone``; gloo on CPU, NCCL on GPU). Returns 0; 2 when the processes stopped at a config,
    data or capacity error, printed once as an ``eidetic: error:`` line; 128 + the signal when the launcher was
    stopped by one (it stops the processes and says how to resume); else the failed process's exit status,
    after torchrun's failure report. The processes end when the launcher ends, however it ends
    (``_stop_with_launcher``). ``folder_locked``: the caller holds the run folder's lock for them
    (``run.run_folder_lock``; else rank 0 takes it when it creates the folder)."""
    import tempfile

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(["--standalone", f"--nproc_per_node={nproc}", "-m", "python_layers.cli",
                                         *argv])
    # torchrun sets this for each process too, with a banner saying so; the config's `threads` key sets the
    # processes' intra-op threads anyway
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    handlers = {name: signal.getsignal(getattr(signal, name)) for name in _LAUNCHER_SIGNALS if hasattr(signal, name)}
    # the launcher's own log lines repeat what is printed below
    disabled = logging.root.manager.disable
    logging.disable(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="eidetic-errors-") as errors:
        os.environ[ERROR_DIR_ENV] = errors
        if folder_locked:
            os.environ[RUN_LOCK_ENV] = str(Path(_out_dir(argv)).resolve())
        os.environ[LAUNCHER_PID_ENV] = str(os.getpid())
        try:
            run(args)
        except ChildFailedError as exc:
            said = sorted(Path(errors).glob("rank*"), key=lambda p: int(p.name[4:]))
            if said:
                print(said[0].read_text().rstrip("\n"), file=sys.stderr)
                return 2
            _, failure = exc.get_first_failure()
            print(exc, file=sys.stderr)
            out = _out_dir(argv)
            if (Path(out) / "checkpoint.pt").is_file():
                print(f"eidetic: a process failed; the run keeps its last checkpoint: continue it with: eidetic "
                      f"train --out {out} --resume", file=sys.stderr)
            return failure.exitcode if failure.exitcode > 0 else 1
        except SignalException as exc:  # the launcher stopped the processes with the signal it got
            how = "interrupted" if exc.sigval == signal.SIGINT else f"stopped by {exc.sigval.name}"
            print(f"eidetic: {how}; continue the run with: eidetic train --out {_out_dir(argv)} --resume",
                  file=sys.stderr)
            return 128 + int(exc.sigval)
        finally:
            for key in (ERROR_DIR_ENV, RUN_LOCK_ENV, LAUNCHER_PID_ENV):
                os.environ.pop(key, None)
            logging.disable(disabled)
            for name, handler in handlers.items():
                signal.signal(getattr(signal, name), handler)
    return 0


def _stop_with_launcher() -> None:
    """A process of ``launch``: end when the launcher ends, however it ends (``kill -9`` too), instead of training on
    and writing the run folder that a resumed run may then write as well. Linux's parent-death signal (SIGTERM);
    a launcher already gone before it is set ends the process here. A no-op elsewhere."""
    launcher = os.environ.get(LAUNCHER_PID_ENV)
    if not launcher or not sys.platform.startswith("linux"):
        return
    import ctypes
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != int(launcher):
        sys.exit(128 + signal.SIGTERM)


def _leave_error(line: str) -> None:
    """This process's error line, for the launcher (written whole, then renamed: never read half written)."""
    folder = Path(os.environ[ERROR_DIR_ENV])
    rank = int(os.environ.get("RANK", "0"))
    part = folder / f".rank{rank}.part"
    part.write_text(line + "\n")
    part.replace(folder / f"rank{rank}")


def _out_dir(argv: list[str]) -> str:
    """The ``--out`` value in ``argv`` (``--out DIR`` or ``--out=DIR``)."""
    for i, a in enumerate(argv):
        if a == "--out" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--out="):
            return a[len("--out="):]
    return "RUN_DIR"


def _fmt_row(row) -> str:
    return " ".join("   -  " if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:6.4f}" for v in row)


def format_matrix(matrix, label: str) -> str:
    """An accuracy matrix as text, one row per finished task; unmeasured entries are ``-``."""
    lines = [f"{label} (row i: after training task i; column j: test on task j)"]
    for i, row in enumerate(matrix):
        lines.append(f"  after task {i:2d}: {_fmt_row(row)}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    description = ("Eidetic Learning experiments: train a sequence of tasks without forgetting, then report the "
                   "accuracy matrix, ACC/BWT/FWT/forgetting, capacity and plots.")
    epilog = ("example:\n  eidetic train --config configs/pmnist_small.yaml --out runs/pmnist_small\n"
              "  eidetic train --config configs/demo.yaml --out runs/demo lr=2e-4 widths=[100,100]\n"
              "  eidetic train --out runs/pmnist_small --resume      # continue a killed run\n\n"
              "outputs in RUN_DIR: results.json, history.csv, accuracy_matrix.png, routed_accuracy_matrix.png, "
              "task_accuracy.png,\n  capacity.png, config.yaml, checkpoint.pt\n"
              "data: data_root, then $EIDETIC_DATA, then ../shared/data next to the project; never downloaded\n\n"
              + keys_help())
    parser = argparse.ArgumentParser(prog="eidetic", description=description, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    tr = sub.add_parser("train", help="train a task sequence (see the config keys below)", description=description,
                        epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    tr.add_argument("--config", metavar="FILE.yaml", help="experiment config (YAML mapping of the keys below)")
    tr.add_argument("--out", required=True, metavar="RUN_DIR", help="folder for results, plots and checkpoints")
    tr.add_argument("--resume", action="store_true",
                    help="continue the run in RUN_DIR from its last checkpoint (same final results as an "
                         "uninterrupted run); where RUN_DIR holds no checkpoint yet, start the run from its config "
                         "(--config, overrides, or RUN_DIR/config.yaml)")
    tr.add_argument("--nproc", type=int, default=1, metavar="N",
                    help="train on N processes of this machine (torchrun --standalone; gloo on CPU, NCCL on GPU); "
                         "for several machines run torchrun yourself (see the README)")
    tr.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys, e.g. lr=2e-4")
    ex = sub.add_parser("export", help="save one finished task as a plain torch.nn module",
                        description="Save finished task T of a run as a plain torch.nn module of compact layers "
                                    "(torch.save; loads with torch alone), checked on the task's test set. It "
                                    "reads inputs as the run's loaders give them (pixels scaled to [0, 1], then "
                                    "normalised with the data set's per-channel mean and std; permuted_mnist: "
                                    "with task T's permutation applied) and returns task T's logits, index i "
                                    "being the task's i-th class (split scenarios: label minus the task's first "
                                    "class).")
    ex.add_argument("--run", required=True, metavar="RUN_DIR", help="a run folder written by eidetic train")
    ex.add_argument("--task", required=True, type=int, metavar="T", help="the finished task to export")
    ex.add_argument("--out", required=True, metavar="FILE", help="where to torch.save the module (and FILE.pt2)")
    return parser


def main(argv=None) -> int:
    """``eidetic`` with ``argv`` (default: sys.argv[1:]); returns the exit status: 0, 2 for a config, data or
    usage error (printed as ``eidetic: error: ...``), or the launcher's status under ``--nproc N``.

    Warnings print as ``eidetic: warning: ...``. Under ``--nproc N`` (or torchrun) only rank 0 prints warnings
    and errors: the processes take the same decisions, so the others would repeat them. Missing data is a
    machine's own: the first process of each machine says so (naming the machine when there are several)."""
    quiet = int(os.environ.get("RANK", "0")) != 0
    _stop_with_launcher()
    with warnings.catch_warnings():
        default = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            # the library's warnings point at its caller's line, which under the CLI is runpy's, the console
            # script's or this package's: that line says nothing; installed packages' warnings keep their format
            if not _installed(filename):
                print(f"eidetic: warning: {message} ({category.__name__})", file=file or sys.stderr)
            else:
                default(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        if quiet:
            warnings.simplefilter("ignore")
        return _main(argv, quiet)


_HERE = os.path.dirname(os.path.abspath(__file__))


def _installed(filename: str) -> bool:
    """Whether ``filename`` belongs to an installed package other than this one (torch, numpy, ...)."""
    path = os.path.abspath(filename)
    parts = path.split(os.sep)
    return not path.startswith(_HERE + os.sep) and ("site-packages" in parts or "dist-packages" in parts)


def _main(argv, quiet: bool) -> int:
    from .scenarios import DataNotFoundError

    def error(message) -> int:
        if os.environ.get(ERROR_DIR_ENV):  # under launch: the launcher prints it
            _leave_error(f"eidetic: error: {message}")
        elif not quiet:
            print(f"eidetic: error: {message}", file=sys.stderr)
        return 2

    def data_error(message) -> int:
        if os.environ.get(ERROR_DIR_ENV):
            _leave_error(f"eidetic: error: {message}")
        elif int(os.environ.get("LOCAL_RANK", "0")) == 0:
            several = int(os.environ.get("WORLD_SIZE", "1")) > int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            where = f" (on {socket.gethostname()})" if several else ""
            print(f"eidetic: error{where}: {message}", file=sys.stderr)
        return 2

    parser = build_parser()
    # key=value overrides may stand on both sides of an option (`lr=0.1 --out D tasks=3`): argparse gives the
    # positional list the first run only, and leaves the others unrecognised
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "command", None) == "train":
        args.overrides += [a for a in extra if "=" in a and not a.startswith("-")]
        extra = [a for a in extra if not ("=" in a and not a.startswith("-"))]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "export":
        try:
            export(args.run, args.task, args.out)
        except (ConfigError, DataNotFoundError) as exc:
            return error(exc)
        return 0
    if args.command != "train":
        parser.print_help()
        return 2
    if args.nproc < 1:
        return error("--nproc must be >= 1")
    if args.nproc > 1 and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        try:  # a config error is one line here, before any process starts
            _train_config(args)
        except ConfigError as exc:
            return error(exc)
        argv = list(sys.argv[1:] if argv is None else argv)
        rest = [a for i, a in enumerate(argv) if not (a.startswith("--nproc") or (i and argv[i - 1] == "--nproc"))]
        try:
            # the launcher holds the run folder for its processes, and the system releases it when it ends
            with run_folder_lock(Path(args.out)) as locked:
                return launch(args.nproc, rest, locked)
        except ConfigError as exc:  # another run writes there
            return error(exc)
    try:
        results = train(_train_config(args), args.out, resume=args.resume)
    except ConfigError as exc:
        return error(exc)
    except DataNotFoundError as exc:
        return data_error(exc)
    except KeyboardInterrupt:
        # checkpoints are replaced atomically at the run's save points: an interrupt loses only the work since
        # the last one, and --resume continues from it with the same results
        if not quiet and not os.environ.get(ERROR_DIR_ENV):  # under launch, the launcher says it
            print(f"eidetic: interrupted; continue the run with: eidetic train --out {args.out} --resume",
                  file=sys.stderr)
        return 130  # the shell's status for SIGINT
    if dist_mod.rank() != 0:
        return 0  # rank 0 prints the run's results
    print(format_matrix(results["accuracy_matrix"], "accuracy matrix, true task id (oracle)"))
    if results["config"]["router"] != "none":
        print(format_matrix(results["routed_accuracy_matrix"],
                            f"accuracy matrix, {results['config']['router']} router (no task id)"))
    print(_final_line(results))
    # the plots lie beside results.json (results.json names them as the run that drew them saw its folder)
    print(f"results: {Path(args.out) / 'results.json'}; plots: "
          + ", ".join(str(Path(args.out) / Path(p).name) for p in results.get("plots", {}).values()))
    return 0


def _train_config(args) -> dict:
    """The run's config from ``--config``/``--resume`` and the overrides; ConfigError for any mistake."""
    overrides = parse_overrides(args.overrides)
    config_path = args.config
    if args.resume and config_path is None and ((Path(args.out) / "config.yaml").is_file()
                                                 or (Path(args.out) / "checkpoint.pt").is_file()):
        return run_config(args.out, overrides)  # config.yaml, or the checkpoint's where it was removed or emptied
    if config_path is None and not overrides:
        if args.resume and not (Path(args.out) / "checkpoint.pt").is_file():
            raise ConfigError(f"--resume: {args.out} holds no checkpoint.pt and no config.yaml; give --config "
                              "FILE.yaml (or key=value overrides) to start the run there")
        raise ConfigError("give --config FILE.yaml (or key=value overrides, e.g. scenario=synthetic)")
    return load_config(config_path, overrides)


def _final_line(results: dict) -> str:
    def f(v):
        return "n/a" if v is None else f"{v:.4f}"
    return (f"ACC {f(results['acc'])}  BWT {f(results['bwt'])}  FWT {f(results['fwt'])}  forgetting "
            f"{f(results['forgetting'])}  routed ACC {f(results.get('routed_acc'))}  wall {results['wall_seconds']:.1f}s")


if __name__ == "__main__":
    sys.exit(main())
