"""The `rankwise` command: compress, recover, truncate, eval, inspect, report, features, bench.

`compress`'s flags are the Recipe's fields; `--recipe r.yaml` loads one and flags override it.
User mistakes print one line `error: ...` and exit 2, with nothing written.
"""

from __future__ import annotations

import typer

from rankwise.cli import bench, compress, evaluate, features, inspection, output, recover, report
from rankwise.core.errors import RankwiseError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)

# one module per command (each holds its typer function and what it runs); nothing imports app
app.command("compress")(compress.compress_command)
app.command("eval")(evaluate.eval_command)
app.command("tasks")(evaluate.tasks_command)
app.command("recover")(recover.recover_command)
app.command("truncate")(recover.truncate_command)
app.command("inspect")(inspection.inspect_command)
app.command("report")(report.report_command)
app.command("features")(features.features_command)
app.command("bench")(bench.bench_command)


def main() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # rankwise draws its own bars
    try:
        app(standalone_mode=False)
    except RankwiseError as err:
        output.stderr().print(f"error: {err}", highlight=False, markup=False, soft_wrap=True)
        raise SystemExit(2) from None
    except (typer.Abort, KeyboardInterrupt):
        output.stderr().print("interrupted: nothing was written")
        raise SystemExit(130) from None
    except Exception as err:  # click usage errors carry their own exit code
        import click

        # typer >= 0.20 vendors click: its usage errors are not click.ClickException subclasses
        if isinstance(err, click.ClickException) or callable(getattr(err, "show", None)):
            err.show()
            raise SystemExit(2) from None
        raise


if __name__ == "__main__":
    main()
