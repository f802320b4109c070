"""`cts-ray` command line. Bad input exits with code 2 and one line on stderr before any work."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import (EXIT_BAD_INPUT, EXIT_BUSY, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_STORAGE,
                     EXIT_TRIALS_FAILED, AnalysisError, CompactError, ConfigError, DataFileError, DivergedError, SchemaError,
                     StorageError, SweepBusyError)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other input error
        print(f"cts-ray: error: {message}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


class _Version(argparse.Action):
    """``--version``: the code version runs record (package version + git commit)."""
    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, help="print the code version and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        from .versions import code_version
        print(f"cts-ray {code_version()}")
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="cts-ray", description="Concrete Ticket Search and its baselines.")
    p.add_argument("--version", action=_Version)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    r = sub.add_parser("run", help="one experiment: dense to search point -> search -> retrain -> evaluate")
    r.add_argument("config", nargs="?", help="YAML config (omit for the embedded default: digits)")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set search.density=0.01 (repeatable)")
    r.add_argument("--out", help="run folder (default results/runs/<data>-<model>-<method>-d<density>-s<seed>-<hash>)")
    r.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.add_argument("--mlflow", nargs="?", const="", metavar="URI",
                   help="also log the run to MLflow (experiment cts-ray): to URI, else $MLFLOW_TRACKING_URI, "
                        "else sqlite results/mlflow.db")

    _sweep_parser(sub)

    e = sub.add_parser("eval", help="re-evaluate a run folder's ticket (ticket.pt) on its test set")
    e.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (results/runs/…, or a sweep's trials/<trial>)")

    x = sub.add_parser("export", help="write a run's ticket as a compact dense model (torch.export program) "
                                      "and its cost (JSON beside it)")
    x.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (results/runs/…, or a sweep's trials/<trial>)")
    x.add_argument("--out", metavar="FILE", help="the program file (default RUN_DIR/compact.pt2; the JSON goes "
                                                 "beside it with suffix .json)")

    a = sub.add_parser("analyze", help="one analysis of sweep results: insensitivity, interaction, seeds or "
                                       "comparison")
    a.add_argument("kind", choices=["insensitivity", "interaction", "seeds", "comparison"],
                   help="insensitivity: hyperparameter spread against seed spread; interaction: two-way ANOVA of "
                        "two swept axes; seeds: seed variance and significance; comparison: method x density "
                        "tables, compute, sanity checks")
    _results_args(a)
    a.add_argument("--out", help="also write the plots (PNG) into this folder")
    a.add_argument("--method", help="insensitivity, interaction: only this method")
    a.add_argument("--axis", action="append", help="insensitivity, interaction: only this axis (repeatable): temperature, "
                                                   "mask_lr, search_length, objective, controller, search_point")

    rp = sub.add_parser("report", help="one Markdown report (tables, PNG plots, provenance) of sweep results")
    _results_args(rp)
    rp.add_argument("--out", help="report folder (default: <first RESULTS>/report)")

    c = sub.add_parser("config", help="print the resolved config (and its hash) without running")
    c.add_argument("config", nargs="?")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    c.add_argument("--keys", action="store_true", help="list every key with its default and allowed values")
    return p


def _sweep_parser(sub) -> None:
    w = sub.add_parser("sweep", help="run a sweep file with Ray Tune (grid, random or Optuna search)")
    w.add_argument("file", help="sweep YAML (see tune_configs/)")
    w.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a sweep key (num_samples=4) or fix a run-config key for every trial "
                        "(training.epochs=5); repeatable")
    w.add_argument("--address", help="join a running Ray cluster (e.g. auto, or HOST:PORT); default: start Ray here")
    _continue_args(w)
    w.add_argument("--name", help="sweep name (folder under storage, MLflow parent run); default: the file's name")
    w.add_argument("--quiet", action="store_true", help="no live progress (the summary only)")
    w.add_argument("--verbose", action="store_true", help="Ray Tune's full trial tables instead of the progress line")
    w.add_argument("--dry-run", action="store_true",
                   help="validate and print the trials, the dense runs and LTR rounds they share and the compute; "
                        "start nothing")


def _continue_args(w) -> None:
    """`cts-ray sweep`'s flags that continue an existing sweep."""
    w.add_argument("--resume", action="store_true", help="continue an interrupted sweep; finished trials are kept")
    w.add_argument("--retry-failed", action="store_true",
                   help="with --resume: run the failed and diverged trials again, afresh; their rows and MLflow "
                        "runs are replaced")
    w.add_argument("--retry-stopped", action="store_true",
                   help="with --resume: also run again the trials a scheduler stopped")
    w.add_argument("--extend", action="store_true",
                   help="add the trials of new grid values to a finished sweep (other settings unchanged)")


