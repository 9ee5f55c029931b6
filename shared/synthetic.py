"""Deterministic synthetic shoppers at several merchants, with the truth they were drawn from.

The generative story (every constant is named below):
- a catalogue of items, each with a category, a price, a latent quality (seen publicly only through a noisy star
  rating) and a popularity weight;
- each merchant has its own category mix (Dirichlet, `merchant-skew`): merchants are non-IID;
- each shopper has a category preference drawn around their merchant's mix and visits in sessions over `days`;
  inside a session the next viewed item stays in the previous item's category with probability FOLLOW_PROB
  (item by popularity), otherwise it is a fresh draw (category by preference, item by popularity); a shopper never
  views the same item twice; with `item-links` = L > 0 each item also has LINKS_PER_ITEM linked items of any
  category (drawn uniformly: co-viewed products, a phone and its case), and with probability L the next view is one
  of the previous item's unseen links instead: item-to-item order that only a model of which item came last catches,
  as in real logs;
- every view goes down the funnel view -> cart -> purchase; P(purchase | view) is a logistic function of item
  quality, the item's price within its category, the shopper's affinity to the category, and the price the merchant
  offers on this view: each view draws a price level from PRICE_LEVELS (a randomised promotion, so the price response
  is identifiable) and the shopper's own price sensitivity scales its effect;
- sessions follow a renewal process with a churn hazard: the first starts in the first FIRST_SESSION_SPAN of the
  window; after each session the shopper leaves for good with a probability that is higher when the session ended
  without a purchase (once they have MIN_VIEWS views); otherwise the next session starts MIN_GAP_DAYS plus an
  exponential gap (the shopper's own mean) after the session's last event.

Because the truth is known, `truth_purchase_prob` (per view), `truth_price_curve` (per view: P(purchase) at every
price level), `truth_next_rank` (rank of the viewed item under the exact next-view distribution, ties counted
against) and `shopper_truth` (what churn's Bayes oracle needs) give the oracle scores a report shows beside the model.
The platform's public split (merchant "public") holds shoppers disjoint from every merchant's; with `new-items` = N
the last N catalogue items never appear in it (launched after the base was pretrained), while merchants' shoppers
view them like any other item (the merchants' events do not depend on N: the public split is drawn last, from a
random stream of its own, so it does not depend on the merchants either).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from shared.config import FedShopConfig
from shared.events import EventLog
from shared.tasks import PRICE_LEVELS

PUBLIC_MERCHANT = "public"
FOLLOW_PROB = 0.75
LINKS_PER_ITEM = 3  # linked items of each item (item-links > 0)
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
SHOPPER_CONCENTRATION = 8.0  # Dirichlet concentration of a shopper's preference around their merchant's mix
# views in a session: 1 + Poisson(views-per-session - 1) (config key; 3.5 by default)
MIN_VIEWS = 5  # a shopper does not leave before this many views
# price response: logit -= sensitivity * log(level); sensitivity = PRICE_SENSITIVITY * lognormal(PRICE_SENSITIVITY_SD)
PRICE_SENSITIVITY = 3.0
PRICE_SENSITIVITY_SD = 0.5
# sessions and churn
FIRST_SESSION_SPAN = 0.4  # the first session starts in this share of the window
MIN_GAP_DAYS = 0.5
# a shopper's mean exponential gap = mean-gap-days (config key; 6 by default) * lognormal(MEAN_GAP_SD)
MEAN_GAP_SD = 0.6
# P(leave after a session) = sigmoid(leave-bias + LEAVE_NO_PURCHASE * [no purchase] + offset); leave-bias is a
# config key (-2 by default)
LEAVE_NO_PURCHASE = 1.5
LEAVE_SHOPPER_SD = 0.7  # sd of a shopper's own offset
# drift since the public split was collected (config key `drift` scales both; 0 = the world did not change)
DRIFT_POPULARITY = 1.0  # sd of the change of each item's log popularity
DRIFT_QUALITY = 1.0  # sd of the change of each item's latent quality (its public rating still shows the old one)
DRIFT_LEAVE_NO_PURCHASE = 1.0  # merchants' shoppers now leave more readily after a session without a purchase


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
    links: np.ndarray | None = None  # (items, LINKS_PER_ITEM) linked item indices (latent; `item-links` > 0 only)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    def category_names(self) -> np.ndarray:
        return np.array([f"c{c}" for c in self.category], dtype=object)


@dataclass(frozen=True)
class ShopperTruth:
    """What churn's Bayes oracle needs: the shopper's gap law and leave probabilities."""

    mean_gap_days: float
    leave_if_bought: float
    leave_if_not: float

    def return_probability(self, views_so_far: int, bought_in_session: bool, days_since_last: float,
                           horizon_days: float) -> float:
        """P(an event within `horizon_days`), `days_since_last` days after the end of the last session."""
        stay = 1.0 if views_so_far < MIN_VIEWS else 1.0 - (self.leave_if_bought if bought_in_session
                                                           else self.leave_if_not)
        survive_now, survive_later = self._no_return(days_since_last), self._no_return(days_since_last + horizon_days)
        stay_now = stay * survive_now / (stay * survive_now + 1.0 - stay)  # has not come back yet: maybe left
        return float(stay_now * (1.0 - survive_later / survive_now))

    def _no_return(self, days: float) -> float:
        """P(gap > days | the shopper stays)."""
        return 1.0 if days <= MIN_GAP_DAYS else float(np.exp(-(days - MIN_GAP_DAYS) / self.mean_gap_days))


@dataclass
class SyntheticData:
    catalogue: Catalogue
    events: EventLog  # merchants' private events and the public split, grouped by shopper in time order
    truth_purchase_prob: np.ndarray  # per event row; NaN for rows that are not views
    truth_next_rank: np.ndarray  # per event row; NaN for rows that are not views or are a shopper's first view
    merchant_ids: list[str]
    price_level: np.ndarray | None = None  # per event row: offered price / list price (None: all 1.0)
    truth_price_curve: np.ndarray | None = None  # (rows, levels): P(purchase) at each PRICE_LEVELS; NaN if not a view
    shopper_truth: dict[str, ShopperTruth] | None = None
    window_end_ms: int | None = None  # the end of the observation window (churn labels are censored after it)


def make_catalogue(num_items: int, num_categories: int, rng: np.random.Generator,
                   popularity_exponent: float = 0.0) -> Catalogue:
    """Items with their public facts and latent truth. Popularity is lognormal (`popularity_exponent` 0) or, above
    0, a power law over the same order: the item ranked r-th (1-based) by that lognormal score weighs r^-exponent,
    so a few items take most views and the catalogue has a long tail, as in real logs."""
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
    if popularity_exponent > 0:
        rank = (-popularity).argsort().argsort() + 1.0
        popularity = rank ** -popularity_exponent
    catalogue = Catalogue(
        item_ids=np.array([f"i{i}" for i in range(num_items)], dtype=object),
        category=category, price=price, price_band=price_band, rating_band=rating_band, quality=quality,
        popularity=popularity, price_z=price_z,
    )
    return catalogue


LOG_PRICE_LEVELS = np.log(np.array(PRICE_LEVELS))


def purchase_curve(catalogue: Catalogue, preference: np.ndarray, item: int,
                   sensitivity: float = PRICE_SENSITIVITY) -> np.ndarray:
    """P(purchase | view) of `item` at every PRICE_LEVELS entry, for a shopper with this preference and sensitivity."""
    num_categories = len(preference)
    affinity = np.clip(np.log(preference[catalogue.category[item]] * num_categories + 1e-12), -3.0, 3.0)
    logit = (PURCHASE_BIAS + PURCHASE_QUALITY * catalogue.quality[item]
             - PURCHASE_PRICE * catalogue.price_z[item] + PURCHASE_AFFINITY * affinity
             - sensitivity * LOG_PRICE_LEVELS)
    return 1.0 / (1.0 + np.exp(-logit))


def _sigmoid(x: float) -> float:
    return float(1.0 / (1.0 + np.exp(-x)))


def next_view_distribution(catalogue: Catalogue, preference: np.ndarray, previous: int | None,
                           seen: np.ndarray, item_links: float = 0.0) -> np.ndarray:
    """Exact distribution of the next viewed item (0 for items already seen)."""
    within = _within_categories(catalogue, preference, previous, seen)
    if previous is None or catalogue.links is None or item_links == 0:
        return within
    linked = np.zeros(catalogue.num_items, dtype=bool)
    linked[catalogue.links[previous]] = True
    linked &= ~seen
    if not linked.any():
        return within
    return item_links * linked / linked.sum() + (1.0 - item_links) * within


def _within_categories(catalogue: Catalogue, preference: np.ndarray, previous: int | None,
                       seen: np.ndarray) -> np.ndarray:
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


def with_links(catalogue: Catalogue, item_links: float, seed: int) -> Catalogue:
    """The catalogue with each item's LINKS_PER_ITEM linked items (never itself), drawn uniformly over the catalogue
    from a stream of their own (the other draws do not depend on `item_links`); unchanged at 0."""
    if item_links == 0:
        return catalogue
    rng = np.random.default_rng([seed, 0x11C5])
    n = catalogue.num_items
    links = np.stack([rng.choice(n - 1, size=LINKS_PER_ITEM, replace=False) for _ in range(n)])
    return dataclasses.replace(catalogue, links=links + (links >= np.arange(n)[:, None]))


def rank_with_ties_against(scores: np.ndarray, target: int) -> int:
    """1-based rank of `target`; every other item scoring >= the target counts as ahead of it."""
    others = np.delete(scores, target)
    return int(1 + np.count_nonzero(others >= scores[target]))


def drifted(catalogue: Catalogue, drift: float, seed: int) -> Catalogue:
    """The catalogue as the merchants' shoppers meet it, `drift` after the public split was collected: every item's
    popularity and latent quality moved (the same change at every merchant: a platform-wide trend and product
    revisions). Public facts (category, price band, rating band) are those of the public split's time."""
    if drift == 0:
        return catalogue
    rng = np.random.default_rng([seed, 0xD81F7])  # its own stream: the other draws do not depend on drift
    trend = rng.normal(0.0, 1.0, size=catalogue.num_items)
    revision = rng.normal(0.0, 1.0, size=catalogue.num_items)
    return dataclasses.replace(catalogue, popularity=catalogue.popularity * np.exp(drift * DRIFT_POPULARITY * trend),
                               quality=catalogue.quality + drift * DRIFT_QUALITY * revision)


