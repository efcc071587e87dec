"""What the `climber` commands share: registry choices, `--set` overrides, multi-value flags.

The area commands live beside the code they drive (ranker/training/cli.py, ranker/serving/cli.py,
studies/cli.py, bench/cli.py, streaming/cli.py); sandbox/cli.py gathers them into one app.
Every piece here is light: the registry (and torch with it) is imported only when a command's
family or size is checked or its help is printed, so `climber --help` stays instant.
"""

from __future__ import annotations

import sys
from typing import Any, Optional, Sequence

import typer
import typer.core
from typer import _click as click  # typer's own copy of click since 0.2x
from typer.core import TyperOption


def _registry(what: str) -> tuple[str, ...]:
    if what == "family":
        from ranker.models import FAMILIES

        return tuple(FAMILIES)
    from ranker.models.config import SIZE_NAMES

    return tuple(SIZE_NAMES)


def family(value: str) -> str:
    """A model family from the registry (`--model`, `--family`, `--families`)."""
    return _choose("family", value)


def size(value: str) -> str:
    """A rung of the size ladder (`--size`, `--sizes`)."""
    return _choose("size", value)


def _choose(what: str, value: str) -> str:
    known = _registry(what)
    if value not in known:
        raise ValueError(f"{value!r} is not one of {', '.join(map(repr, known))}")
    return value


def choice_help(what: str, text: str = "") -> str:
    """Help text naming where the choices come from (listing them would import the registry)."""
    where = "ranker.models.FAMILIES" if what == "family" else "the size ladder, ranker.models.config.SIZE_NAMES"
    return f"{text}{'; ' if text else ''}one of {where}"


def parse_override(text: str) -> tuple[str, Any]:
    """`--set KEY=VALUE`, read as `ranker.training.train.parse_override` reads it."""
    from ranker.training.train import parse_override as parse

    return parse(text)


def parse_family_override(text: str) -> tuple[str, str, Any]:
    """`--set FAMILY:KEY=VALUE` of the ladder commands."""
    from studies.scaling import parse_family_override as parse

    return parse(text)


def overrides_option() -> Any:
    """`--set KEY=VALUE` (the parameter is named `overrides`): the one model-config override
    flag of every command that trains one family, so frozen configs can pin a default in any."""
    return typer.Option([], "--set", parser=parse_override, metavar="KEY=VALUE",
                        help="model config override, repeatable (e.g. --set share_block_layers=true)")


class MultiValueCommand(typer.core.TyperCommand):
    """A command whose list flags take several values after one flag, as `--sizes xs s m l`
    (argparse's nargs="+", which the frozen configs use): the words after such a flag, up
    to the next flag, become one repeat of the flag each. The list flags are those that
    are `multiple` and named in `MULTI_VALUE`."""

    ARGV = "climber.argv"  # ctx.meta key: the flags as given (benchmarks save them with the figures)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta[self.ARGV] = list(args)
        greedy = {opt for param in self.params if isinstance(param, TyperOption) and param.multiple
                  and param.name in MULTI_VALUE for opt in param.opts}
        spread: list[str] = []
        flag: Optional[str] = None
        for word in args:
            if word.startswith("-") and not _is_number(word):
                flag = word if word in greedy else None
                spread.append(word)
            elif flag is not None and spread[-1] != flag:  # a further value: repeat the flag
                spread += [flag, word]
            else:
                spread.append(word)
        return super().parse_args(ctx, spread)


MULTI_VALUE = {"families", "sizes", "seeds", "workers", "lengths", "k", "hops", "waits", "base", "other"}


def _is_number(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True


def run_command(app: typer.Typer, argv: Optional[Sequence[str]], prog: str) -> Any:
    """Run a one-command typer app as a module's `main(argv)`: from the shell (argv None) as
    `climber` runs it, exit status included; called with argv, it returns what the command
    returns (tests use it) and exits 2 with the reason on bad flags."""
    command = typer.main.get_command(app)
    if argv is None:
        return command.main(sys.argv[1:], prog_name=prog)  # exits with the command's status
    try:
        return command.main(list(argv), prog_name=prog, standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