def _results_args(p) -> None:
    p.add_argument("results", nargs="+", metavar="RESULTS",
                   help="sweep folder(s), e.g. results/sweeps/quickstart, or a folder of sweeps")
    p.add_argument("--metric", default="test_accuracy", help="test_accuracy (final epoch, default) or peak_test_accuracy "
                                                                "(max over epochs on the test set: not a selected result)")
    p.add_argument("--where", action="append", default=[], metavar="COLUMN=VALUE",
                   help="only trials with this trials-table value, e.g. --where dataset=mnist (repeatable)")
    p.add_argument("--allow-incomplete", action="store_true",
                   help="analyse the finished trials of a sweep that still has unfinished ones")


def _analysis(args) -> int:
    from .analysis import load as load_mod, report
    where = {}
    for text in args.where:
        key, sep, value = text.partition("=")
        if not sep or not key:
            raise AnalysisError(f"where: {text!r} is not COLUMN=VALUE")
        where[key.strip()] = value.strip()
    if args.command == "report":
        path = report.build(args.results, args.out, metric=args.metric, allow_incomplete=args.allow_incomplete,
                            where=where)
        print(f"report: {path}")
        return 0
    res = load_mod.load(args.results, metric=args.metric, allow_incomplete=args.allow_incomplete, where=where)
    axial = args.kind in ("insensitivity", "interaction")
    options = {"axes": args.axis, "method": args.method} if axial else {}
    if not axial and (args.axis or args.method):
        raise AnalysisError("--axis/--method: only for `analyze insensitivity` or `analyze interaction`")
    from pathlib import Path
    text, files = report.run_kind(args.kind, res, Path(args.out) if args.out else None, **options)
    print(f"Used: {res.describe()}\n")
    print(text)
    for f in files:
        print(f"plot: {f}")
    return 0


def _print_summary(summary: dict, out) -> None:
    def pct(v):
        return "-" if v is None else f"{100 * v:.2f} %"
    rows = [
        ("method", summary["method"] + (f" ({summary['objective']}, {summary['controller']})"
                                        if summary["objective"] else "")),
        ("data / model", f"{summary['dataset']} / {summary['model']}"),
        ("seed / config hash", f"{summary['seed']} / {summary['config_hash']}"),
        ("density target / achieved", f"{summary['target_density']:.4g} / {summary['achieved_density']:.4g}"
                                      f"  ({summary['kept_weights']} of {summary['prunable_weights']} weights)"),
        ("effective density", _effective(summary)),
        ("alive units per layer", ", ".join(f"{n} {a}" for n, a in summary["layer_alive_units"].items())),
        ("ticket test accuracy", f"{pct(summary['test_accuracy'])}  (final epoch; the curve's peak "
                                 f"{pct(summary['peak_test_accuracy'])} is not a selected result)"),
        ("dense test accuracy", pct(summary["dense_test_accuracy"])),
        ("seconds: pretrain / search / retrain",
         f"{summary['pretrain_seconds']:.1f} / {summary['search_seconds']:.1f} / {summary['retrain_seconds']:.1f}"),
        ("mask sha256", summary["mask_sha256"][:16]),
        ("run folder", str(out)),
    ]
    if summary["strong_ticket"]:
        rows.insert(4, ("strong ticket", "weights never trained; evaluated as is"))
    if summary["sanity"] != "none":
        rows.insert(1, ("sanity check", summary["sanity"]))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    if summary.get("levels"):
        print("\nLTR levels: round  density  effective  test accuracy  cumulative seconds")
        for lv in summary["levels"]:
            print(f"            {lv['round']:>5}  {lv['density']:.5f}  {lv['effective_density']:>9.5f}"
                  f"  {pct(lv['test_accuracy']):>13}  {lv['cumulative_seconds']:>18.1f}")


