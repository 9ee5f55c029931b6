import numpy as np

from shared.config import FedShopConfig
from shared.data import merchant_data
from shared.synthetic import PUBLIC_MERCHANT, generate
from shared.tasks import LAST_MARK

CONFIG = FedShopConfig(num_merchants=3, shoppers_per_merchant=60, public_shoppers=60, num_items=80,
                       num_categories=8, merchant_skew=0.3)


def test_generator_is_deterministic_per_seed():
    a, b, c = generate(CONFIG), generate(CONFIG), generate(CONFIG.replace(seed=8))
    assert (a.events.item_id == b.events.item_id).all() and (a.events.timestamp == b.events.timestamp).all()
    assert len(a.events) != len(c.events) or (a.events.item_id != c.events.item_id).any()


def test_merchants_are_non_iid_and_public_shoppers_are_disjoint():
    data = generate(CONFIG)
    mixes = []
    for merchant in data.merchant_ids:
        cats = data.events.category[data.events.merchant_id == merchant]
        mixes.append(np.array([(cats == f"c{c}").mean() for c in range(CONFIG.num_categories)]))
    # total-variation distance between merchants' category mixes is large
    assert min(0.5 * np.abs(mixes[i] - mixes[j]).sum() for i in range(3) for j in range(i + 1, 3)) > 0.2
    public = set(data.events.user_id[data.events.merchant_id == PUBLIC_MERCHANT])
    private = set(data.events.user_id[data.events.merchant_id != PUBLIC_MERCHANT])
    assert public and private and not public & private


def test_funnel_order_and_truth_probabilities_match_outcomes():
    data = generate(CONFIG)
    events = data.events
    views = events.event == "view"
    p = data.truth_purchase_prob
    assert np.isnan(p[~views]).all() and ((p[views] > 0) & (p[views] < 1)).all()
    # a purchase follows a cart of the same item by the same shopper, later in time
    for row in np.flatnonzero(events.event == "purchase")[:200]:
        assert events.event[row - 1] == "cart" and events.item_id[row - 1] == events.item_id[row]
        assert events.timestamp[row - 1] < events.timestamp[row]
    # the drawn outcomes agree with the probabilities they were drawn from (calibration in aggregate)
    bought = {(u, i) for u, i, e in zip(events.user_id, events.item_id, events.event) if e == "purchase"}
    outcome = np.array([(u, i) in bought for u, i in zip(events.user_id[views], events.item_id[views])])
    assert abs(outcome.mean() - p[views].mean()) < 0.03


def test_leave_last_out_split_never_shows_the_future():
    data = generate(CONFIG)
    merchant = merchant_data(CONFIG, "m1", data)
    rows = data.events.merchant_id == "m1"
    view_time = {(u, i): t for u, i, t, e in zip(data.events.user_id[rows], data.events.item_id[rows],
                                                  data.events.timestamp[rows], data.events.event[rows]) if e == "view"}
    latest_train = {}
    for example in [e for e in merchant.train if e.task != "churn"]:
        latest_train[example.user_id] = max(latest_train.get(example.user_id, 0),
                                            view_time[(example.user_id, example.target if example.task == "next-item"
                                                       else example.source.split(" cand ")[1].split()[0])])
    for example in [e for e in merchant.test + merchant.valid if e.task != "churn"]:
        target_item = merchant.facts.item_ids[example.label] if example.task == "next-item" else \
            example.source.split(" cand ")[1].split()[0]
        target_time = view_time[(example.user_id, target_item)]
        words = example.source.split(" cand ")[0].split()[1:]
        assert words[-3] == LAST_MARK  # the most recent item is marked
        history = [w for w in words if w != LAST_MARK][::2]
        assert all(view_time[(example.user_id, item)] < target_time for item in history)
        assert latest_train.get(example.user_id, 0) < target_time  # every train target precedes valid/test
        if example.task == "next-item":
            assert example.label not in example.seen
    # every shopper contributes exactly one test example per task
    users = {e.user_id for e in merchant.test}
    assert len(merchant.test) == 3 * len(users)  # intent, next-item, churn


