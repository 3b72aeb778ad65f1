"""The Typer app and its one error mapping: every `CvaeError` becomes one line and exit status 1,
an interruption 130 or 143, anything else (a bug, a driver failure) one line and 2."""
from __future__ import annotations

import os
from typing import Annotated

import typer
from typer.core import TyperCommand, TyperGroup

from .. import interrupt
from ..errors import CvaeError, describe
from .output import Output, rank_prefix


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as installed

    try:
        return installed("cvae-cli")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def _no_flag_metavars(params: list) -> list:
    """Flags take no value: show none (recent Typer prints `<bool>` beside every flag)."""
    for p in params:
        if getattr(p, "is_flag", False) and p.metavar is None:
            p.metavar = ""
    return params


class CvaeCommand(TyperCommand):
    def get_params(self, ctx):
        return _no_flag_metavars(super().get_params(ctx))


class CvaeGroup(TyperGroup):
    """Runs a command with Ctrl-C and SIGTERM stopping it at a safe point, and turns what escapes
    into one line on stderr: a `CvaeError` into exit status 1, an interruption into 130 (SIGINT) or
    143 (SIGTERM), anything else (a bug, a driver failure) into 2, with the traceback under
    CVAE_DEBUG=1."""

    def get_params(self, ctx):
        return _no_flag_metavars(super().get_params(ctx))

    def invoke(self, ctx: typer.Context):
        out = Output(prefix=rank_prefix())
        try:
            with interrupt.signals_stop_at_safe_points():
                return super().invoke(ctx)
        except CvaeError as e:
            out.error(str(e))
            raise typer.Exit(1) from None
        except interrupt.Interrupted as e:
            out.error(f"{e.reason}: {e.outcome}")
            raise typer.Exit(e.status) from None
        except KeyboardInterrupt:
            out.error("interrupted: no partial output was kept")
            raise typer.Exit(130) from None
        except Exception as e:  # a bug or an environment failure: still one line, unless debugging
            if os.environ.get("CVAE_DEBUG") or type(e).__module__.split(".")[0] in ("click", "typer"):
                raise  # usage errors and exits: Typer prints those itself
            from ..budget import is_out_of_memory

            hint = " (out of memory: try a smaller --tile or --chunk, a smaller --memory-budget, or another " \
                   "device)" if is_out_of_memory(e) else ""
            out.error(f"{describe(e)}{hint} [set CVAE_DEBUG=1 for the traceback]")
            raise typer.Exit(2) from None



app = typer.Typer(cls=CvaeGroup, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  rich_markup_mode="markdown",
                  help="Causal video VAE tokenizer: videos and images to latents and back "
                       "(Open-Sora-Plan's CausalVAE, 4x8x8 compression, 4 latent channels).")


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"cvae {version()}")
        raise typer.Exit()


@app.callback()
def main(_: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                         help="Print the version and exit.")] = False) -> None:
    pass


def command(fn):
    return app.command(cls=CvaeCommand)(fn)