def _effective(summary: dict) -> str:
    """Effective density: kept weights on an input→output path (anatomy.py), and collapsed layers."""
    text = f"{summary['effective_density']:.4g}  ({summary['effective_kept']} of {summary['kept_weights']} kept weights on a path)"
    if summary["effective_kept"] == 0:
        text += "; DISCONNECTED: no path from input to output"
    elif summary["collapsed_layers"]:
        text += f"; layers with no weight on a path: {', '.join(summary['collapsed_layers'])}"
    return text


def _sweep(args) -> int:
    from .sweep import spec as spec_mod
    spec = spec_mod.load(args.file, args.overrides, name=args.name)   # validated before Ray starts
    if args.dry_run:
        from .sweep.preview import preview
        print(preview(spec))
        return 0
    import signal
    from .sweep import runner
    from .sweep.lease import take
    from .sweep.resume import RETRY_FAILED, RETRY_STOPPED, check
    retry = (RETRY_FAILED if args.retry_failed else ()) + (RETRY_STOPPED if args.retry_stopped else ())
    signal.signal(signal.SIGTERM, signal.default_int_handler)   # SIGTERM is Ctrl-C (runner: while trials run)
    with take(spec.root):   # one driver per sweep: before anything reads or writes it
        points = check(spec, resume=args.resume, extend=args.extend, retry=retry)   # so is a resume that would not match
        n = spec.trial_count() if points is None else len(points) * spec.num_samples
        print(f"sweep {spec.name!r}: {n} {'new ' if args.extend else ''}trials, searcher {spec.searcher}, "
              f"folder {spec.root}", flush=True)
        try:
            result = runner.run_sweep(spec, address=args.address, resume=args.resume, extend=args.extend,
                                      retry=retry, verbose=0 if args.quiet else 2 if args.verbose else 1)
        except (StorageError, OSError) as e:   # full, read-only or gone: its line and what to do
            return _storage_stop(e, spec.root, args)
        except KeyboardInterrupt:   # a second Ctrl-C, or one before the trials started
            print(f"\ncts-ray: interrupted; resume with: {_again(args, '--resume')}", file=sys.stderr)
            return EXIT_INTERRUPTED
    _print_sweep_end(spec, result)
    return _sweep_exit(args, result)


def _print_sweep_end(spec, result: dict) -> None:
    from .sweep.summary import format_summary
    print()
    print(format_summary(result["summary"]))
    print()
    for what, where in result["paths"].items():
        print(f"{what:<14} {where}")
    if result["mlflow_experiment"] is not None:
        from .sweep.mlflow_log import ui_link
        print(f"{'mlflow ui':<14} {ui_link(result['mlflow_experiment'], spec.name)}  (on the UI serving that store)")
    if result["mlflow_error"]:
        print(f"MLflow logging failed: {result['mlflow_error']}", file=sys.stderr)


def _sweep_exit(args, result: dict) -> int:
    """The exit code (README "Exit codes"), after the last line: what to run next, if anything."""
    stopped = result.get("interrupted")
    if stopped is not None:
        from .wording import count
        print(f"\ninterrupted: {count(stopped['running'], 'trial')} {'was' if stopped['running'] == 1 else 'were'} "
              f"running (recorded as interrupted), {stopped['not_started']:,} had not started")
        print(f"resume with: {_again(args, '--resume')}")
        return EXIT_INTERRUPTED
    failed = result["failed"]
    if failed:
        from .wording import count
        print(f"\n{count(failed, 'trial')} of this sweep failed or diverged (reasons above); once the cause is fixed, "
              f"retry them with: {_again(args, '--resume', '--retry-failed')}")
        return EXIT_TRIALS_FAILED
    return EXIT_OK


def _again(args, *flags: str) -> str:
    """The `cts-ray sweep` command that continues this one: its file, ``flags``, and the --set,
    --name and --address it ran with."""
    import shlex
    words = ["cts-ray", "sweep", args.file, *flags]
    for override in args.overrides:
        words += ["--set", override]
    for flag, value in (("--name", args.name), ("--address", args.address)):
        if value:
            words += [flag, value]
    return shlex.join(words)


