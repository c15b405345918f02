"""The command-line programs an installed fcdm provides: `fcdm-train` (fcdm.cli.train), `fcdm-sample`
(fcdm.cli.sample) and `fcdm-eval` (fcdm.cli.eval, i.e. `python -m fcdm.eval`). The root train.py and sample.py run the
same code from a source checkout."""