def generate(config: FedShopConfig) -> SyntheticData:
    """All merchants' events and the public split, fully determined by `config.seed` and the scale knobs.

    With `drift` > 0 the merchants' shoppers meet the drifted catalogue (`drifted`), the public split the old one,
    and they leave more readily after a session without a purchase (DRIFT_LEAVE_NO_PURCHASE): what merchants hold
    that the base cannot know, shared by every merchant."""
    rng = np.random.default_rng(config.seed)
    public_catalogue = make_catalogue(config.num_items, config.num_categories, rng, config.popularity_exponent)
    public_catalogue = with_links(public_catalogue, config.item_links, config.seed)
    catalogue = drifted(public_catalogue, config.drift, config.seed)
    merchant_ids = [f"m{m}" for m in range(config.num_merchants)]
    rows: dict[str, list] = {k: [] for k in ("merchant_id", "user_id", "item_id", "event", "timestamp")}
    prices: list[float] = []
    categories: list[str] = []
    truth_p: list[float] = []
    truth_rank: list[float] = []
    levels: list[float] = []
    curves: list[np.ndarray] = []
    shoppers: dict[str, ShopperTruth] = {}
    no_curve = np.full(len(PRICE_LEVELS), np.nan)
    window_end = START_MS + config.days * 86_400_000
    groups = [(m, np.full(config.num_categories, 1.0 / config.num_categories) if m == PUBLIC_MERCHANT else
               rng.dirichlet(np.full(config.num_categories, config.merchant_skew)),
               config.public_shoppers if m == PUBLIC_MERCHANT else config.shoppers_per_merchant)
              for m in [*merchant_ids, PUBLIC_MERCHANT]]
    for merchant, mix, num_shoppers in groups:
        world = public_catalogue if merchant == PUBLIC_MERCHANT else catalogue
        if merchant == PUBLIC_MERCHANT:  # its own stream: the public split (so the base) is the same whatever the
            rng = np.random.default_rng([config.seed, 0x9AB11C])  # merchants' number, size or drift
        for u in range(num_shoppers):
            user = f"{merchant}-u{u}"
            preference = rng.dirichlet(SHOPPER_CONCENTRATION * mix + 0.05) + 1e-4  # no exact zeros
            preference /= preference.sum()
            sensitivity = PRICE_SENSITIVITY * float(np.exp(rng.normal(0.0, PRICE_SENSITIVITY_SD)))
            offset = rng.normal(0.0, LEAVE_SHOPPER_SD)
            no_purchase = LEAVE_NO_PURCHASE + (0.0 if merchant == PUBLIC_MERCHANT else
                                               config.drift * DRIFT_LEAVE_NO_PURCHASE)
            truth = ShopperTruth(mean_gap_days=config.mean_gap_days * float(np.exp(rng.normal(0.0, MEAN_GAP_SD))),
                                 leave_if_bought=_sigmoid(config.leave_bias + offset),
                                 leave_if_not=_sigmoid(config.leave_bias + no_purchase + offset))
            shoppers[user] = truth
            seen = np.zeros(catalogue.num_items, dtype=bool)
            if merchant == PUBLIC_MERCHANT and config.new_items:
                seen[catalogue.num_items - config.new_items:] = True  # launched after the public split: never viewed
            previous: int | None = None
            clock = START_MS + int(rng.uniform(0.0, FIRST_SESSION_SPAN * config.days) * 86_400_000)
            views_so_far = 0
            while clock < window_end and not seen.all():  # a tiny catalogue can run out of unseen items
                session_previous: int | None = None
                bought_in_session = False
                for _ in range(1 + int(rng.poisson(config.views_per_session - 1.0))):
                    if seen.all():
                        break
                    distribution = next_view_distribution(world, preference, session_previous, seen,
                                                          config.item_links)
                    item = int(rng.choice(catalogue.num_items, p=distribution))
                    rank = rank_with_ties_against(distribution, item) if previous is not None else np.nan
                    level = PRICE_LEVELS[int(rng.integers(len(PRICE_LEVELS)))]
                    curve = purchase_curve(world, preference, item, sensitivity)
                    p_buy = float(curve[PRICE_LEVELS.index(level)])
                    seen[item] = True
                    previous = session_previous = item
                    views_so_far += 1
                    if views_so_far > 1:
                        clock += int(rng.integers(30_000, 300_000))
                    funnel = ["view"]
                    p_cart = min(1.0, CART_GIVEN_PURCHASE_INTENT * p_buy)
                    if rng.random() < p_cart:
                        funnel.append("cart")
                        if rng.random() < p_buy / p_cart:
                            funnel.append("purchase")
                            bought_in_session = True
                    for step, event in enumerate(funnel):
                        if step:
                            clock += int(rng.integers(20_000, 240_000))
                        rows["merchant_id"].append(merchant)
                        rows["user_id"].append(user)
                        rows["item_id"].append(catalogue.item_ids[item])
                        rows["event"].append(event)
                        rows["timestamp"].append(clock)
                        prices.append(round(float(catalogue.price[item]) * level, 2))
                        categories.append(f"c{catalogue.category[item]}")
                        levels.append(level)
                        truth_p.append(p_buy if event == "view" else np.nan)
                        truth_rank.append(rank if event == "view" else np.nan)
                        curves.append(curve if event == "view" else no_curve)
                leave = truth.leave_if_bought if bought_in_session else truth.leave_if_not
                if views_so_far >= MIN_VIEWS and rng.random() < leave:
                    break
                gap_days = MIN_GAP_DAYS + rng.exponential(truth.mean_gap_days)
                clock += int(gap_days * 86_400_000)
    events = EventLog(
        merchant_id=np.array(rows["merchant_id"], dtype=object),
        user_id=np.array(rows["user_id"], dtype=object),
        item_id=np.array(rows["item_id"], dtype=object),
        event=np.array(rows["event"], dtype=object),
        timestamp=np.array(rows["timestamp"], dtype=np.int64),
        price=np.array(prices, dtype=np.float64),
        category=np.array(categories, dtype=object),
    )
    return SyntheticData(catalogue=catalogue, events=events, truth_purchase_prob=np.array(truth_p),
                         truth_next_rank=np.array(truth_rank), merchant_ids=merchant_ids,
                         price_level=np.array(levels),
                         truth_price_curve=np.array(curves).reshape(-1, len(PRICE_LEVELS)),
                         shopper_truth=shoppers, window_end_ms=window_end)
