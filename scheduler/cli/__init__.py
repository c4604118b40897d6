"""`order-timeouts`: schedule, inspect and steer payment timeouts; run workers; demo.

Bad input exits with code 2 and one line on stderr, and changes nothing.

The command modules import SQLAlchemy, the broker clients and the like inside the commands that
use them: `--help`, and any command, loads only what it runs.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import StrEnum
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Annotated, Any

import typer

from scheduler.config import ENV_BROKER_URL, ENV_DATABASE_URL, Settings
from scheduler.errors import ConfigurationError, InvalidInput, InvalidTimeout, OrderTimeoutsError, TimeoutNotFound
from scheduler.logs import configure_logging

if TYPE_CHECKING:
    from scheduler.api import OrderTimeouts

#: entry point group of the CLI's plug-ins: each names a callable that takes the app and adds its
#: commands (and `check` probes) to it; `consumers` plugs in its `worker` and `demo` this way
PLUGIN_GROUP = "order_timeouts.cli"

app = typer.Typer(
    name="order-timeouts",
    help="Cancel unpaid orders on time: schedule, inspect and steer payment timeouts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class LogFormat(StrEnum):
    TEXT = "text"
    JSON = "json"


@dataclass
class Context:
    settings: Settings
    #: the global logging options as given, for the worker processes a command starts
    logging_argv: tuple[str, ...] = ()
    _timeouts: OrderTimeouts | None = None

    def timeouts(self) -> OrderTimeouts:
        if self._timeouts is None:
            from scheduler.api import OrderTimeouts

            self._timeouts = OrderTimeouts(settings=self.settings)
        return self._timeouts


@app.callback()
def _options(
    ctx: typer.Context,
    database_url: Annotated[
        str | None,
        typer.Option(
            "--database-url", envvar=ENV_DATABASE_URL, show_envvar=True, help="Registry database (SQLAlchemy URL)."
        ),
    ] = None,
    broker_url: Annotated[
        str | None,
        typer.Option(
            "--broker-url", envvar=ENV_BROKER_URL, show_envvar=True, help="sql, redis://, amqp://, rq+redis://"
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log each event (one line per order).")] = False,
    log_format: Annotated[LogFormat, typer.Option("--log-format", help="text for people, json for collectors.")] = (
        LogFormat.TEXT
    ),
) -> None:
    configure_logging(verbose=verbose, json_format=log_format is LogFormat.JSON)
    settings = Settings.from_env()
    settings = replace(
        settings,
        database_url=database_url or settings.database_url,
        broker_url=broker_url or settings.broker_url,
    )
    ctx.obj = Context(settings, ("--log-format", log_format.value, *(["--verbose"] if verbose else [])))
    ctx.call_on_close(lambda: ctx.obj._timeouts and ctx.obj._timeouts.close())


def add_command(app: typer.Typer, callback: Callable[..., Any], *, after: str) -> None:
    """Add a plug-in's command to `app`, listed in --help right after the command named `after`."""
    app.command()(callback)
    command = app.registered_commands.pop()
    listed = app.registered_commands
    names = [info.name or typer.main.get_command_name(getattr(info.callback, "__name__", "")) for info in listed]
    listed.insert(names.index(after) + 1 if after in names else len(names), command)


@functools.cache
def load_plugins() -> None:
    """Let the installed plug-ins (entry point group `order_timeouts.cli`) add their commands, once per process."""
    for plugin in entry_points(group=PLUGIN_GROUP):
        plugin.load()(app)


def main() -> None:
    """Console entry point: click's usage errors and our own bad-input errors become one line, exit 2."""
    # Register the commands (their modules attach themselves to `app`), then the plug-ins' among them.
    from scheduler.cli import admin, health, operate  # noqa: F401

    load_plugins()
    command = typer.main.get_command(app)
    try:
        code = command.main(prog_name="order-timeouts", standalone_mode=False)
    except typer.TyperException as exc:  # typer's own click: usage errors, bad parameters
        if type(exc).__name__ == "NoArgsIsHelpError":
            exc.show()  # type: ignore[attr-defined]
            sys.exit(0)
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        _fail(message)
    except (InvalidTimeout, InvalidInput, TimeoutNotFound, ConfigurationError) as exc:
        _fail(str(exc))
    except OrderTimeoutsError as exc:
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(1)
    except typer.Abort:
        sys.stderr.write("aborted\n")
        sys.exit(130)
    except Exception as exc:
        if not _is_database_error(exc):
            raise
        sys.stderr.write(f"error: the registry database: {_database_problem(exc)}\n")
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


def _is_database_error(exc: Exception) -> bool:
    # SQLAlchemy is imported only by commands that open the database, so only they can raise its errors.
    errors = sys.modules.get("sqlalchemy.exc")
    return errors is not None and isinstance(exc, errors.SQLAlchemyError)


def _database_problem(exc: Exception) -> str:
    """One line for an error of the registry database, without its SQL or the URL's password."""
    text = str(getattr(exc, "orig", exc))
    if "no such table" in text or "does not exist" in text:
        return "registry tables missing: run `order-timeouts init-db`"
    return f"unreachable ({type(getattr(exc, 'orig', exc)).__name__})"


def _fail(message: str) -> None:
    sys.stderr.write(f"error: {' '.join(message.split())}\n")
    sys.exit(2)
