"""What must hold before a run trains anything, in one place for `fedshop simulate` and the ServerApp (which `flwr
run .` starts without the CLI): the base directory exists (pretrained on the public split first if it does not),
its data and tokenizer match this config, and an `init-adapter` export is intact and fits this config."""

from __future__ import annotations

import logging
from pathlib import Path

from shared.config import FedShopConfig

log = logging.getLogger("fedshop")


def preflight(config: FedShopConfig) -> dict:
    """Check (and, for a missing base, prepare) what this run starts from; returns the base's metadata. Raises a
    UserError naming what does not fit."""
    from shared.data import check_base_matches
    from shared.model import base_exists, check_base_files, load_tokenizer, read_base_meta
    from shared.pretrain import pretrain

    if not base_exists(config.base_dir):
        log.info("base directory %s does not exist yet: pretraining it on the public split first", config.base_dir)
        pretrain(config)
    base_meta = read_base_meta(config.base_dir)
    check_base_files(Path(config.base_dir))  # a damaged file is named here, not in a merchant's traceback
    load_tokenizer(Path(config.base_dir))
    check_base_matches(base_meta, config)
    if config.init_adapter:
        from server.continuation import check_init_adapter

        check_init_adapter(config)
    return base_meta
