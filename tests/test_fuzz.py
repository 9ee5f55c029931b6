"""Fuzzing beyond 300 bytes (issue 15, "runs that never crash"): whatever a user hands fedshop (a config file, `--set`
overrides, a command line, an event log of megabytes) comes back as a correct result or as fedshop's own error
(`shared.errors.UserError` and its subclasses, printed by the CLI as one line with exit code 2), never as a traceback.

Hypothesis draws config keys from the config's own field specs (mixed with junk) and command lines from the real
argparse parser (its subcommands and options, introspected). Every path a command line names lies in a fresh
temporary folder. Commands that would start real work (pretraining, a simulation, a deployment, a sweep's runs,
generating synthetic data) reach a tripwire instead: the heavy function is replaced by one that raises `_Tripwire`, so
everything the CLI checks before that work runs for real, and reaching the tripwire means the invocation was valid.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import re
import tempfile
import time
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from shared.config import (
    FIELDS,
    ConfigError,
    FedShopConfig,
    from_mapping,
    from_run_config,
    load_config,
    to_toml,
)
from shared.errors import UserError
from shared.events import DataError
from shared.loaders import FORMATS, LoadOptions, load_events

# --- values: wrong types, extremes, junk ------------------------------------------------------------------------------

def _weighted(*choices: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """One of the strategies, each drawn with its weight (st.one_of weighs the branches of nested one_ofs)."""
    return st.sampled_from([s for weight, s in choices for _ in range(weight)]).flatmap(lambda s: s)


PATH_KEYS = ("data-path", "item-properties-path", "base-dir", "run-dir", "resume-from", "init-adapter",
             "merchant-nodes", "world-cache-dir")
HUGE_INTS = [10**30, -10**30, 2**63, -2**63 - 1, 2**64, 2**32, 10**400, -(10**400), 10**5000]
SPECIAL_FLOATS = [math.nan, math.inf, -math.inf, -0.0, 0.0, 1e308, -1e308, 5e-324, 1e-300]
SPECIAL_TEXT = ["", " ", "true", "False", "TRUE ", "nan", "inf", "-inf", "1e400", "-0.0", "0x10", "1_000", "\u0663",
                "\uff11\uff12", "1.5", "7", "-1", "q,v", "q,,v", " , ", "lm_head,embed", "intent,price", "price",
                "churn", "natural:", "natural: brand", "natural:x", "iid", "fedavg", "svd", "median", "merchant",
                "2019-10-01", "2019-10-01T12:00:00+05:00", "0001-01-01", "0001-01-01T00:00:00+23:59",
                "9999-12-31T23:59:59-23:59", "9999-12-31", "24:00", "pv:view,buy:purchase", "pv", ":view",
                "intent:0", "intent:nan", "churn:1e400", "next-item:-1", "intent:3,churn:2", "e\u0301", "\u202e",
                "\t", "a\nb", "\x7f", "\x01", "\ud800", "\udcff", "x" * 5000, "1" * 5000, "9" * 400]


def _scalars() -> st.SearchStrategy:
    return st.one_of(
        st.booleans(), st.integers(-(2**70), 2**70), st.sampled_from(HUGE_INTS), st.floats(),
        st.sampled_from(SPECIAL_FLOATS), st.text(max_size=16), st.sampled_from(SPECIAL_TEXT),
        st.dates(), st.datetimes(timezones=st.sampled_from([None, UTC, timezone(timedelta(hours=-23, minutes=-59))])),
        st.times(),
    )


SCALAR = _scalars()
VALUE = st.one_of(SCALAR, SCALAR, SCALAR, st.lists(SCALAR, max_size=3),
                  st.dictionaries(st.text(max_size=4), SCALAR, max_size=2))
# the scalars Flower can carry in a run config
RUN_CONFIG_VALUE = st.one_of(st.booleans(), st.integers(-(2**70), 2**70), st.sampled_from(HUGE_INTS), st.floats(),
                             st.text(max_size=16), st.sampled_from(SPECIAL_TEXT))
JUNK_KEY = st.one_of(st.text(max_size=12), st.sampled_from(["num_merchants", "Seed", "seed ", "tool", "", "-",
                                                            "run-dir.x", "lora-r=", "privacy unit", "SEED"]))


def _valid_value(key: str) -> st.SearchStrategy:
    """A value of the key's own type and range (so that combinations of keys are exercised too)."""
    f = FIELDS[key]
    meta = f.metadata
    if meta["choices"]:
        if meta["multi"]:
            return st.lists(st.sampled_from(meta["choices"]), min_size=1, max_size=4).map(",".join)
        return st.sampled_from(meta["choices"])
    if f.type in ("bool", bool):
        return st.booleans()
    if f.type in ("int", int):
        low = int(meta["low"]) if meta["low"] is not None else -(2**70)
        high = int(meta["high"]) if meta["high"] is not None else 2**70
        return st.integers(low, high)
    if f.type in ("float", float):
        low = meta["low"] if meta["low"] is not None else None
        high = meta["high"] if meta["high"] is not None else None
        return st.floats(low, high, allow_nan=False)
    return st.one_of(st.text(max_size=12), st.sampled_from(SPECIAL_TEXT))


VALID_KEY_VALUE = st.sampled_from(list(FIELDS)).flatmap(lambda k: st.tuples(st.just(k), _valid_value(k)))
KEY_VALUE = st.one_of(
    VALID_KEY_VALUE,
    st.sampled_from(list(FIELDS)).flatmap(lambda k: st.tuples(st.just(k), VALUE)),
    st.tuples(JUNK_KEY, VALUE),
)
# mixed keys and values, or every value of its key's type and range (combinations of keys)
MAPPING = st.one_of(st.lists(KEY_VALUE, max_size=6).map(dict), st.lists(VALID_KEY_VALUE, max_size=8).map(dict))


