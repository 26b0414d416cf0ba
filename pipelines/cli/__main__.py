"""``python -m pipelines.cli``: the `mdlda` command line."""

from pipelines.cli import app

app(prog_name="mdlda")  # the usage line names the console script, as `mdlda --help` does
