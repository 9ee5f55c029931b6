"""The `fedshop` command."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from shared.config import DATA_FORMATS, DEVICES, FedShopConfig, load_config
from shared.errors import UserError

log = logging.getLogger("fedshop")
FORMAT_CHOICES = tuple(f for f in DATA_FORMATS if f != "auto")


def _config(args: argparse.Namespace) -> FedShopConfig:
    if getattr(args, "resume", None):
        return _resume_config(args)
    overrides = list(args.set or [])
    if getattr(args, "run_dir", None):
        overrides.append(f"run-dir={args.run_dir}")
    if getattr(args, "no_progress", False):
        overrides.append("progress=false")
    if getattr(args, "init_adapter", None):
        overrides.append(f"init-adapter={args.init_adapter}")
    config = load_config(args.config, overrides)
    if idle := config.idle_generator_keys():
        log.warning("%s: with data-path the synthetic generator's keys %s shape nothing (the log's own shoppers, "
                    "items and dates decide)", args.config, ", ".join(idle))
    return config


def _resume_config(args: argparse.Namespace) -> FedShopConfig:
    """`simulate --resume RUN_DIR`: the stopped run's own config (RUN_DIR/config.toml), continued in place from its
    last complete checkpoint; nothing else may change, so that the resumed rounds are the ones it would have run."""
    others = [flag for flag, given in (("--config", args.config), ("--set", args.set), ("--run-dir", args.run_dir),
                                       ("--init-adapter", args.init_adapter), ("--force", args.force)) if given]
    if others:
        raise UserError(f"--resume takes the stopped run's own config ({args.resume}/config.toml); drop "
                        f"{', '.join(others)}")
    path = Path(args.resume)
    if not (path / "config.toml").is_file():
        raise UserError(f"--resume {path}: {path / 'config.toml'} does not exist; expected the run directory of a "
                        "fedshop run that stopped before its last round")
    overrides = [f"resume-from={path}", f"run-dir={path}", "init-adapter=", "resume-unfinished=true"]
    if args.no_progress:
        overrides.append("progress=false")
    return load_config(path / "config.toml", overrides)


def cmd_simulate(args: argparse.Namespace) -> int:
    from shared.locks import directory_lock

    config = _config(args)
    with directory_lock(config.run_dir, "run directory"):  # from the claim to the last report: one writer
        return _simulate(config, args)


def _simulate(config: FedShopConfig, args: argparse.Namespace) -> int:
    from server.preflight import preflight
    from shared.rundir import RunDirectory

    started = time.perf_counter()
    if config.resume_unfinished:
        point = RunDirectory(config.run_dir).resume_point()  # refused here, before Ray starts, if nothing is left
        log.info("resuming %s from checkpoints/round-%d: %d round(s) left", config.run_dir, point.checkpoint,
                 point.rounds)
    elif config.resume_from:
        _check_resumable(config)
    _claim_run_dir(config, args.force)  # before any work: a refused run directory costs nothing
    base_meta = preflight(config)
    from server.simulation import run_simulation

    log.info("simulating %d merchants x %d rounds (%s) -> %s", config.num_merchants, config.num_rounds,
             f"DP target epsilon {config.target_epsilon:g}, delta {config.target_delta:g}, unit {config.privacy_unit}"
             if config.dp else "no DP", config.run_dir)
    report = Path(config.run_dir) / "report.md"
    before = _stamp(report)  # resuming in place, the earlier part's report is there: it must not count as this run's
    run_simulation(config, verbose=args.verbose)
    stopped = _stopped(config)
    if stopped is not None:  # too few merchants: the reason (round, who and why, last checkpoint) as the last line
        print(f"fedshop: error: {one_line(stopped)}", file=sys.stderr)
        return 1
    if _stamp(report) in (None, before):
        log.error("the simulation ended without writing this run's %s; see the log above", report)
        return 1
    if config.reference_list:
        from server.references import run_references, write_references
        from server.report import write_report

        log.info("training the reference runs on the same splits: %s", ", ".join(config.reference_list))
        write_references(config.run_dir, run_references(config, config.reference_list))
        write_report(RunDirectory(config.run_dir), config, base_meta)
    log.info("done in %.0f s; report: %s", time.perf_counter() - started, report)
    return 0


def _stopped(config: FedShopConfig) -> str | None:
    """Why the run just simulated stopped early (its last metrics record is the `stopped` one), else None."""
    from shared.rundir import RunDirectory

    records = RunDirectory(config.run_dir).read_metrics()
    return str(records[-1].get("reason", "")) if records and records[-1]["scope"] == "stopped" else None


def cmd_deploy(args: argparse.Namespace) -> int:
    from server.deploy import absolute_paths, check_options, run_deployment

    check_options(tls=args.tls, auth=args.auth)  # before any work
    extra = parse_node_config(args.node_config)
    args.set = [*(args.set or []), f"num-merchants={args.merchants}"]
    config = absolute_paths(_config(args))
    if config.resume_from:
        _check_resumable(config)
    _claim_run_dir(config, args.force)
    from shared.data import check_base_matches
    from shared.model import base_exists, read_base_meta
    from shared.pretrain import pretrain

    if not base_exists(config.base_dir):
        log.info("base directory %s does not exist yet: pretraining it on the public split first", config.base_dir)
        pretrain(config)
    check_base_matches(read_base_meta(config.base_dir), config)
    report = Path(config.run_dir) / "report.md"
    before = _stamp(report)
    try:
        timing = run_deployment(config, args.merchants, tls=args.tls, auth=args.auth,
                                state_root=args.state_dir and args.state_dir.resolve(), extra_node_config=extra)
    except KeyboardInterrupt as exc:  # Ctrl-C, SIGTERM or SIGHUP: run_deployment has stopped every process
        log.error("interrupted (%s); every process it started is stopped: %s", exc or "Ctrl-C",
                  Path(config.run_dir) / ".deploy" / "pids.json")
        return 130
    if _stamp(report) in (None, before):
        log.error("the deployment ended without writing this run's %s; see %s", report,
                  Path(config.run_dir) / ".deploy" / "logs")
        return 1
    log.info("done: start-up %.1f s, run %.1f s, total %.1f s; report: %s", timing["startup-seconds"],
             timing["run-seconds"], timing["total-seconds"], report)
    return 0


def parse_node_config(text: str | None) -> dict[str, str]:
    """`--node-config "KEY=VALUE ..."` as a mapping; UserError naming the entry without a '='."""
    extra = {}
    for item in (text or "").split():
        key, equals, value = item.partition("=")
        if not equals or not key:
            raise UserError(f"--node-config entry {item!r}: expected KEY=VALUE (space-separated, e.g. "
                            "\"target-epsilon=4 message-log=FILE\")")
        extra[key] = value
    return extra


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """(inode, mtime ns, size) of a file, None if absent: reports are replaced atomically (a new inode), so a
    stamp that changed means the file was written again."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