def _toml_scalar(value) -> str:
    """TOML text of one value (a test-side writer: it may write what TOML refuses; the loader must say so)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value) if abs(value) < 10**4000 else "1" * 5000  # str() refuses more than 4300 digits
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value == math.inf else "-inf" if value == -math.inf
                                                else repr(value))
    if isinstance(value, (date, datetime)) or hasattr(value, "isoformat"):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(_toml_scalar(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_scalar(v)}" for k, v in value.items()) + "}"
    return '"' + "".join(_escape(c) for c in str(value)) + '"'


def _escape(c: str) -> str:
    if c in '"\\':
        return "\\" + c
    if ord(c) < 0x20 or ord(c) == 0x7F or 0xD800 <= ord(c) <= 0xDFFF:
        return f"\\u{ord(c):04x}"
    return c


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else '"' + "".join(_escape(c) for c in key) + '"'


def _toml_text(mapping: dict, nested: bool) -> str:
    body = "".join(f"{_toml_key(k)} = {_toml_scalar(v)}\n" for k, v in mapping.items())
    return ("[tool.flwr.app.config]\n" + body) if nested else body


def _mutate(text: str, cuts: list[int], junk: str) -> str:
    """Malformed TOML: the text with junk spliced in at a few places."""
    for cut in cuts:
        at = cut % (len(text) + 1)
        text = text[:at] + junk + text[at:]
    return text


TOML_TRAPS = st.sampled_from([
    b"a = " + b"[" * 3000 + b"]" * 3000, b"a = " + b"{b = " * 2000 + b"1" + b"}" * 2000, b"\xef\xbb\xbfseed = 3\n",
    b"seed = 3\r\n", b"[tool]\nflwr = 3\n", b"[tool.flwr.app]\nconfig = 3\n", b"[[tool]]\n",
    b"seed = 1979-05-27T07:32:00Z\n", b"seed = 0x10\n", b"seed = 1_0\n", b"run-dir = '''a\nb'''\n"])


def _config_bytes(mapping: st.SearchStrategy) -> st.SearchStrategy:
    """A config file's bytes: TOML of a mapping (flat or under [tool.flwr.app.config]), the same with junk spliced in
    or non-UTF-8 bytes appended, random bytes, or one of a few known traps."""
    return st.one_of(
        st.builds(lambda m, nested: _toml_text(m, nested).encode("utf-8", "surrogatepass"), mapping, st.booleans()),
        st.builds(lambda m, cuts, junk: _mutate(_toml_text(m, False), cuts, junk).encode("utf-8", "surrogatepass"),
                  mapping, st.lists(st.integers(0, 10_000), min_size=1, max_size=3),
                  st.sampled_from(["[", "]", "=", '"', "'''", "\n[a]\n", "{", "= =", "\\", "\x00", "[[x]]\n",
                                   "\ud800", "a.b = 1\n", "\n[tool.flwr.app.config]\n", "seed = 1\n"])),
        st.builds(lambda m, junk: _toml_text(m, False).encode("utf-8", "surrogatepass") + junk,
                  mapping, st.sampled_from([b"\xff", b"\xfe\xff", b"\xc3", b"\xed\xa0\x80", b"\x00"])),
        st.binary(max_size=200), TOML_TRAPS)


CONFIG_BYTES = _config_bytes(MAPPING)
OVERRIDE = st.one_of(
    KEY_VALUE.map(lambda kv: f"{kv[0]}={kv[1] if isinstance(kv[1], str) else _toml_scalar(kv[1])}"),
    st.sampled_from(["", "=", "seed", "seed==3", " seed = 3 ", "=3", "lora-r=", "tasks=price"]),
    st.text(max_size=20),
)


def _single_line_fedshop_error(exc: BaseException) -> None:
    """What a refused input must look like: fedshop's own error, a non-empty one-line message."""
    assert isinstance(exc, UserError), f"{type(exc).__name__}: {exc}"
    text = str(exc)
    assert text.strip() and "\n" not in text and "\r" not in text, repr(text)


def _round_trips(config: FedShopConfig, folder: Path) -> None:
    """An accepted config reads back equal from the `config.toml` fedshop writes for it, and from its flat form."""
    assert from_mapping(config.to_flat()) == config
    written = folder / "resolved.toml"
    written.write_text(to_toml(config), encoding="utf-8")
    assert load_config(written) == config


# --- 1. the config parser ---------------------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=MAPPING)
@example(values={"learning-rate": 10**400})  # float(huge int) raised OverflowError
@example(values={"run-dir": "a\nb"})  # to_toml wrote a raw newline: the run's own config.toml was not TOML
@example(values={"item-column": "\x7f"})
@example(values={"run-dir": "\udcff"})  # an argv byte that is not UTF-8: the run could not write config.toml
@example(values={"data-path": "a\x00b"})
@example(values={"seed": 10**5000})  # repr() of the value for the message raised ValueError
@example(values={"seed": [10**5000]})
@example(values={"seed": 10**30})  # accepted, then torch.manual_seed overflowed in every merchant
@example(values={"time-window-start": "0001-01-01T00:00:00+23:59"})
def test_fuzz_config_mapping_gives_a_config_or_a_config_error(values):
    try:
        config = from_mapping(values)
    except ConfigError as exc:
        _single_line_fedshop_error(exc)
        event("refused")
        return
    event("accepted")
    with tempfile.TemporaryDirectory() as folder:
        _round_trips(config, Path(folder))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=st.dictionaries(st.one_of(st.sampled_from(list(FIELDS)), JUNK_KEY), RUN_CONFIG_VALUE, max_size=6))