def test_drift_changes_what_merchants_see_and_leaves_the_public_split_as_it_was():
    # Prepare: the same world without and with drift
    still, moved = generate(CONFIG), generate(CONFIG.replace(drift=1.0))
    public_still = still.events.merchant_id == PUBLIC_MERCHANT
    public_moved = moved.events.merchant_id == PUBLIC_MERCHANT
    # Assert: the public split (what the base learns from) is identical; merchants' events are not
    assert (still.events.item_id[public_still] == moved.events.item_id[public_moved]).all()
    assert (still.events.timestamp[public_still] == moved.events.timestamp[public_moved]).all()
    merchants_still = still.events.item_id[~public_still]
    merchants_moved = moved.events.item_id[~public_moved]
    assert len(merchants_still) != len(merchants_moved) or (merchants_still != merchants_moved).any()
    # the public facts stay those of the public split's time; the latent values moved
    assert (still.catalogue.rating_band == moved.catalogue.rating_band).all()
    assert (still.catalogue.price_band == moved.catalogue.price_band).all()
    assert np.corrcoef(np.log(still.catalogue.popularity), np.log(moved.catalogue.popularity))[0, 1] < 0.9
    assert np.abs(still.catalogue.quality - moved.catalogue.quality).mean() > 0.5


def test_drifted_views_follow_the_drifted_popularity():
    # Prepare: a strong drift and many merchant shoppers
    config = CONFIG.replace(drift=1.5, shoppers_per_merchant=150)
    data = generate(config)
    views = data.events.event == "view"
    merchants = views & (data.events.merchant_id != PUBLIC_MERCHANT)
    public = views & (data.events.merchant_id == PUBLIC_MERCHANT)
    index = {item: i for i, item in enumerate(data.catalogue.item_ids)}

    def counts(mask):
        return np.bincount([index[i] for i in data.events.item_id[mask]], minlength=config.num_items) + 1.0

    still = generate(config.replace(drift=0.0)).catalogue.popularity
    # Assert: merchants' view counts rank-correlate with the drifted popularity more than with the old one, and the
    # public split's the other way round
    def spearman(a, b):
        return np.corrcoef(a.argsort().argsort(), b.argsort().argsort())[0, 1]

    assert spearman(counts(merchants), data.catalogue.popularity) > spearman(counts(merchants), still) + 0.1
    assert spearman(counts(public), still) > spearman(counts(public), data.catalogue.popularity) + 0.1


def _views_per_item(data) -> np.ndarray:
    """Each viewed item's number of views, most viewed first."""
    return np.sort(np.unique(data.events.item_id[data.events.event == "view"], return_counts=True)[1])[::-1]


def _events_per_shopper(data) -> np.ndarray:
    private = data.events.merchant_id != PUBLIC_MERCHANT
    return np.unique(data.events.user_id[private], return_counts=True)[1]


def test_power_law_popularity_keeps_the_lognormal_order_and_concentrates_views():
    lognormal = generate(CONFIG.replace(num_items=400))
    zipf = generate(CONFIG.replace(num_items=400, popularity_exponent=1.2))
    a, b = lognormal.catalogue.popularity, zipf.catalogue.popularity
    assert (a.argsort() == b.argsort()).all()  # the same items are popular; only the law's shape changes
    assert np.allclose(np.sort(b)[::-1], np.arange(1, 401) ** -1.2)
    # the 4 most popular items (1 %) take more of the views under the power law
    def top_share(data):
        counts = _views_per_item(data)
        return counts[:4].sum() / counts.sum()
    assert top_share(zipf) > 2 * top_share(lognormal)


def test_session_and_churn_knobs_lengthen_histories():
    short = np.median(_events_per_shopper(generate(CONFIG)))
    longer = np.median(_events_per_shopper(generate(CONFIG.replace(views_per_session=5.0, leave_bias=-3.5,
                                                                   mean_gap_days=3.0))))
    assert longer > 1.8 * short