def _storage_stop(e: OSError, root, args) -> int:
    """A sweep stopped by its storage (full, read-only, gone): its line, then what to do, exit EXIT_STORAGE."""
    from .storage import classify, kind_of
    fault = classify(e, root)
    if fault is None:
        raise e
    todo = {"full": "free space there", "read-only": f"make {root} writable again",
            "gone": f"bring {root} back (mount its storage)"}[kind_of(fault)]
    print(f"cts-ray: {fault}", file=sys.stderr)
    print(f"cts-ray: the sweep stopped; {todo}, then run: {_again(args, '--resume', '--retry-failed')}",
          file=sys.stderr)
    return EXIT_STORAGE


def main(argv=None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()   # inside the try: a reader that left (| head) is not an error
        return code
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # no second error at exit
        return 0


def _main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from . import config as config_mod
    try:
        if args.command == "config":
            if args.keys:
                for key, default, allowed, help_ in config_mod.describe():
                    print(f"{key:<26} default {default!r:<14} allowed: {allowed}" + (f"  — {help_}" if help_ else ""))
                return 0
            cfg = config_mod.load(args.config, args.overrides)
            print(f"# config hash {cfg.hash}")
            print(cfg.to_yaml(), end="")
            return 0
        if args.command == "sweep":
            return _sweep(args)
        if args.command in ("analyze", "report"):
            return _analysis(args)
        if args.command == "export":
            from .export import export_run, summary_lines
            from .storage import named_faults
            with named_faults(Path(args.out).parent if args.out else Path(args.run_dir)):
                print("\n".join(summary_lines(export_run(args.run_dir, args.out))))
            return 0
        if args.command == "eval":
            from . import pipeline
            print(_eval_line(pipeline.evaluate_run(args.run_dir)))
            return 0
        cfg = config_mod.one_process(config_mod.load(args.config, args.overrides))
        from . import pipeline
        out = pipeline.default_out(cfg) if args.out is None else args.out

        def run(on_record=None):
            from .storage import named_faults
            with named_faults(Path(out).resolve().parent):   # a full disk: one line, exit EXIT_STORAGE
                return pipeline.run(cfg, out, overwrite=args.overwrite, progress=not args.quiet, on_record=on_record)
        if args.mlflow is None:
            summary = run()
        else:
            from .sweep import mlflow_log
            pipeline.check_out(Path(out), args.overwrite)   # refused before an MLflow run is made
            uri = args.mlflow or os.environ.get("MLFLOW_TRACKING_URI") or \
                mlflow_log.default_tracking_uri(Path("results/runs"))
            summary = mlflow_log.logged_run(uri, "cts-ray", cfg, out, run)
            print(f"mlflow: {uri}")
        _print_summary(summary, out)
        return 0
    # bad input, data that cannot answer, or a model compaction cannot handle: one line
    except (ConfigError, AnalysisError, SchemaError, CompactError) as e:
        print(f"cts-ray: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except DivergedError as e:   # a result of the settings, not a bug; one line
        print(f"cts-ray: diverged: {e}; nothing was written (try a lower training.lr or set training.grad_clip)",
              file=sys.stderr)
        return EXIT_FAILED
    except DataFileError as e:   # a streamed file that does not decode, named; the saved epochs stay
        print(f"cts-ray: failed: {e}", file=sys.stderr)
        return EXIT_FAILED
    except StorageError as e:    # the message names the cause and the folder
        print(f"cts-ray: {e}", file=sys.stderr)
        return EXIT_STORAGE
    except SweepBusyError as e:  # names the live driver (host, pid, since when)
        print(f"cts-ray: {e}", file=sys.stderr)
        return EXIT_BUSY
    except KeyboardInterrupt:
        print("cts-ray: interrupted; nothing was written for the unfinished run", file=sys.stderr)
        return EXIT_INTERRUPTED


def _eval_line(r: dict) -> str:
    """What `cts-ray eval` prints: the accuracy now, against the one the run recorded."""
    now = f"test accuracy {100 * r['test_accuracy']:.2f} %  (loss {r['test_loss']:.4f})"
    if r["recorded"] is None:
        return f"{now}; the run recorded none"
    same = "equal to" if r["test_accuracy"] == r["recorded"] else "differs from"
    return f"{now}; {same} the recorded {100 * r['recorded']:.2f} %"


if __name__ == "__main__":
    sys.exit(main())
