"""Deterministic synthetic shoppers at several merchants, with the truth they were drawn from.

The generative story (every constant is named below):
- a catalogue of items, each with a category, a price, a latent quality (seen publicly only through a noisy star
  rating) and a popularity weight;
- each merchant has its own category mix (Dirichlet, `merchant-skew`): merchants are non-IID;
- each shopper has a category preference drawn around their merchant's mix and visits in sessions over `days`;
  inside a session the next viewed item stays in the previous item's category with probability FOLLOW_PROB
  (item by popularity), otherwise it is a fresh draw (category by preference, item by popularity); a shopper never
  views the same item twice;
- every view goes down the funnel view -> cart -> purchase; P(purchase | view) is a logistic function of item
  quality, the item's price within its category and the shopper's affinity to the category.

Because the truth is known, `truth_purchase_prob` (per view) and `truth_next_rank` (rank of the viewed item under the
exact next-view distribution, ties counted against) give the Bayes-oracle scores a report shows beside the model.
The platform's public split (merchant "public") holds shoppers disjoint from every merchant's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.config import FedShopConfig
from shared.events import EventLog

PUBLIC_MERCHANT = "public"
FOLLOW_PROB = 0.75
PRICE_BANDS = 10
RATING_BANDS = 5
RATING_NOISE = 0.4  # a public star rating is the item's latent quality seen through this much noise
START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
# P(purchase | view) = sigmoid(BIAS + QUALITY * q - PRICE * price_z + AFFINITY * log-affinity)
PURCHASE_BIAS = -1.7
PURCHASE_QUALITY = 1.1
PURCHASE_PRICE = 0.9
PURCHASE_AFFINITY = 0.35
CART_GIVEN_PURCHASE_INTENT = 1.6  # P(cart | view) = min(1, 1.6 * P(purchase | view)); purchase only after a cart
MEAN_SESSIONS = 3.0
SHOPPER_CONCENTRATION = 8.0  # Dirichlet concentration of a shopper's preference around their merchant's mix
MEAN_EXTRA_VIEWS = 2.5
MIN_VIEWS = 5


@dataclass
class Catalogue:
    item_ids: np.ndarray  # str, "i0" ...
    category: np.ndarray  # int
    price: np.ndarray  # float
    price_band: np.ndarray  # int in [0, PRICE_BANDS): quantile band of the log price within its category (public)
    rating_band: np.ndarray  # int in [0, RATING_BANDS): quantile band of the public rating, a noisy view of quality
    quality: np.ndarray  # latent
    popularity: np.ndarray  # latent weight of fresh draws inside a category
    price_z: np.ndarray  # log price standardised within the category (what the purchase truth uses)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    def category_names(self) -> np.ndarray:
        return np.array([f"c{c}" for c in self.category], dtype=object)


@dataclass
class SyntheticData:
    catalogue: Catalogue
    events: EventLog  # merchants' private events and the public split, grouped by shopper in time order
    truth_purchase_prob: np.ndarray  # per event row; NaN for rows that are not views
    truth_next_rank: np.ndarray  # per event row; NaN for rows that are not views or are a shopper's first view
    merchant_ids: list[str]


def make_catalogue(num_items: int, num_categories: int, rng: np.random.Generator) -> Catalogue:
    category = np.arange(num_items) % num_categories
    rng.shuffle(category)
    base_log_price = rng.normal(3.5, 0.8, size=num_categories)
    log_price = base_log_price[category] + rng.normal(0.0, 0.45, size=num_items)
    price = np.round(np.exp(log_price), 2)
    price_z = np.zeros(num_items)
    price_band = np.zeros(num_items, dtype=np.int64)
    for c in range(num_categories):
        members = np.flatnonzero(category == c)
        values = log_price[members]
        price_z[members] = (values - values.mean()) / (values.std() + 1e-9)
        ranks = values.argsort().argsort()
        price_band[members] = (ranks * PRICE_BANDS) // len(members)
    quality = rng.normal(0.0, 1.0, size=num_items)
    rating = quality + rng.normal(0.0, RATING_NOISE, size=num_items)
    rating_band = (rating.argsort().argsort() * RATING_BANDS) // num_items
    popularity = np.exp(0.5 * quality + 0.6 * rng.normal(0.0, 1.0, size=num_items))
    catalogue = Catalogue(
        item_ids=np.array([f"i{i}" for i in range(num_items)], dtype=object),
        category=category, price=price, price_band=price_band, rating_band=rating_band, quality=quality,
        popularity=popularity, price_z=price_z,
    )
    return catalogue


def purchase_probability(catalogue: Catalogue, preference: np.ndarray, item: int) -> float:
    num_categories = len(preference)
    affinity = np.clip(np.log(preference[catalogue.category[item]] * num_categories + 1e-12), -3.0, 3.0)
    logit = (PURCHASE_BIAS + PURCHASE_QUALITY * catalogue.quality[item]
             - PURCHASE_PRICE * catalogue.price_z[item] + PURCHASE_AFFINITY * affinity)
    return float(1.0 / (1.0 + np.exp(-logit)))


def next_view_distribution(catalogue: Catalogue, preference: np.ndarray, previous: int | None,
                           seen: np.ndarray) -> np.ndarray:
    """Exact distribution of the next viewed item (0 for items already seen)."""
    category_weight = np.bincount(catalogue.category, weights=catalogue.popularity,
                                  minlength=len(preference))
    fresh = preference[catalogue.category] * catalogue.popularity / category_weight[catalogue.category]
    fresh = np.where(seen, 0.0, fresh)
    fresh = fresh / fresh.sum()
    if previous is None:
        return fresh
    same = (catalogue.category == catalogue.category[previous]) & ~seen
    if not same.any():
        return fresh
    follow = np.where(same, catalogue.popularity, 0.0)
    follow = follow / follow.sum()
    return FOLLOW_PROB * follow + (1.0 - FOLLOW_PROB) * fresh


def rank_with_ties_against(scores: np.ndarray, target: int) -> int:
    """1-based rank of `target`; every other item scoring >= the target counts as ahead of it."""
    others = np.delete(scores, target)
    return int(1 + np.count_nonzero(others >= scores[target]))


def generate(config: FedShopConfig) -> SyntheticData:
    """All merchants' events and the public split, fully determined by `config.seed` and the scale knobs."""
    rng = np.random.default_rng(config.seed)
    catalogue = make_catalogue(config.num_items, config.num_categories, rng)
    merchant_ids = [f"m{m}" for m in range(config.num_merchants)]
    rows: dict[str, list] = {k: [] for k in ("merchant_id", "user_id", "item_id", "event", "timestamp")}
    prices: list[float] = []
    categories: list[str] = []
    truth_p: list[float] = []
    truth_rank: list[float] = []
    groups = [(m, np.full(config.num_categories, 1.0 / config.num_categories) if m == PUBLIC_MERCHANT else
               rng.dirichlet(np.full(config.num_categories, config.merchant_skew)),
               config.public_shoppers if m == PUBLIC_MERCHANT else config.shoppers_per_merchant)
              for m in [*merchant_ids, PUBLIC_MERCHANT]]
    for merchant, mix, num_shoppers in groups:
        for u in range(num_shoppers):
            user = f"{merchant}-u{u}"
            preference = rng.dirichlet(SHOPPER_CONCENTRATION * mix + 0.05) + 1e-4  # no exact zeros
            preference /= preference.sum()
            sessions = _session_plan(rng, config.days)
            seen = np.zeros(catalogue.num_items, dtype=bool)
            previous: int | None = None
            for day_ms, num_views in sessions:
                clock = day_ms + int(rng.integers(8 * 3600_000, 22 * 3600_000))
                session_previous: int | None = None
                for _ in range(num_views):
                    if seen.all():  # a tiny catalogue can run out of unseen items
                        break
                    distribution = next_view_distribution(catalogue, preference, session_previous, seen)
                    item = int(rng.choice(catalogue.num_items, p=distribution))
                    rank = rank_with_ties_against(distribution, item) if previous is not None else np.nan
                    p_buy = purchase_probability(catalogue, preference, item)
                    seen[item] = True
                    previous = session_previous = item
                    clock += int(rng.integers(30_000, 300_000))
                    funnel = ["view"]
                    p_cart = min(1.0, CART_GIVEN_PURCHASE_INTENT * p_buy)
                    if rng.random() < p_cart:
                        funnel.append("cart")
                        if rng.random() < p_buy / p_cart:
                            funnel.append("purchase")
                    for step, event in enumerate(funnel):
                        if step:
                            clock += int(rng.integers(20_000, 240_000))
                        rows["merchant_id"].append(merchant)
                        rows["user_id"].append(user)
                        rows["item_id"].append(catalogue.item_ids[item])
                        rows["event"].append(event)
                        rows["timestamp"].append(clock)
                        prices.append(float(catalogue.price[item]))
                        categories.append(f"c{catalogue.category[item]}")
                        truth_p.append(p_buy if event == "view" else np.nan)
                        truth_rank.append(rank if event == "view" else np.nan)
    events = EventLog(
        merchant_id=np.array(rows["merchant_id"], dtype=object),
        user_id=np.array(rows["user_id"], dtype=object),
        item_id=np.array(rows["item_id"], dtype=object),
        event=np.array(rows["event"], dtype=object),
        timestamp=np.array(rows["timestamp"], dtype=np.int64),
        price=np.array(prices, dtype=np.float64),
        category=np.array(categories, dtype=object),
    )
    return SyntheticData(catalogue, events, np.array(truth_p), np.array(truth_rank), merchant_ids)


def _session_plan(rng: np.random.Generator, days: int) -> list[tuple[int, int]]:
    """(session start day in ms, views in the session), at least MIN_VIEWS views in all."""
    num_sessions = 1 + int(rng.poisson(MEAN_SESSIONS))
    session_days = np.sort(rng.choice(days, size=min(num_sessions, days), replace=False))
    views = 1 + rng.poisson(MEAN_EXTRA_VIEWS, size=len(session_days))
    if views.sum() < MIN_VIEWS:
        views[-1] += MIN_VIEWS - views.sum()
    return [(START_MS + int(d) * 86_400_000, int(v)) for d, v in zip(session_days, views, strict=True)]