def _claim_run_dir(config: FedShopConfig, force: bool) -> None:
    """Before any work: a fresh run needs a run directory without a run in it (--force moves one aside, never
    deletes it); resuming in place keeps the directory as it is."""
    from shared.rundir import RunDirectory

    run_dir = RunDirectory(config.run_dir)
    if config.resumes_in_place:
        if force:
            raise UserError(f"--force would move {run_dir.path} aside, but resume-from = {config.resume_from} "
                            "continues that directory in place; drop --force (or resume into another --run-dir)")
        return
    if force and run_dir.run_files():
        log.info("--force: moved the run in %s aside to %s (nothing deleted)", run_dir.path, run_dir.move_aside())
    run_dir.check_fresh()


def _check_resumable(config: FedShopConfig) -> None:
    """A run can continue another only on the same data, base and adapter shape."""
    previous = Path(config.resume_from)
    for needed in ("config.toml", "privacy.csv", "adapter/adapter_model.safetensors"):
        if not (previous / needed).is_file():
            raise UserError(f"resume-from: {previous / needed} does not exist; expected a finished fedshop run")
    from shared.model import check_safetensors

    check_safetensors(previous / "adapter" / "adapter_model.safetensors", "the run's final LoRA adapter")
    before, now = load_config(previous / "config.toml").to_flat(), config.to_flat()
    different = [f"{k} = {before[k]!r} there, {now[k]!r} here" for k in
                 ("seed", "num-merchants", "num-items", "num-categories", "base-dir", "lora-r", "lora-targets",
                  "wide")
                 if before[k] != now[k]]
    if different:
        raise UserError(f"resume-from: {previous} cannot be continued with this config (" + "; ".join(different)
                        + ")")