def test_fuzz_flower_run_config_gives_a_config_or_a_config_error(values):
    try:
        from_run_config(values)
        event("accepted")
    except ConfigError as exc:
        _single_line_fedshop_error(exc)
        event("refused")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=CONFIG_BYTES, overrides=st.lists(OVERRIDE, max_size=4), with_file=st.booleans())
@example(data=b"a = " + b"[" * 3000 + b"]" * 3000, overrides=[], with_file=True)  # RecursionError from tomllib
@example(data=b"learning-rate = " + b"9" * 400 + b"\n", overrides=[], with_file=True)  # OverflowError
@example(data=b"seed = " + b"1" * 5000 + b"\n", overrides=[], with_file=True)  # ValueError from tomllib
def test_fuzz_config_file_and_overrides_give_a_config_or_a_config_error(data, overrides, with_file):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzz.toml"
        path.write_bytes(data)
        try:
            config = load_config(path if with_file else None, overrides)
        except ConfigError as exc:
            _single_line_fedshop_error(exc)
            # every refusal names where: the file, --set, or the config key
            assert str(path) in str(exc) or "--set" in str(exc) or "config key" in str(exc), str(exc)
            event("refused")
            return
        event("accepted")
        _round_trips(config, Path(folder))


def test_the_largest_accepted_seed_still_seeds_every_merchant():
    """The seed's range keeps the merchants' training seeds (client_app: seed x 1_000_003 + round x 1_009 +
    partition) within what torch.manual_seed takes, at the largest round and merchant counts the config allows."""
    import torch

    high = {key: int(FIELDS[key].metadata["high"]) for key in ("seed", "num-rounds", "num-merchants")}
    config = from_mapping(high)
    torch.Generator().manual_seed(config.seed * 1_000_003 + config.num_rounds * 1_009 + config.num_merchants - 1)
    with pytest.raises(ConfigError, match="'seed'"):
        from_mapping({"seed": high["seed"] + 1})


# --- 1. every CLI command's arguments ---------------------------------------------------------------------------------

class _Tripwire(Exception):
    """Raised where a command would start real work: the invocation was valid up to there."""


@pytest.fixture(scope="module")
def tripwires():
    """Pretraining, simulating, deploying, a sweep's runs and generating synthetic data are replaced by a tripwire
    for this module's CLI fuzz; everything before them runs for real."""
    import server.deploy
    import server.simulation
    import server.sweep
    import shared.pretrain
    import shared.synthetic

    def trip(name):
        def wire(*_args, **_kwargs):
            raise _Tripwire(name)
        return wire

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(shared.pretrain, "pretrain", trip("pretrain"))
        patch.setattr(server.simulation, "run_simulation", trip("simulation"))
        patch.setattr(server.deploy, "run_deployment", trip("deployment"))
        patch.setattr(server.sweep, "subprocess", SimpleNamespace(run=trip("sweep run")))
        patch.setattr(shared.synthetic, "generate", trip("synthetic data"))
        yield