def test_real_shaped_preset_has_the_shape_it_promises():
    from helpers import ROOT

    from shared.config import load_config
    config = load_config(ROOT / "configs/real-shaped.toml")
    data = generate(config)
    per_shopper = _events_per_shopper(data)
    public = len(set(data.events.user_id[data.events.merchant_id == PUBLIC_MERCHANT]))
    views = _views_per_item(data)
    assert np.median(per_shopper) >= 50
    assert len(views) >= 1500
    assert public / (public + len(per_shopper)) <= 0.2
    assert views[:len(views) // 100].sum() / views.sum() >= 0.10  # the head: 1 % of items, >= 10 % of views


def test_item_links_draw_three_other_items_each_and_leave_a_world_without_them_as_it_was():
    from shared.synthetic import LINKS_PER_ITEM, make_catalogue, with_links

    catalogue = make_catalogue(50, 5, np.random.default_rng(0))
    assert with_links(catalogue, 0.0, seed=7) is catalogue and catalogue.links is None
    links = with_links(catalogue, 0.3, seed=7).links
    assert links.shape == (50, LINKS_PER_ITEM) == (50, 3)  # the config key's help says 3
    assert all(len(set(row)) == LINKS_PER_ITEM and i not in row for i, row in enumerate(links.tolist()))
    assert (links == with_links(catalogue, 0.9, seed=7).links).all()  # drawn once per seed, whatever the share
    # the links' own stream: every other draw is the world without links, views aside
    plain, linked = generate(CONFIG), generate(CONFIG.replace(item_links=0.5))
    assert (plain.catalogue.popularity == linked.catalogue.popularity).all() and plain.catalogue.links is None
    assert (plain.catalogue.category == linked.catalogue.category).all()


def test_next_view_distribution_puts_the_link_share_on_the_previous_items_unseen_links():
    from shared.synthetic import make_catalogue, next_view_distribution, with_links

    catalogue = with_links(make_catalogue(60, 6, np.random.default_rng(1)), 0.4, seed=3)
    preference = np.full(6, 1 / 6)
    seen = np.zeros(60, dtype=bool)
    previous = 5
    seen[[previous, catalogue.links[previous][0]]] = True  # one of its links already viewed
    without = next_view_distribution(catalogue, preference, previous, seen)
    with_them = next_view_distribution(catalogue, preference, previous, seen, item_links=0.4)
    unseen_links = catalogue.links[previous][1:]
    assert np.isclose(with_them.sum(), 1.0) and (with_them[seen] == 0).all()
    assert np.allclose(with_them[unseen_links], 0.4 / 2 + 0.6 * without[unseen_links])
    others = np.setdiff1d(np.arange(60), unseen_links)
    assert np.allclose(with_them[others], 0.6 * without[others])
    # no previous item, or every link seen: the categories' distribution alone
    assert np.allclose(next_view_distribution(catalogue, preference, None, seen, 0.4),
                       next_view_distribution(catalogue, preference, None, seen))
    seen[catalogue.links[previous]] = True
    assert np.allclose(next_view_distribution(catalogue, preference, previous, seen, 0.4),
                       next_view_distribution(catalogue, preference, previous, seen))


def test_with_item_links_shoppers_view_a_link_of_the_previous_item_about_that_often():
    data = generate(CONFIG.replace(item_links=0.5, shoppers_per_merchant=100))
    index = {item: i for i, item in enumerate(data.catalogue.item_ids)}
    views = data.events.event == "view"
    users, items = data.events.user_id[views], [index[i] for i in data.events.item_id[views]]
    follows = [items[k] in data.catalogue.links[items[k - 1]] for k in range(1, len(items)) if users[k] == users[k - 1]]
    # 0.5 where a link is left unseen, plus the small chance of a link by category or popularity; across sessions too
    assert 0.3 < np.mean(follows) < 0.6, np.mean(follows)
    plain = generate(CONFIG.replace(shoppers_per_merchant=100))
    plain_items = [index[i] for i in plain.events.item_id[plain.events.event == "view"]]
    plain_users = plain.events.user_id[plain.events.event == "view"]
    links = data.catalogue.links  # the same links, never followed on purpose in the plain world
    chance = [plain_items[k] in links[plain_items[k - 1]] for k in range(1, len(plain_items))
              if plain_users[k] == plain_users[k - 1]]
    assert np.mean(chance) < 0.1, np.mean(chance)