def cmd_pretrain(args: argparse.Namespace) -> int:
    config = _config(args)
    from shared.pretrain import pretrain

    pretrain(config, args.out or config.base_dir)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from server.sweep import parse_epsilons, run_sweep

    epsilons = parse_epsilons(args.epsilons)
    overrides = [*(args.set or []), f"audit-canaries={args.canaries}", "progress=true"]
    out = Path(args.run_dir) if args.run_dir else Path("runs") / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    started = time.perf_counter()
    rows = run_sweep(args.config, overrides, epsilons, out)
    failed = [r for r in rows if r["status"] != "ok"]
    log.info("sweep done in %.0f s: %d run(s), %d failed; table: %s", time.perf_counter() - started, len(rows),
             len(failed), out / "sweep.md")
    return 1 if failed else 0


def cmd_audit(args: argparse.Namespace) -> int:
    from server.audit import audit_run, describe

    started = time.perf_counter()
    result = audit_run(args.run_dir)
    log.info("audit of %s (%.0f s): %s", args.run_dir, time.perf_counter() - started, describe(result))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from server.export import export_run
    from server.manifest import verify

    if args.verify:
        problems = verify(args.verify)
        for problem in problems:
            print(f"fedshop: {args.verify}/{problem}", file=sys.stderr)
        log.info("%s: %s", args.verify, "every file matches manifest.json" if not problems else
                 f"{len(problems)} problem(s)")
        return 1 if problems else 0
    if args.run_dir is None or args.out is None:
        raise UserError("export needs RUN_DIR and --out DIR (or --verify DIR)")
    out = export_run(args.run_dir, args.out, merge=args.merge, round=args.round)
    log.info("exported %s%s -> %s (model card: %s)", args.run_dir, "" if args.round is None else
             f" round {args.round}", out, out / "README.md")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from server.predict import Predictor, check_top_k, render

    if (args.history is None) == (args.input is None):
        raise UserError("predict needs one of --history \"ITEM ITEM ...\" (one shopper) or --input FILE.csv (a batch)")
    if args.input is not None and args.candidates:
        raise UserError("--candidates goes with --history; with --input give each shopper's candidates in the CSV's "
                        "candidates column")
    check_top_k(args.top_k)
    predictor = Predictor(args.adapter, device=args.device)
    if args.input is not None:
        result = predictor.predict_file(args.input, args.task, args.top_k, args.explain)
    else:
        candidates = [c.strip() for c in (args.candidates or "").split(",") if c.strip()]
        activity = None
        if args.task == "churn":
            from server.predict import Activity

            if args.sessions is None or args.days_since_last is None:
                raise UserError("--task churn with --history needs --sessions and --days-since-last (and, if the "
                                "shopper had several sessions, --mean-gap-days; --bought-last-session if they bought)")
            activity = Activity(args.sessions, args.days_since_last, args.mean_gap_days, args.bought_last_session)
        result = predictor.predict(args.history.split(), args.task, args.top_k, candidates, args.explain,
                                   price_level=args.price_level, activity=activity)
    print(render(result, args.format))
    return 0