def _leaf_parsers(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> dict:
    """(command words) -> its parser, for every subcommand of the real `fedshop` parser."""
    out = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
                    out.update(_leaf_parsers(sub, (*prefix, name)))
                else:
                    out[(*prefix, name)] = sub
    return out


def _commands() -> dict:
    from server.cli import build_parser

    return _leaf_parsers(build_parser())


COMMANDS = _commands()
PATH_DESTS = {"run_dir", "out", "state_dir", "init_adapter", "adapter", "input", "verify", "file"}
# inside the example's temporary working folder (see _workspace); no absolute path, no '..'
TMP_PATHS = ["missing", "missing/deeper/x", "junk.bin", "junk.bin/sub", "empty.csv", "dir", "dir/new", "events.csv",
             "runlike", "runlike/adapter", "validrun", "export", "junkbase", ".", "", "bad.toml", "big.csv"]
SAFE_NAME = st.text(st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs",)), min_size=1,
                    max_size=10).filter(lambda s: s not in (".", ".."))
TMP_PATH = _weighted((3, st.sampled_from(TMP_PATHS)), (1, SAFE_NAME))
CONFIG_FILES = ["fuzz.toml", "bad.toml", "nonutf8.toml", "deep.toml", "section.toml", "runlike/config.toml", "dir",
                "missing.toml", "junk.bin", "empty.csv"]
ARG_TEXT = st.one_of(st.sampled_from(SPECIAL_TEXT), st.text(st.characters(blacklist_characters="\x00"), max_size=16),
                     st.sampled_from(["-", "--", "-h", "--help", "--set", "-v", "=", "i1 i2", "a=b c", "k=v x",
                                      "target-epsilon=4", "0.5,1,inf", "1,,2", "-1", "0", "nan,1"]))



INT_TEXT = _weighted((6, st.integers(-3, 300).map(str)), (1, st.integers(-(2**70), 2**70).map(str)),
                     (1, st.sampled_from([_toml_scalar(v) for v in HUGE_INTS])), (1, ARG_TEXT))
FLOAT_TEXT = _weighted((6, st.floats(-10, 1e3).map(repr)), (1, st.floats().map(repr)),
                       (1, st.sampled_from(["nan", "inf", "-inf", "-0.0", "1e400", "1e-400"])), (1, ARG_TEXT))
# options whose value is a list in one string
LISTS = {
    "epsilons": st.lists(st.one_of(FLOAT_TEXT, st.just("inf")), min_size=1, max_size=4).map(",".join),
    "history": st.lists(st.one_of(st.sampled_from(["i1", "i3", "c0", "<pad>", "item:x"]), ARG_TEXT),
                        max_size=5).map(" ".join),
    "candidates": st.lists(st.one_of(st.sampled_from(["i1", "i3"]), ARG_TEXT), max_size=4).map(",".join),
    "node_config": st.lists(st.one_of(st.sampled_from(["target-epsilon=4", "message-log=log.txt", "=3", "k="]),
                                      ARG_TEXT), max_size=3).map(" ".join),
}


def _safe_path_value(value: str) -> str:
    """A path-valued config key's value, kept inside the temporary working folder (world-cache-dir expands ~)."""
    return ",".join(part.replace("..", "_").lstrip("/~") for part in value.split(","))


def _sanitized(mapping: dict) -> dict:
    return {k: _safe_path_value(v) if k.strip() in PATH_KEYS and isinstance(v, str) else v for k, v in mapping.items()}


CLI_CONFIG_BYTES = _config_bytes(MAPPING.map(_sanitized))  # what --config fuzz.toml holds


def _set_value(kv: tuple) -> str:
    key, value = kv
    text = _toml_scalar(value) if not isinstance(value, str) else value
    if key.strip() in PATH_KEYS:
        text = _safe_path_value(text)
    return f"{key}={text}"


SET_TEXT = _weighted((4, KEY_VALUE.map(_set_value)), (1, st.sampled_from(
    ["seed", "=", "lora-r=", "base-dir=junkbase", "resume-from=runlike", "resume-from=validrun", "init-adapter=export",
     "run-dir=junk.bin/sub", "data-path=events.csv", "merchant-nodes=junk.bin",
     "item-properties-path=junk.bin,missing"])))


def _value_strategy(action: argparse.Action) -> st.SearchStrategy:
    if action.dest == "config":
        return st.sampled_from(CONFIG_FILES)
    if action.dest == "set":
        return SET_TEXT
    if action.dest in PATH_DESTS or action.type is Path:
        return TMP_PATH
    if action.dest in LISTS:
        return _weighted((6, LISTS[action.dest]), (1, ARG_TEXT))
    if action.choices:
        return _weighted((6, st.sampled_from(list(action.choices))), (1, ARG_TEXT))
    if action.type is int:
        return INT_TEXT
    if action.type is float:
        return FLOAT_TEXT
    return ARG_TEXT


@st.composite
def command_lines(draw) -> list[str]:
    words = draw(st.sampled_from(sorted(COMMANDS)))
    parser = COMMANDS[words]
    chunks: list[list[str]] = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            if draw(st.integers(0, 49)) == 0:
                chunks.append([action.option_strings[0]])
            continue
        wanted = 0.97 if action.required else (0.8 if action.dest == "set" else 0.35)
        if not draw(st.floats(0, 1)) < wanted:
            continue
        repeats = draw(st.integers(1, 3)) if action.dest == "set" else 1
        for _ in range(repeats):
            value = [] if action.nargs == 0 else [draw(_value_strategy(action))]
            chunks.append([draw(st.sampled_from(action.option_strings)), *value] if action.option_strings else value)
    if draw(st.integers(0, 19)) == 0:
        chunks.append([draw(ARG_TEXT)])  # a stray word
    chunks = draw(st.permutations(chunks))
    prefix = ["-v"] if draw(st.booleans()) else []
    return [*prefix, *words, *(word for chunk in chunks for word in chunk)]


def _workspace(root: Path, config_bytes: bytes) -> Path:
    """The example's working folder: junk of every kind the command lines point at."""
    work = root / "work"
    work.mkdir()
    rng = np.random.default_rng(15)
    (work / "junk.bin").write_bytes(rng.integers(0, 256, 2048, dtype=np.uint8).tobytes())
    (work / "empty.csv").write_bytes(b"")
    (work / "dir").mkdir()
    (work / "events.csv").write_text("merchant_id,user_id\nshopA,u1\n", encoding="utf-8")
    (work / "big.csv").write_text("merchant_id,user_id,item_id,event,timestamp\n" + "x," * 70_000 + "\n",
                                  encoding="utf-8")
    (work / "fuzz.toml").write_bytes(config_bytes)
    (work / "bad.toml").write_text("seed = [\n", encoding="utf-8")
    (work / "nonutf8.toml").write_bytes(b"seed = 1\n\xff\xfe = 2\n")
    (work / "deep.toml").write_bytes(b"a = " + b"[" * 3000 + b"]" * 3000)
    (work / "section.toml").write_text("[model]\nlora-r = 4\n", encoding="utf-8")
    # a run directory, an export and a base whose files are all there but broken
    for folder, files in {"runlike": ("config.toml", "privacy.csv", "adapter/adapter_model.safetensors",
                                      "adapter/adapter_config.json", "metrics.jsonl"),
                          "export": ("manifest.json", "run-config.toml", "adapter_model.safetensors",
                                     "base/model.safetensors"),
                          "junkbase": ("config.json", "model.safetensors", "fedshop_base.json")}.items():
        for name in files:
            (work / folder / name).parent.mkdir(parents=True, exist_ok=True)
            (work / folder / name).write_bytes(b"{\"files\": 3}" if name.endswith(".json") else b"\x00\x01junk")
    # a run directory whose config reads (base: the broken one), the rest of it broken
    for name in ("privacy.csv", "adapter/adapter_model.safetensors", "adapter/adapter_config.json"):
        (work / "validrun" / name).parent.mkdir(parents=True, exist_ok=True)
        (work / "validrun" / name).write_bytes(b"\x00\x01junk")
    (work / "validrun" / "config.toml").write_text(to_toml(FedShopConfig(base_dir="junkbase")), encoding="utf-8")
    return work


ERROR_LINE = re.compile(r"^fedshop: error: .")
LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d fedshop ")


def _run_cli(argv: list[str], work: Path) -> tuple[str, object, str, str]:
    """(outcome kind, value, stdout, stderr) of `main(argv)` run in `work`."""
    from server.cli import main

    out, err = io.StringIO(), io.StringIO()
    previous = Path.cwd()
    os.chdir(work)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                kind, value = "returned", main(argv)
            except SystemExit as exc:
                kind, value = "argparse exit", exc.code
            except _Tripwire as exc:
                kind, value = "reached work", str(exc)
    finally:
        os.chdir(previous)
    return kind, value, out.getvalue(), err.getvalue()


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(argv=command_lines(), config_bytes=CLI_CONFIG_BYTES)
@example(argv=["simulate", "--run-dir", "junk.bin/sub"], config_bytes=b"")  # run dir under a file: mkdir's OSError
@example(argv=["simulate", "--run-dir", "/"], config_bytes=b"")  # the root: lock_file's with_name raised ValueError
@example(argv=["simulate", "--set", "resume-from=runlike", "--run-dir", "dir"], config_bytes=b"")
@example(argv=["deploy", "--merchants", "2", "--node-config", "nokey"], config_bytes=b"")  # dict() ValueError late
@example(argv=["data", "inspect", "events.csv", "--out", "junk.bin"], config_bytes=b"")  # out is a file
@example(argv=["pretrain", "--config", "deep.toml"], config_bytes=b"")  # RecursionError
@example(argv=["simulate", "--set", "learning-rate=" + "9" * 400], config_bytes=b"")
@example(argv=["simulate", "--config", "fuzz.toml"], config_bytes=b"learning-rate = " + b"9" * 400 + b"\n")
@example(argv=["simulate", "--set", "seed=" + "9" * 30], config_bytes=b"")
@example(argv=["sweep", "--epsilons", "1", "--run-dir", "junk.bin/sub"], config_bytes=b"")
@example(argv=["export", "runlike", "--out", "dir", "--round", "1"], config_bytes=b"")
@example(argv=["predict", "--adapter", "export", "--history", "i1"], config_bytes=b"")
@example(argv=["audit", "runlike"], config_bytes=b"")
@example(argv=["audit", "validrun"], config_bytes=b"")
@example(argv=["export", "validrun", "--out", "junk.bin"], config_bytes=b"")
def test_fuzz_every_command_gives_exit_2_and_one_line_never_a_traceback(tripwires, argv, config_bytes):
    with tempfile.TemporaryDirectory() as root:
        work = _workspace(Path(root), config_bytes)
        kind, value, _stdout, stderr = _run_cli(argv, work)
    event(f"{argv[argv[0] == '-v']}: {kind}" + (f" ({value})" if kind != "returned" or value != 2 else " 2"))
    assert "Traceback" not in stderr, stderr
    if kind == "reached work":
        return  # a valid invocation: the command got as far as its real work
    if kind == "argparse exit":
        assert value in (0, 2), value
        if value == 2:
            assert re.search(r"^fedshop[^\n]*: error: ", stderr, re.MULTILINE), stderr  # argparse's usage error
        return
    assert value in (0, 2), (value, stderr)
    if value == 2:
        lines = [line for line in stderr.splitlines() if not LOG_LINE.match(line)]
        assert len(lines) == 1 and ERROR_LINE.match(lines[0]), stderr


def test_the_cli_logs_each_line_once_however_often_main_runs(tmp_path):
    """main() sets its log handler up once: called again in one process (tests, embedding), each line is printed
    once, not once per earlier call."""
    from server.cli import main

    export = tmp_path / "export"
    export.mkdir()
    (export / "manifest.json").write_text('{"files": {}}', encoding="utf-8")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        codes = [main(["export", "--verify", str(export)]) for _ in range(3)]
    assert codes == [0, 0, 0]
    assert len([line for line in err.getvalue().splitlines() if "every file matches" in line]) == 3, err.getvalue()


# --- 2. megabyte event logs -------------------------------------------------------------------------------------------

SUFFIX = {"parquet": ".parquet", "recbole": ".inter"}
HEADERS = {
    "canonical": "merchant_id,user_id,item_id,event,timestamp,price,category",
    "retailrocket": "timestamp,visitorid,event,itemid,transactionid",
    "taobao": "",
    "rees46": "event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session",
    "recbole": "user_id:token\titem_id:token\trating:float\ttimestamp:float",
    "transactions": "customer_id,date,amount,quantity",
    "parquet": "",
}


def _write(folder: Path, fmt: str, data: bytes) -> Path:
    path = folder / f"events{SUFFIX.get(fmt, '.csv')}"
    path.write_bytes(data)
    return path


def _load_or_refuse(path: Path, fmt: str, skip: bool = False):
    """The loaded events, or the DataError, which must name the file (checked here)."""
    try:
        return load_events(path, LoadOptions(data_format=fmt, on_bad_rows="skip" if skip else "error"))
    except UserError as exc:
        assert isinstance(exc, DataError), type(exc)
        _single_line_fedshop_error(exc)
        assert str(path) in str(exc), str(exc)
        return exc


@pytest.mark.parametrize("fmt", ["auto", *FORMATS])
@pytest.mark.parametrize("shape", ["one line of 3 MB", "header then a 2 MB field", "header then 2 MB of commas"])
def test_a_line_of_megabytes_is_refused_naming_the_file_and_line(tmp_path, fmt, shape):
    header = HEADERS.get(fmt, HEADERS["canonical"]) or HEADERS["canonical"]
    data = {"one line of 3 MB": b"7" * 3_000_000,
            "header then a 2 MB field": (header + "\n").encode() + b"u" * 2_000_000 + b",u1,i1,view,1000,,\n",
            "header then 2 MB of commas": (header + "\n").encode() + b"," * 2_000_000 + b"\n"}[shape]
    path = _write(tmp_path, fmt, data)
    for skip in (False, True):
        result = _load_or_refuse(path, fmt, skip)
        assert isinstance(result, DataError), f"{fmt} loaded {len(result)} events from {shape}"
        if fmt not in ("parquet",) and shape != "one line of 3 MB" and not skip:
            assert re.search(rf"{re.escape(str(path))}:[12]\b", str(result)), str(result)


@pytest.mark.parametrize("fmt", ["auto", *FORMATS])
def test_megabytes_of_binary_junk_are_refused_naming_the_file(tmp_path, fmt):
    junk = np.random.default_rng(5).integers(0, 256, 4_000_000, dtype=np.uint8).tobytes()
    for data in (junk, (HEADERS.get(fmt) or HEADERS["canonical"]).encode() + b"\n" + junk):
        path = _write(tmp_path, fmt, data)
        for skip in (False, True):
            result = _load_or_refuse(path, fmt, skip)
            assert isinstance(result, DataError), f"{fmt} loaded {len(result)} events from binary junk"


# huge and odd numbers where a canonical file has ids, timestamps and prices
ODD_NUMBERS = ["1" + "0" * 30, "-" + "1" * 30, "1e308", "-1e308", "1e309", "nan", "-nan", "inf", "-0", "0x10",
               "9" * 5000, "1_000", "\u0663"]


@pytest.mark.parametrize("column", ["user_id", "item_id", "timestamp", "price"])
def test_huge_and_odd_numbers_load_as_ids_or_are_refused_naming_line_and_column(tmp_path, column):
    rows = []
    for k, odd in enumerate(ODD_NUMBERS * 8_000):  # ~100k rows, ~2-3 MB
        values = {"user_id": f"u{k % 97}", "item_id": f"i{k % 89}", "timestamp": str(1_600_000_000_000 + k),
                  "price": "9.5", column: odd}
        rows.append(f"shop,{values['user_id']},{values['item_id']},view,{values['timestamp']},{values['price']},c")
    path = _write(tmp_path, "canonical", ("merchant_id,user_id,item_id,event,timestamp,price,category\n"
                                          + "\n".join(rows) + "\n").encode())
    assert path.stat().st_size > 1_000_000
    raw = _load_or_refuse(path, "canonical")
    if column in ("user_id", "item_id"):  # ids are names, never numbers: all kept, each distinct text one id
        assert not isinstance(raw, Exception), raw
        names = raw.user_names if column == "user_id" else raw.item_names
        assert len(raw) == len(rows) and set(names.tolist()) == set(ODD_NUMBERS)
        return
    # what Python's int() and float() take (and a price may be any finite number >= 0); the rest is refused
    accepted = {"timestamp": ["-0", "1_000", "\u0663"],
                "price": ["1" + "0" * 30, "1e308", "-0", "1_000", "\u0663"]}[column]
    first_bad = next(k for k, odd in enumerate(ODD_NUMBERS) if odd not in accepted)
    assert isinstance(raw, DataError), "a file full of impossible timestamps or prices loaded"
    assert f"{path}:{first_bad + 2}:" in str(raw) and f"(column {column})" in str(raw), str(raw)
    skipped = _load_or_refuse(path, "canonical", skip=True)
    assert not isinstance(skipped, Exception), skipped
    per_odd = len(rows) // len(ODD_NUMBERS)
    assert len(skipped) == per_odd * len(accepted)
    assert sum(skipped.stats.skipped.values()) == len(rows) - len(skipped)
    if column == "price":
        assert np.isfinite(skipped.price).all()


@pytest.mark.parametrize("fmt, accepted", [("taobao", ["-0", "1_000", "\u0663"]),
                                           ("recbole", ["-0", "1_000", "\u0663"]), ("rees46", []),
                                           ("transactions", [])])
def test_huge_and_odd_numbers_in_each_formats_time_column(tmp_path, fmt, accepted):
    """Seconds (taobao, recbole) and date strings (rees46, transactions): the odd values Python's float() takes
    load, the rest are refused at their line and column, and with on-bad-rows = skip counted."""
    row = {"taobao": "u{k},i{k},c1,pv,{odd}", "recbole": "u{k}\ti{k}\t3\t{odd}",
           "rees46": "{odd},view,i{k},c1,,brand,1.5,u{k},s{k}", "transactions": "u{k},{odd},9.5,1"}[fmt]
    values = ODD_NUMBERS * 3_000
    header = (HEADERS[fmt] + "\n") if HEADERS[fmt] else ""
    path = _write(tmp_path, fmt, (header + "\n".join(row.format(k=k % 500, odd=odd) for k, odd in enumerate(values))
                                  + "\n").encode())
    refused = _load_or_refuse(path, fmt)
    first_bad = next(k for k, odd in enumerate(ODD_NUMBERS) if odd not in accepted)
    line = first_bad + 1 + bool(header)
    assert isinstance(refused, DataError) and f"{path}:{line}:" in str(refused), str(refused)
    assert "column" in str(refused) and "timestamp" in str(refused).lower() or "date" in str(refused), str(refused)
    skipped = _load_or_refuse(path, fmt, skip=True)
    kept = 3_000 * len(accepted) * (2 if fmt == "transactions" else 1)
    if not kept:
        assert isinstance(skipped, DataError) and f"({len(values)} row(s) skipped or dropped)" in str(skipped)
        return
    assert not isinstance(skipped, Exception), skipped
    assert len(skipped) == kept and sum(skipped.stats.skipped.values()) == len(values) - 3_000 * len(accepted)


def test_a_parquet_file_of_extreme_values_loads_the_good_rows_or_names_the_bad_row(tmp_path):
    """Parquet columns of any type are read as text: the largest unsigned ids are ids, an int64-max timestamp and
    an infinite price are refused by row (first at row 10), a NaN price is unknown."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 200_000
    k = np.arange(n)
    timestamp = 1_600_000_000_000 + k
    timestamp[9::10] = np.iinfo(np.int64).max  # rows 10, 20, ...
    price = np.where(k % 7 == 3, np.nan, 1e308)
    price[k % 7 == 5] = np.inf
    table = pa.table({"merchant_id": pa.array(["shop"] * n),
                      "user_id": pa.array(np.uint64(2**64 - 1) - (k % 50).astype(np.uint64)),
                      "item_id": pa.array(-(k % 300) - 10**17), "event": pa.array(["view"] * n),
                      "timestamp": pa.array(timestamp), "price": pa.array(price),
                      "category": pa.array([None, "c1"] * (n // 2))})
    path = tmp_path / "events.parquet"
    pq.write_table(table, path)
    assert path.stat().st_size > 1_000_000
    refused = _load_or_refuse(path, "parquet")
    first = min(10, next(j + 1 for j in range(n) if k[j] % 7 == 5))  # the first bad row, 1-based
    assert isinstance(refused, DataError) and f"{path}:{first}:" in str(refused), str(refused)
    raw = _load_or_refuse(path, "auto", skip=True)
    good = (timestamp != np.iinfo(np.int64).max) & (k % 7 != 5)
    assert not isinstance(raw, Exception), raw
    assert len(raw) == good.sum() and sum(raw.stats.skipped.values()) == n - good.sum()
    assert set(raw.user_names.tolist()) == {str(2**64 - 1 - j) for j in np.unique(k[good] % 50).tolist()}
    assert np.isnan(raw.price).sum() == (good & (k % 7 == 3)).sum() and np.nanmax(raw.price) == 1e308


def test_the_largest_prices_give_a_finite_median_and_price_level(tmp_path):
    """Prices near the float maximum are legal (finite, >= 0); the item's median price must not overflow to inf."""
    from shared.sources import load_real

    rows = [f"shop,u{k % 40},i{k % 7},{'view' if k % 3 else 'purchase'},{1_600_000_000_000 + k * 3_600_000},"
            f"{1e308 if k % 2 else 1.7e308!r},c{k % 3}" for k in range(2_000)]
    path = tmp_path / "events.csv"
    path.write_text("merchant_id,user_id,item_id,event,timestamp,price,category\n" + "\n".join(rows) + "\n",
                    encoding="utf-8")
    config = FedShopConfig(data_path=str(path), num_merchants=2, partition="iid", min_item_events=1)
    data, _report = load_real(config)
    assert np.isfinite(data.catalogue.price).all(), data.catalogue.price
    assert np.isfinite(data.price_level).all() and (data.price_level > 0).all()


MILLION = 1_000_000


@pytest.fixture(scope="module")
def million_events(tmp_path_factory) -> tuple[Path, float]:
    """A valid canonical file of a million events of one shopper: a view a second over 11.6 days, 500 items;
    (path, seconds to write it)."""
    started = time.perf_counter()
    path = tmp_path_factory.mktemp("million") / "one-shopper.csv"
    seconds = np.arange(MILLION, dtype=np.int64)
    stamps = (1_600_000_000_000 + seconds * 1000).astype(str)
    items = np.char.add("i", (seconds % 500).astype(str))
    lines = np.char.add(np.char.add("shop,bot,", items), ",view,")
    body = "\n".join(np.char.add(lines, stamps).tolist())
    path.write_text("merchant_id,user_id,item_id,event,timestamp\n" + body + "\n", encoding="utf-8")
    return path, time.perf_counter() - started


def test_a_million_events_of_one_shopper_load_and_the_bot_rule_drops_them(million_events):
    from shared.cleaning import CleaningOptions, clean
    from shared.sources import load_real

    path, _ = million_events
    started = time.perf_counter()
    raw = load_events(path, LoadOptions())
    load_seconds = time.perf_counter() - started
    assert len(raw) == MILLION and raw.user_names.tolist() == ["bot"] and len(raw.item_names) == 500
    assert (np.diff(raw.timestamp) == 1000).all()
    assert load_seconds < 30, f"loading a million events took {load_seconds:.1f} s"
    # documented rules: more than max-events-per-shopper-per-day (default 1000) on one day is a bot, dropped ...
    config = FedShopConfig(data_path=str(path), partition="iid")
    with pytest.raises(DataError) as refused:
        load_real(config)
    assert str(path) in str(refused.value) and "bot-like shoppers: 1000000" in str(refused.value)
    # ... and with the bot rule off (0) the shopper is kept whole: no duplicates, every item seen 2000 times
    kept, steps = clean(raw, CleaningOptions(max_events_per_shopper_per_day=0, min_shopper_events=5,
                                             min_item_events=2))
    assert len(kept) == MILLION and all(step.events_dropped == 0 for step in steps)
    # a ceiling of 86_400 (one event a second is exactly that many a day) keeps them too; 86_399 drops them
    assert len(clean(raw, CleaningOptions(max_events_per_shopper_per_day=86_400))[0]) == MILLION
    assert len(clean(raw, CleaningOptions(max_events_per_shopper_per_day=86_399))[0]) == 0


@pytest.mark.parametrize("fmt", ["canonical", "retailrocket", "rees46", "transactions", "recbole"])
def test_a_valid_header_then_megabytes_of_ragged_rows(tmp_path, fmt):
    """Every third row has too many or too few fields: error mode names the first (file:line), skip mode keeps
    exactly the good rows and counts the ragged ones."""
    header = HEADERS[fmt]
    delimiter = "\t" if fmt == "recbole" else ","
    good = {"canonical": "shop,u{k},i{i},view,{t},1.5,c1", "retailrocket": "{t},u{k},view,i{i},",
            "rees46": "2019-10-01 00:00:{s:02d} UTC,view,i{i},c1,,brand,1.5,u{k},s{k}",
            "transactions": "u{k},2019-10-01,{i}.5,1", "recbole": "u{k}\ti{i}\t3\t{s}"}[fmt]
    width = len(header.split(delimiter))
    rows, ragged = [], 0
    for k in range(90_000):
        if k % 3 == 1:
            fields = width + (1 + k % 4 if k % 2 else -(1 + k % (width - 1)))
            rows.append(delimiter.join(["x"] * fields))
            ragged += 1
        else:
            rows.append(good.format(k=k % 1000, i=k % 300, t=1_600_000_000_000 + k, s=k % 60))
    path = _write(tmp_path, fmt, (header + "\n" + "\n".join(rows) + "\n").encode())
    assert path.stat().st_size > 1_000_000
    refused = _load_or_refuse(path, fmt)
    assert isinstance(refused, DataError) and f"{path}:3:" in str(refused), str(refused)
    raw = _load_or_refuse(path, fmt, skip=True)
    assert not isinstance(raw, Exception), raw
    kept_rows = len(rows) - ragged
    per_row = 2 if fmt == "transactions" else 1  # a transaction is a purchase and a view
    assert len(raw) == kept_rows * per_row  # recbole: rating 3 < purchase-rating 4, views only
    assert raw.stats.skipped == {"wrong field count": ragged} and raw.stats.rows_read == len(rows)


# a valid row of each CSV-like format, one {placeholder} per column
TEMPLATES = {
    "canonical": ("shop,u{k},i{i},view,{t},9.5,c1", ","),
    "retailrocket": ("{t},u{k},view,i{i},", ","),
    "taobao": ("u{k},i{i},c1,pv,{s}", ","),
    "rees46": ("2019-10-01 00:00:{s2} UTC,view,i{i},c1,,brand,1.5,u{k},s{k}", ","),
    "recbole": ("u{k}\ti{i}\t3\t{s}", "\t"),
    "transactions": ("u{k},2019-10-01,{i}.5,1", ","),
}
PLAIN = st.text(st.characters(blacklist_characters='"\r\n\x00', blacklist_categories=("Cs",)), max_size=10)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fmt=st.sampled_from(sorted(TEMPLATES)), column=st.integers(0, 8),
       odd=st.one_of(st.sampled_from(ODD_NUMBERS + ["", " ", "view", "pv", '"', "a\nb", "\x00", "\udcff"]), PLAIN),
       size=st.integers(1_000_000, 2_000_000))
