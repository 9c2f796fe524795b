"""Every numeric flag of every command line is range-checked at parse time (issue 20).

The tests walk each parser's actions (argparse `_actions`): an int or float flag without an entry in its script's
range table fails here, so a flag added later cannot be forgotten. Then every numeric flag is given values just
outside its range (and NaN, +-inf for floats): each must stop the parse with one line that names the flag.
"""

import argparse
import math

import pytest

import flag_ranges
import latent_cache
import train
from arguments import FLAG_RANGES
from eval import compare, generate, make_pairs, score


class Captured(Exception):
    def __init__(self, parser):
        self.parser = parser


TRAIN_ARGV = ["--pretrained_model_name_or_path", "x", "--dataset_name", "d"]
# name: (entry point, minimal valid argv, range table)
CLIS = {
    "train.py": (train.parse_args, TRAIN_ARGV, FLAG_RANGES),
    "eval.generate": (generate.parse_args, [], generate.GENERATE_RANGES),
    "eval.make_pairs": (make_pairs.parse_args, ["--prompts", "p.json", "--output_dir", "out"], make_pairs.MAKE_PAIRS_RANGES),
    "eval.score": (score.main, [], score.SCORER_RANGES),
    "eval.compare": (compare.main, [], {**score.SCORER_RANGES, **compare.COMPARE_RANGES}),
}
# Flags whose range only applies to some model families: the family that takes them.
CONTEXT = {("train.py", dest): ["--model_family", "wan"] for dest in ("num_frames", "frame_stride", "target_fps", "video_size")}
CONTEXT[("eval.generate", "num_frames")] = CONTEXT[("eval.generate", "fps")] = ["--model_family", "wan"]


def numeric_actions(parser):
    return [a for a in parser._actions if a.type in (int, float)]


@pytest.mark.parametrize("cli", CLIS)
def test_every_numeric_flag_has_a_range(cli):
    entry, argv, table = CLIS[cli]
    parser = build(entry, argv)
    numeric = {a.dest for a in numeric_actions(parser)}
    assert numeric, "no numeric flag found: the walk is broken"
    missing = sorted(numeric - set(table))
    assert not missing, f"{cli}: numeric flags without a range in its table: {missing}"
    stale = sorted(set(table) - numeric)
    assert not stale, f"{cli}: ranges of flags that do not exist (or are not numeric): {stale}"


def outside(spec: str, kind) -> list:
    """Values just outside `spec` (an int or a float flag), plus NaN and the infinities for floats."""
    bad = [math.nan, math.inf, -math.inf] if kind is float else []
    step = 1 if kind is int else 0.5
    if spec == "finite":
        return bad
    bound = flag_ranges._BOUND.match(spec)
    if bound:
        op, limit = bound.group(1), kind(float(bound.group(2)))
        return bad + [{">=": limit - step, ">": limit, "<=": limit + step, "<": limit}[op]]
    left, low, high, right = flag_ranges._INTERVAL.match(spec).groups()
    low, high = kind(float(low)), kind(float(high))
    return bad + [low - step if left == "[" else low, high + step if right == "]" else high]


def cases():
    for cli, (entry, argv, table) in CLIS.items():
        parser = build(entry, argv)
        for action in numeric_actions(parser):
            for value in outside(table.get(action.dest, "finite"), action.type):  # a missing range: see above
                yield pytest.param(cli, action, value, id=f"{cli}:{flag_ranges.flag_name(action)}={value}")


def build(entry, argv) -> argparse.ArgumentParser:
    """The parser a command line builds (some build it inside main), stopped before it parses. Not pytest's monkeypatch:
    the cases are listed at collection time."""
    original = argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):
        raise Captured(self)

    argparse.ArgumentParser.parse_args = capture
    try:
        entry(argv)
    except Captured as captured:
        return captured.parser
    finally:
        argparse.ArgumentParser.parse_args = original
    raise AssertionError("the parser was never used")


@pytest.mark.parametrize("cli, action, value", list(cases()))
def test_values_outside_a_flags_range_are_refused_naming_it(cli, action, value, capsys):
    entry, argv, _ = CLIS[cli]
    flag = flag_ranges.flag_name(action)
    context = CONTEXT.get((cli, action.dest), [])
    given = [str(int(value) if action.type is int else value)] * (action.nargs if isinstance(action.nargs, int) else 1)
    with pytest.raises(SystemExit) as exited:
        entry(argv + context + [flag, *given])
    assert exited.value.code == 2  # argparse's parse error, not a failure further on
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert flag in last, last


@pytest.mark.parametrize("cli", CLIS)
def test_the_minimal_command_lines_parse(cli, capsys):
    """The baseline of the cases above passes the range checks (its SystemExit, if any, comes later)."""
    entry, argv, table = CLIS[cli]
    if cli in ("eval.score", "eval.compare"):  # main() goes on to need manifests: only the parse is run
        parser = build(entry, argv)
        flag_ranges.check_ranges(parser, parser.parse_args(argv), table)
    else:
        entry(argv)


@pytest.mark.parametrize("flag, value, message", [
    ("--learning_rate", "-1", "--learning_rate must be > 0, got -1.0"),
    ("--learning_rate", "inf", "--learning_rate must be a finite number > 0, got inf"),
    ("--lr_warmup_steps", "-1", "--lr_warmup_steps must be >= 0, got -1"),
    ("--adam_beta2", "1", "--adam_beta2 must be in [0, 1), got 1.0"),
    ("--adam_epsilon", "0", "--adam_epsilon must be > 0, got 0.0"),
    ("--adam_weight_decay", "-0.01", "--adam_weight_decay must be >= 0, got -0.01"),
    ("--max_grad_norm", "-1", "--max_grad_norm must be >= 0, got -1.0"),
    ("--ema_decay", "1", "--ema_decay must be in (0, 1), got 1.0"),
    ("--noise_offset", "nan", "--noise_offset must be a finite number >= 0, got nan"),
])
def test_the_issues_train_flags(flag, value, message, capsys):
    """The cases of issue 20 item 3, with their exact messages."""
    with pytest.raises(SystemExit):
        train.parse_args(TRAIN_ARGV + [flag, value])
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f"error: {message}")
    assert train.parse_args(TRAIN_ARGV + ["--max_grad_norm", "0"]).max_grad_norm == 0  # 0 still switches clipping off


@pytest.mark.parametrize("value", ["0", "-4", "abc"])
def test_latent_cache_shard_size_is_checked(value):
    with pytest.raises(SystemExit, match=f"--latents_cache_shard_size must be an integer >= 1, got {value}"):
        latent_cache.main(TRAIN_ARGV + ["--latents_cache", "c", "--latents_cache_shard_size", value])