def cmd_data_inspect(args: argparse.Namespace) -> int:
    overrides = list(args.set or [])
    if args.format:
        overrides.append(f"data-format={args.format}")
    config = load_config(args.config, [*overrides, f"data-path={args.file}"])
    from server.datareport import inspect_file

    out = inspect_file(config, str(args.file), args.out or Path(str(args.file) + ".report"))
    print(out.read_text(encoding="utf-8"))
    log.info("data report: %s (heat map and histograms: %s)", out, out.with_suffix(".png"))
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    config = load_config(args.config, list(args.set or []))
    from shared.formats import write_format
    from shared.synthetic import generate

    data = generate(config)
    files = write_format(data.events, args.out, args.format)
    log.info("%d synthetic events (%d merchants and the public split) -> %s", len(data.events),
             config.num_merchants, ", ".join(str(f) for f in files))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedshop", description="Federated DP-LoRA T5 for shopper behaviour.")
    parser.add_argument("-v", "--verbose", action="store_true", help="show Flower's and Ray's own logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", type=Path, help="TOML file of config overrides (e.g. configs/default.toml)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one config key (repeatable)")

    simulate = sub.add_parser("simulate", help="one federated run in Flower's simulation engine")
    common(simulate)
    simulate.add_argument("--run-dir", help="run directory to write (default: config key run-dir)")
    simulate.add_argument("--no-progress", action="store_true", help="no progress line per round")
    simulate.add_argument("--force", action="store_true", help="if the run directory already holds a run, move it "
                          "aside to <dir>.old-<time> first (nothing is deleted); without it, such a directory is "
                          "refused unless resume-from names it (continue it in place)")
    simulate.add_argument("--resume", metavar="RUN_DIR", help="finish a run that stopped before its last round "
                          "(killed, or stopped by too few merchants): from its last complete checkpoint, with its "
                          "own config.toml and ledger (run from the directory it was started in: its paths are "
                          "relative to it)")
    simulate.add_argument("--init-adapter", metavar="DIR", help="continue from an export folder on this config's "
                          "data: its adapter and its merchants' privacy ledger (config key init-adapter)")
    simulate.set_defaults(func=cmd_simulate)

    deploy = sub.add_parser("deploy", help="the same run on Flower's deployment engine: one SuperLink and a "
                            "SuperNode per merchant on 127.0.0.1, every process stopped by PID at the end")
    common(deploy)
    deploy.add_argument("--merchants", type=int, required=True, help="SuperNodes to start (sets num-merchants)")
    deploy.add_argument("--tls", action="store_true", help="TLS on the SuperLink (a throwaway CA for this run)")
    deploy.add_argument("--auth", action="store_true", help="SuperNode authentication: only registered merchant "
                        "keys join, and the ledger names merchants by their authenticated node")
    deploy.add_argument("--run-dir", help="run directory to write (default: config key run-dir)")
    deploy.add_argument("--state-dir", type=Path, help="root of the merchants' own privacy state, one folder per "
                        "merchant (default RUN_DIR/.deploy/state); reuse it to continue their budgets")
    deploy.add_argument("--node-config", metavar="\"KEY=VALUE ...\"", help="more node config for every SuperNode, "
                        "e.g. \"target-epsilon=4\" (each merchant's own budget) or \"message-log=FILE\" (a line per "
                        "message a merchant sends)")
    deploy.add_argument("--no-progress", action="store_true", help="no progress line per round")
    deploy.add_argument("--force", action="store_true", help="as for simulate: move a run in the way aside first")
    deploy.set_defaults(func=cmd_deploy)

    pretrain = sub.add_parser("pretrain", help="pretrain the T5 base on the public split (no DP)")
    common(pretrain)
    pretrain.add_argument("--out", help="base directory to write (default: config key base-dir)")
    pretrain.set_defaults(func=cmd_pretrain)
    sweep = sub.add_parser("sweep", help="the same federation at several privacy budgets, audited, with a table "
                           "and a privacy-utility plot")
    common(sweep)
    sweep.add_argument("--epsilons", required=True, help="comma-separated budgets per merchant; inf = non-private "
                       "(e.g. 0.5,1,2,4,8,inf)")
    sweep.add_argument("--canaries", type=int, default=256, help="canaries inserted in each run for the one-run "
                       "audit (default 256; 0 = none)")
    sweep.add_argument("--run-dir", help="sweep directory (default runs/sweep-<time>)")
    sweep.set_defaults(func=cmd_sweep)

    audit = sub.add_parser("audit", help="empirical privacy audit of a run's global adapter (membership attack; "
                           "canary lower bound eps_emp when the run had canaries)")
    audit.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    audit.set_defaults(func=cmd_audit)
    export = sub.add_parser("export", help="the global adapter as a plain PEFT folder with a model card and a "
                            "sha256 manifest")
    export.add_argument("run_dir", type=Path, nargs="?", metavar="RUN_DIR")
    export.add_argument("--out", type=Path, help="a new directory to write")
    export.add_argument("--merge", action="store_true", help="also write merged/: the base with the adapter folded in")
    export.add_argument("--round", type=int, metavar="N", help="export the global adapter after round N "
                        "(checkpoints/round-N of the run) instead of the final one")
    export.add_argument("--verify", type=Path, metavar="DIR", help="check an export folder against its manifest")
    export.set_defaults(func=cmd_export)
    from server.predict import TASKS

    predict = sub.add_parser("predict", help="predictions (and occlusion explanations) from an exported adapter")
    predict.add_argument("--adapter", required=True, type=Path, help="an export folder (fedshop export)")
    predict.add_argument("--history", help="the shopper's viewed items, oldest first, e.g. \"i3 i17\"")
    predict.add_argument("--input", type=Path, metavar="FILE.csv", help="a batch: CSV with header "
                         "shopper_id,history[,candidates] (space-separated item ids, history oldest first)")
    predict.add_argument("--task", default="next-item", choices=tuple(TASKS))
    predict.add_argument("--device", choices=DEVICES, help="where the model runs (default: the run's config key "
                         "device; auto = cuda when torch sees one, else cpu)")
    predict.add_argument("--candidates", help="intent with --history: comma-separated candidate items")
    predict.add_argument("--top-k", type=int, default=10, help="next-item: how many items (default 10)")
    predict.add_argument("--price-level", type=float, default=1.0, help="intent: offered price / list price "
                         "(default 1; the price task scores every level)")
    predict.add_argument("--sessions", type=int, help="churn: the shopper's sessions so far")
    predict.add_argument("--days-since-last", type=float, help="churn: days since the shopper's last event")
    predict.add_argument("--mean-gap-days", type=float, help="churn: mean days between sessions (omit for one session)")
    predict.add_argument("--bought-last-session", action="store_true", help="churn: the last session had a purchase")
    predict.add_argument("--format", default="table", choices=("table", "json"))
    predict.add_argument("--explain", action="store_true", help="occlusion: how much each history event moved "
                         "each score")
    predict.set_defaults(func=cmd_predict)
    data = sub.add_parser("data", help="data tools: inspect an events file, write synthetic data")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    inspect = data_sub.add_parser("inspect", help="what an events file holds and what the merchant partition would "
                                  "be: markdown report and a PNG (category mix heat map, sizes, events per shopper)")
    common(inspect)
    inspect.add_argument("file", type=Path, metavar="FILE")
    inspect.add_argument("--format", choices=("auto", *FORMAT_CHOICES), help="data format (default: config key "
                         "data-format, auto = detected)")
    inspect.add_argument("--out", type=Path, help="report folder (default FILE.report/)")
    inspect.set_defaults(func=cmd_data_inspect)
    synth = data_sub.add_parser("synth", help="write the synthetic generator's events (merchants and the public "
                                "split) as canonical CSV, or in another format")
    common(synth)
    synth.add_argument("--out", required=True, type=Path, help="file to write (e.g. data/synthetic.csv)")
    synth.add_argument("--format", default="canonical", choices=FORMAT_CHOICES, help="default canonical")
    synth.set_defaults(func=cmd_data_synth)
    return parser


def one_line(text: str) -> str:
    """`text` with every character that is not printable escaped (a line break, a form feed, an undecodable byte
    of a file name): the error stays one line, whatever name or value it quotes."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for earlier in [h for h in log.handlers if getattr(h, "fedshop_cli", False)]:
        log.removeHandler(earlier)  # main() called again in one process (tests): one handler, each line once
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s fedshop %(message)s", datefmt="%H:%M:%S"))
    handler.fedshop_cli = True
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        return args.func(args)
    except UserError as exc:
        print(f"fedshop: error: {one_line(str(exc))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
