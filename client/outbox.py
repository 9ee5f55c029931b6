"""A record of everything a merchant sends: a ClientApp mod that describes each reply before it leaves.

With `--node-config message-log=FILE` every reply is described as one JSON line in FILE: the message type, and per
record its keys with, for arrays, dtype and shape, for metrics and configs the value's type (never the values of
arrays). Tests and auditors check these lines against the documented payload (only LoRA adapter tensors and scalar
metrics; no shopper id, item id, event or text). Without message-log the mod passes replies through untouched.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable


def describe(reply: Message) -> dict:
    """What a reply carries, as the merchant sends it."""
    content = reply.content
    out: dict = {"message-type": reply.metadata.message_type, "error": reply.has_error(), "arrays": {},
                 "metrics": {}, "configs": {}}
    if reply.has_error():
        return out
    for name, record in content.array_records.items():
        out["arrays"][name] = {key: {"dtype": array.dtype, "shape": list(array.shape)}
                               for key, array in record.items()}
    for name, record in content.metric_records.items():
        out["metrics"][name] = {key: type(value).__name__ for key, value in record.items()}
    for name, record in content.config_records.items():
        out["configs"][name] = {key: type(value).__name__ for key, value in record.items()}
    return out


def record_outgoing(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    reply = call_next(msg, context)
    target = context.node_config.get("message-log")
    if target:
        line = json.dumps({"merchant": str(context.node_config.get("merchant", "")), **describe(reply)}) + "\n"
        path = Path(str(target))
        path.parent.mkdir(parents=True, exist_ok=True)
        # one write on an O_APPEND descriptor: lines of successive ClientApp processes never interleave
        descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(descriptor, line.encode("utf-8"))
        finally:
            os.close(descriptor)
    return reply
