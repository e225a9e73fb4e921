"""`sparse_lens.cli_flags`: flags made from a config dataclass, read back into the config."""

import argparse
import dataclasses

import pytest

from sparse_lens.cli_flags import LazyParser, add_config_flags, field_comments, given_fields


@dataclasses.dataclass
class Example:
    """A config with one field of every kind the flags support."""

    steps: int = 10  # optimisation steps
    lr: float = 1e-3
    # the optimiser's betas,
    # two of them
    betas: tuple[float, float] = (0.9, 0.95)
    widths: tuple[int, ...] = (1, 2)
    seq_len: int | None = None
    sources: list[str] | None = None
    mode: str = "fast"
    calibrate: bool = False
    progress: bool = True
    name: str = dataclasses.field(default="x", metadata={"help": "from the metadata"})


def parser_for(**kwargs) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_config_flags(parser, Example, **kwargs)
    return parser


def test_flags_round_trip_into_the_config():
    args = parser_for().parse_args(["--steps", "3", "--lr", "0.5", "--betas", "0.8", "0.99",
                                    "--widths", "4", "5", "6", "--seq-len", "7", "--sources", "a", "b",
                                    "--calibrate", "--no-progress", "--name", "y"])
    config = Example(**given_fields(args, Example))
    assert config == Example(steps=3, lr=0.5, betas=(0.8, 0.99), widths=(4, 5, 6), seq_len=7,
                             sources=["a", "b"], calibrate=True, progress=False, name="y")
    assert isinstance(config.betas, tuple)


def test_flags_not_given_leave_the_defaults_and_a_saved_config_alone():
    args = parser_for().parse_args([])
    assert given_fields(args, Example) == {}
    saved = Example(steps=99, calibrate=True)
    args = parser_for().parse_args(["--lr", "2"])
    assert dataclasses.replace(saved, **given_fields(args, Example)) == Example(steps=99, lr=2.0, calibrate=True)


def test_a_tuple_flag_takes_exactly_its_length_and_choices_are_checked(capsys):
    with pytest.raises(SystemExit):
        parser_for().parse_args(["--betas", "0.9"])
    parser = parser_for(choices={"mode": ("fast", "slow")})
    assert parser.parse_args(["--mode", "slow"]).mode == "slow"
    with pytest.raises(SystemExit):
        parser.parse_args(["--mode", "medium"])
    assert "invalid choice: 'medium'" in capsys.readouterr().err


def test_help_comes_from_the_caller_the_metadata_or_the_source_comment():
    assert field_comments(Example) == {"steps": "optimisation steps", "betas": "the optimiser's betas, two of them"}
    text = parser_for(help={"lr": "base learning rate"}).format_help()
    for expected in ("optimisation steps (default: 10)", "base learning rate (default: 0.001)",
                     "the optimiser's betas, two of them (default: 0.9 0.95)", "from the metadata",
                     "--calibrate, --no-calibrate", "--seq-len SEQ_LEN"):
        assert expected in " ".join(text.split())


def test_a_subset_of_fields_in_order_and_unsupported_types_are_refused():
    parser = argparse.ArgumentParser()
    assert add_config_flags(parser, Example, ["lr", "steps"]) == ["lr", "steps"]
    assert given_fields(parser.parse_args(["--steps", "2"]), Example, ["lr", "steps"]) == {"steps": 2}

    @dataclasses.dataclass
    class Odd:
        either: bool | str = "auto"

    with pytest.raises(TypeError, match="Odd.either"):
        add_config_flags(argparse.ArgumentParser(), Odd)
    add_config_flags(argparse.ArgumentParser(), Odd, exclude=["either"])


def test_a_lazy_parser_adds_its_flags_once_when_used():
    calls = []

    def populate(parser):
        calls.append(1)
        parser.add_argument("--x", type=int)

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", parser_class=LazyParser)
    sub.add_parser("go", populate=populate)
    assert calls == [] and "go" in parser.format_help()
    assert parser.parse_args(["go", "--x", "3"]).x == 3
    assert parser.parse_args(["go"]).x is None and calls == [1]
