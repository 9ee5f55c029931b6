"""fedshop ServerApp: aggregation of merchants' LoRA adapters (fedavg / ffa / svd), the privacy ledger, and the run
directory."""

from __future__ import annotations

import logging

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from server.continuation import record_origin, starting_adapter
from server.preflight import preflight
from server.report import write_report
from server.screening import TooFewMerchants
from server.secure import SecureGrid
from server.strategy import build_strategy
from shared.config import FedShopConfig, from_run_config
from shared.ledger import MERCHANT_LEVEL, history_from_ledger
from shared.locks import directory_lock
from shared.model import adapter_state, add_lora, load_adapter_state, load_base, read_adapter, save_adapter
from shared.rundir import CHECKPOINTS, RunDirectory

app = ServerApp()
log = logging.getLogger("fedshop")


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = from_run_config(context.run_config)
    if not log.handlers:  # under `flwr run` no fedshop CLI set one up: progress goes to the log Flower streams
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s fedshop %(message)s", datefmt="%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    with directory_lock(config.run_dir, "run directory"):  # re-entrant: `fedshop simulate` already holds it
        run(SecureGrid(grid, context, config.secure_max_weight) if config.secure_aggregation else grid, config)


def run(grid: Grid, config: FedShopConfig) -> None:
    run_dir = RunDirectory(config.run_dir)
    if config.resume_unfinished:  # the same run after a crash: its config, ledger and plan stay as they are
        point = run_dir.resume_point()
        offset, rounds, evaluated = point.offset, point.rounds, point.evaluated
        if offset > point.checkpoint:
            log.warning("round %d was under way when the run stopped: its ledger rows stay (those steps were taken) "
                        "and the rounds from checkpoints/round-%d are numbered %d-%d", offset, point.checkpoint,
                        offset + 1, offset + rounds)
    else:
        offset = run_dir.start(config)  # resuming in place: rounds number on after the last recorded one
        rounds, evaluated = config.num_rounds, config.resumes_in_place
    preflight(config)
    base, tokenizer, base_meta = load_base(config.base_dir)
    # B = 0: the starting adapter leaves the base unchanged; under ffa its A stays frozen for the whole run
    model = add_lora(base, config, seed=config.seed, tokenizer=tokenizer)
    if config.resume_unfinished:
        load_adapter_state(model, read_adapter(run_dir.path, f"{CHECKPOINTS}/round-{point.checkpoint}"))
        run_dir.record_resume(point)
        log.info("resuming %s from checkpoints/round-%d: rounds %d-%d, every merchant's privacy ledger carrying on",
                 run_dir.path, point.checkpoint, offset + 1, offset + rounds)
    elif config.continued_from:
        load_adapter_state(model, starting_adapter(config))
        if not config.resumes_in_place:  # in place, the ledger itself holds the history (nothing to carry over)
            record_origin(run_dir.path, config)
        log.info("continuing %s%s: its adapter is the starting point, its privacy ledger carries on",
                 config.continued_from, f" in place after round {offset}" if config.resumes_in_place else "")
    initial = ArrayRecord(adapter_state(model))

    ledger, strategy = build_strategy(run_dir, config, initial)
    ledger.secure = grid if isinstance(grid, SecureGrid) else None
    ledger.round_offset = offset
    if config.continued_from and ledger.central is not None:  # read before this run appends any row
        ledger.central.history = history_from_ledger(config.continued_from, MERCHANT_LEVEL)[1]
    if not evaluated:  # in place, the starting adapter is round `offset`'s, already evaluated
        ledger.evaluate_initial(grid, initial)

    def checkpoint(server_round: int, arrays: ArrayRecord) -> None:
        """Flower calls this with the global adapter after every round (after any central noise); it is kept as
        checkpoints/round-<N>/ (N counted on after `offset`), written like adapter/."""
        if server_round == 0 and offset in run_dir.complete_checkpoints():  # the starting adapter, already kept
            return  # (resuming past a round under way, round `offset` has none: the adapter it left is kept)
        load_adapter_state(model, ledger.final_arrays(arrays).to_torch_state_dict())
        save_adapter(model, run_dir.checkpoint_dir(server_round + offset))

    final = initial
    if rounds:
        try:
            result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds, train_config=ConfigRecord(),
                                    evaluate_config=ConfigRecord(), evaluate_fn=checkpoint,
                                    timeout=config.round_timeout)
        except TooFewMerchants as stop:
            # ledger and metrics hold the failed round's rows (append-only); its checkpoint was never written, so
            # checkpoints/round-<k-1> is the last complete one; no adapter/ (the run did not finish)
            ledger.recorder.stopped_record(stop.server_round, str(stop))
            write_report(run_dir, config, base_meta)
            log.error("%s", stop)
            return
        # no round aggregated (every merchant declined, say): Flower returns an empty record; nothing changed
        if result.arrays is not None and len(result.arrays):
            final = result.arrays
    final = ledger.final_arrays(final)  # ffa: the server's A re-attached
    load_adapter_state(model, final.to_torch_state_dict())
    save_adapter(model, run_dir.adapter_dir)
    write_report(run_dir, config, base_meta)
    log.info("run directory: %s", run_dir.path)
