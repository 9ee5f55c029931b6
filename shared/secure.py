"""What a merchant and the server agree on under secure aggregation (`secure-aggregation = true`; Flower's SecAgg+,
wired in `client.secure` and `server.secure`): the tensors' layout, the update each merchant masks, and the range
SecAgg+'s fixed-point encoding holds.

A merchant masks its *update* (what it trained minus what it received), in float64, for every tensor the server sent,
zero for one it keeps (ffa's frozen A). Updates are small, so they sit well inside `CLIPPING_RANGE`; one outside it is
refused before anything is sent rather than silently clipped by the quantiser.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

LAYOUT_KEY = "secure-layout"  # train config: JSON list of the tensor names, in the order of the masked vector
RETURNED_RECORD = "secure-returned"  # reply: JSON list of the tensors the merchant trained (the rest stay the server's)
CLIPPING_RANGE = 8.0  # |update| bound of SecAgg+'s fixed-point encoding (flwr's default)
QUANTISATION = 4194304  # SecAgg+'s levels over [-CLIPPING_RANGE, CLIPPING_RANGE] (flwr's default)


def masked_update(keys: Sequence[str], sent: Sequence[np.ndarray], trained: Mapping[str, np.ndarray] | None
                  ) -> list[np.ndarray]:
    """The vector a merchant hands to SecAgg+: per key, trained - sent (float64), zeros where it trained nothing."""
    updates = []
    for key, before in zip(keys, sent, strict=True):
        if trained is None or key not in trained:
            updates.append(np.zeros(before.shape, dtype=np.float64))
            continue
        # float64: SecAgg+ scales and quantises this to ~4M levels, below float32's resolution at that size
        update = np.asarray(trained[key], dtype=np.float64) - np.asarray(before, dtype=np.float64)
        if not np.all(np.isfinite(update)) or (update.size and np.abs(update).max() > CLIPPING_RANGE):
            raise ValueError(f"secure aggregation: the update of {key} is not finite or exceeds +-{CLIPPING_RANGE:g}, "
                             "the range SecAgg+ encodes; nothing is sent")
        updates.append(update)
    return updates


def apply_mean(keys: Sequence[str], sent: Sequence[np.ndarray], mean: Sequence[np.ndarray], returned: Sequence[str]
               ) -> dict[str, np.ndarray]:
    """sent + the unmasked mean update, for the tensors a merchant trained (in the dtype they were sent in)."""
    return {k: (np.asarray(sent[i], dtype=np.float64) + mean[i]).astype(sent[i].dtype)
            for i, k in enumerate(keys) if k in returned}
