"""fedshop ClientApp: one merchant (its train handler in `client.training`, its evaluate handler in `client.merchant`).

The handlers' modules (torch, transformers, PEFT, Opacus) are imported on a handler's first message, not with the
app: under the deployment engine every message runs in a fresh ClientApp process, the three SecAgg+ stages that
do not train (`client.secure`, secure-aggregation) need none of them, and an evaluation needs no Opacus.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client.outbox import record_outgoing
from client.secure import secure_rounds

app = ClientApp(mods=[record_outgoing, secure_rounds])


@app.train()
def train(msg: Message, context: Context) -> Message:
    from client.training import train as handler

    return handler(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    from client.merchant import evaluate_handler

    return evaluate_handler(msg, context)