@example(fmt="canonical", column=4, odd="1" + "0" * 30, size=1_000_000)
@example(fmt="recbole", column=2, odd="1" + "0" * 30, size=1_000_000)  # a rating >= 4 is also a purchase
def test_fuzz_megabytes_of_good_rows_and_one_odd_value(fmt, column, odd, size):
    """A valid row, then the same row with one field replaced by an odd value, repeated to megabytes. Error mode:
    a load or the file named; skip mode: when the odd value cannot break the CSV itself (no quote, NUL or line
    break), exactly the good rows load, plus the odd ones if their value was acceptable."""
    template, delimiter = TEMPLATES[fmt]
    good = template.format(k=7, i=3, t=1_600_000_000_000, s=1_600_000_000, s2="01")
    fields = good.split(delimiter)
    fields[column % len(fields)] = odd
    bad = delimiter.join(fields)
    header = (HEADERS[fmt] + "\n") if HEADERS[fmt] else ""
    pair = (good + "\n" + bad + "\n").encode("utf-8", "surrogateescape")
    repeat = size // len(pair) + 1
    per_row = 2 if fmt == "transactions" else 1  # transactions: a purchase and a view
    with tempfile.TemporaryDirectory() as folder:
        path = _write(Path(folder), fmt, header.encode() + pair * repeat)
        assert path.stat().st_size > 1_000_000
        refused = _load_or_refuse(path, fmt)
        event("error mode: refused" if isinstance(refused, Exception) else "error mode: loaded")
        loaded = _load_or_refuse(path, fmt, skip=True)
    if any(c in odd for c in '"\r\n\x00'):
        return  # may break the CSV's quoting or lines: only fedshop's own error is required
    assert not isinstance(loaded, Exception), loaded
    # recbole: an odd row rated >= purchase-rating is a view and a purchase
    assert len(loaded) in (repeat * per_row, 2 * repeat * per_row, 3 * repeat * (fmt == "recbole")), len(loaded)
    odd_kept = len(loaded) > repeat * per_row
    event("odd rows kept" if odd_kept else "odd rows skipped")
    assert odd_kept == (not isinstance(refused, Exception))
    assert sum(loaded.stats.skipped.values()) == (0 if odd_kept else repeat)
