"""`fedshop data inspect`: what an events file holds and what fedshop would make of it (markdown + a PNG)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shared.config import FedShopConfig
from shared.files import make_dir
from shared.sources import SourceReport, load_real
from shared.synthetic import PUBLIC_MERCHANT, SyntheticData

EVENTS_PER_SHOPPER_BINS = (1, 2, 5, 10, 20, 50, 100, 1000)


def _utc(ms: int) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def inspect_file(config: FedShopConfig, path: str, out_dir: str | Path) -> Path:
    """Load, clean and partition `path` as `config` says; write `data-report.md` and `data-report.png`."""
    out_dir = make_dir(out_dir, "the data report's folder (--out)")
    data, report = load_real(config, path)
    mix = category_mix(data)
    merchants = [*data.merchant_ids, PUBLIC_MERCHANT]
    _plot(data, mix, merchants, out_dir / "data-report.png")
    (out_dir / "data-report.md").write_text(markdown(config, path, data, report, mix), encoding="utf-8")
    return out_dir / "data-report.md"


def category_mix(data: SyntheticData) -> dict[str, np.ndarray]:
    """Per merchant (and the public split): the share of its events in each category token c0..c{K-1}."""
    num_categories = int(data.catalogue.category.max()) + 1
    codes = np.array([int(c[1:]) for c in data.events.category.tolist()], dtype=np.int64)
    out = {}
    for merchant in [*data.merchant_ids, PUBLIC_MERCHANT]:
        mask = data.events.merchant_id == merchant
        counts = np.bincount(codes[mask], minlength=num_categories).astype(float)
        out[merchant] = counts / max(1.0, counts.sum())
    return out


def markdown(config: FedShopConfig, path: str, data: SyntheticData, report: SourceReport,
             mix: dict[str, np.ndarray]) -> str:
    events, load = data.events, report.load
    sharing = ("shoppers may be at several merchants" if config.shoppers_at_several_merchants
               else "each shopper at one merchant")
    lines = [f"# fedshop data report — `{path}`", "",
             f"Format **{load.data_format}**" + (f", item file `{load.item_properties}`" if load.item_properties
                                                 else "") + f"; partition `{config.partition}`"
             + (f" (alpha {config.partition_alpha:g})" if config.partition in ("dirichlet", "size-skew") else "")
             + f", {sharing}; seed {config.seed}.", "",
             "## What the file holds", "",
             f"- rows read: {load.rows_read:,}; events loaded: {report.events_before_cleaning:,}"
             + (f" (views added beside purchases: {load.views_added:,})" if load.views_added else "")
             + (f" (purchases added for ratings >= {config.purchase_rating:g}: {load.purchases_added:,})"
                if load.purchases_added else ""),
             f"- after cleaning and merchant assignment: {len(events):,} events, "
             f"{len(set(events.user_id.tolist())):,} shoppers, {data.catalogue.num_items:,} items, "
             f"{len(report.category_names)} categories",
             "- events by type: " + ", ".join(f"{e} {int((events.event == e).sum()):,}"
                                                for e in ("view", "cart", "purchase")),
             f"- time span: {_utc(int(events.timestamp.min()))} to {_utc(int(events.timestamp.max()))} "
             f"({(int(events.timestamp.max()) - int(events.timestamp.min())) / 86_400_000:.1f} days)",
             "- ground truth: none (real data): the Bayes-oracle columns of run reports print n/a", "",
             "## What loading and cleaning drop", "", "| step | events | shoppers | items | detail |",
             "|---|---|---|---|---|"]
    for reason, count in sorted(load.skipped.items()):
        lines.append(f"| bad rows skipped: {reason} (on-bad-rows = skip) | {count:,} | | | |")
    for raw, count in sorted(load.dropped_by_event_map.items()):
        lines.append(f"| event {raw!r} mapped to drop | {count:,} | | | event-map |")
    for step in report.cleaning:
        lines.append(f"| {step.name} | {step.events_dropped:,} | {step.shoppers_dropped:,} | "
                     f"{step.items_dropped:,} | {step.detail} |")
    for reason, count in sorted(report.partition.dropped.items()):
        lines.append(f"| merchant assignment: {reason} | {count:,} | | | |")
    if load.skipped_examples:
        lines += ["", "First skipped rows:", ""] + [f"- `{m}`" for m in load.skipped_examples]
    lines += ["", "## Merchants", "", f"Public split (pretraining only): {report.partition.public_source}.", "",
              "| merchant | what it is | events | shoppers | items | views | purchases | purchases per view |",
              "|---|---|---|---|---|---|---|---|"]
    for merchant in [*data.merchant_ids, PUBLIC_MERCHANT]:
        mask = events.merchant_id == merchant
        views, buys = int((events.event[mask] == "view").sum()), int((events.event[mask] == "purchase").sum())
        lines.append(f"| {merchant} | {report.partition.names.get(merchant, 'platform public split')} | "
                     f"{int(mask.sum()):,} | {len(set(events.user_id[mask].tolist())):,} | "
                     f"{len(set(events.item_id[mask].tolist())):,} | {views:,} | {buys:,} | "
                     f"{buys / views if views else float('nan'):.3f} |")
    lines += ["", "## Category mix per merchant (share of events; heat map in data-report.png)", "",
              "| merchant | " + " | ".join(report.category_names) + " |",
              "|---|" + "---|" * len(report.category_names)]
    for merchant, shares in mix.items():
        lines.append(f"| {merchant} | " + " | ".join(f"{s:.2f}" for s in shares) + " |")
    lines += ["", "Category tokens (by frequency of items) and the file's category ids: "
              + ", ".join(f"{k} = {v}" for k, v in report.category_names.items()), ""]
    per_shopper = _events_per_shopper(data)
    lines += ["## Events per shopper (all merchants and the public split)", "",
              f"min {per_shopper.min()}, median {int(np.median(per_shopper))}, mean {per_shopper.mean():.1f}, "
              f"max {per_shopper.max()}", "", "| events | shoppers |", "|---|---|"]
    edges = [*EVENTS_PER_SHOPPER_BINS, np.inf]
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        count = int(((per_shopper >= low) & (per_shopper < high)).sum())
        label = f"{low}+" if np.isinf(high) else str(low) if high - low == 1 else f"{low}–{int(high) - 1}"
        lines.append(f"| {label} | {count:,} |")
    if report.renamed_items:
        lines += ["", f"{report.renamed_items} item id(s) were changed to be model tokens (whitespace -> '_', or "
                  "an 'item:' prefix where the id looked like a category or band token)."]
    return "\n".join(lines) + "\n"


def _events_per_shopper(data: SyntheticData) -> np.ndarray:
    key = np.char.add(data.events.merchant_id.astype(str), np.char.add("\x00", data.events.user_id.astype(str)))
    return np.unique(key, return_counts=True)[1]


def _plot(data: SyntheticData, mix: dict[str, np.ndarray], merchants: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (heat, sizes, spread) = plt.subplots(1, 3, figsize=(15, 4.5))
    matrix = np.stack([mix[m] for m in merchants])
    image = heat.imshow(matrix, aspect="auto", cmap="viridis")
    heat.set_yticks(range(len(merchants)), merchants)
    heat.set_xlabel("category token")
    heat.set_title("category mix per merchant (share of events)")
    fig.colorbar(image, ax=heat)
    counts = [int((data.events.merchant_id == m).sum()) for m in merchants]
    sizes.bar(merchants, counts)
    sizes.set_title("events per merchant")
    sizes.tick_params(axis="x", rotation=45)
    per_shopper = _events_per_shopper(data)
    spread.hist(per_shopper, bins=np.unique(np.geomspace(1, max(2, per_shopper.max()) + 1, 30).astype(int)))
    spread.set_xscale("log")
    spread.set_title("events per shopper")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
