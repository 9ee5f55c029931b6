"""One merchant's side of a message: its config, data, model and adapter (`setup`), and its evaluate handler.

`client.client_app` calls `evaluate_handler` here and the train handler in `client.training`. The two live apart so
that an evaluate message does not import Opacus: under the deployment engine every message runs in a fresh ClientApp
process, and an evaluation needs no DP-SGD (`python -X importtime -c "import client.merchant"` against
`client.training`). Only scalar metrics leave the merchant on an evaluation.

`--node-config target-epsilon=E` is the merchant's own budget (deployment): whatever the run config says, it trains
at most to min(E, target-epsilon), and refuses a run that asks it to train without DP-SGD.
"""

from __future__ import annotations

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict

from shared.baselines import fit_baselines
from shared.config import FedShopConfig, from_run_config
from shared.data import merchant_id_for_partition, served_merchant_data
from shared.errors import UserError
from shared.model import add_lora, load_adapter_state, load_base
from shared.modeling import evaluate, resolve_device


def setup(msg: Message, context: Context):
    """The merchant's config (within its own budget), partition, data, and model carrying the message's adapter."""
    config = within_own_budget(from_run_config(context.run_config), context.node_config)
    if "data-path" in context.node_config:  # deployment: the merchant's own data
        config = config.replace(data_path=str(context.node_config["data-path"]))
    torch.set_num_threads(config.torch_threads)
    partition_id = int(context.node_config["partition-id"])
    merchant_id = merchant_name(context)
    data = served_merchant_data(config, merchant_id)
    base, tokenizer, _ = load_base(config.base_dir)
    model = add_lora(base, config, tokenizer=tokenizer, facts=data.facts)
    load_adapter_state(model, msg.content["arrays"].to_torch_state_dict())
    model.to(resolve_device(config.device))  # the reply's tensors come back to the CPU (adapter_state)
    return config, partition_id, model, tokenizer, data


def merchant_name(context: Context) -> str:
    """The merchant's own name (node config `merchant`, deployment), else the one of its partition (simulation)."""
    named = context.node_config.get("merchant")
    return str(named) if named else merchant_id_for_partition(int(context.node_config["partition-id"]))


def within_own_budget(config: FedShopConfig, node_config: dict) -> FedShopConfig:
    """The run config capped by the merchant's own `target-epsilon` (node config), if it has one."""
    own = node_config.get("target-epsilon")
    if own is None:
        return config
    own = float(own)
    if not config.local_dp:
        raise UserError(f"this merchant trains only with DP-SGD within its own budget epsilon {own:g}; the run asks "
                        f"dp = {config.dp}, privacy-unit = {config.privacy_unit}")
    return config if config.target_epsilon <= own else config.replace(target_epsilon=own)


def evaluate_handler(msg: Message, context: Context) -> Message:
    config, partition_id, model, tokenizer, data = setup(msg, context)
    metrics = evaluate(model, tokenizer, data.test, data.facts, batch_size=config.eval_batch_size,
                       baselines=fit_baselines(data.train, data.facts, data.popularity), tasks=config.task_list,
                       precision=config.eval_precision)
    shoppers = len({e.user_id for e in data.test})
    record = MetricRecord({**metrics, "num-examples": shoppers, "partition-id": partition_id})
    return Message(content=RecordDict({"metrics": record}), reply_to=msg)

