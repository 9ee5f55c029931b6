"""Which merchant a reply comes from.

In simulation (and a deployment without SuperNode authentication) the only name a merchant has is the partition-id
it reports in its metrics. With authentication, the SuperLink knows each SuperNode by the public key registered for
it and stamps every reply with that node's id (`msg.metadata.src_node_id`, not something the merchant writes):
`fedshop deploy --auth` records the node id the SuperLink gave each merchant's key in the `merchant-nodes` file, and
the ledger names merchants by it. A reported partition-id that disagrees is logged and ignored.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from flwr.app import Message

from shared.config import FedShopConfig
from shared.data import merchant_id_for_partition

log = logging.getLogger("fedshop")


def merchant_names(config: FedShopConfig) -> dict[int, str] | None:
    """node id -> merchant, from the `merchant-nodes` file; None when merchants are named by their partition-id."""
    if not config.merchant_nodes:
        return None
    return {int(node): str(name) for node, name in json.loads(Path(config.merchant_nodes).read_text()).items()}


def merchant_of(msg: Message, names: dict[int, str] | None) -> str:
    """The merchant that sent `msg` (a reply carrying a MetricRecord "metrics" with its partition-id)."""
    reported = merchant_id_for_partition(int(msg.content["metrics"]["partition-id"]))
    if names is None:
        return reported
    node = msg.metadata.src_node_id
    merchant = names.get(node)
    if merchant is None:  # cannot happen with authentication on: the SuperLink admits registered keys only
        log.warning("reply from node %s, which no registered merchant key belongs to", node)
        return f"node-{node}"
    if merchant != reported:
        log.warning("node %s is registered as %s but reports partition %s; the ledger names it %s", node, merchant,
                    reported, merchant)
    return merchant
