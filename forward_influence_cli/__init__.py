"""The ``forward-influence`` command line: the face of the toolkit, above every package it calls.

Commands by group, one module each: `prepare` (essays, trace, verify), `measure` (score, influence, scan),
`compress` (generate, policies), `experiments` (compare, heatmap, demo) and `evaluation` (eval,
calibrate, learn). `options` holds the validated argument types and shared options, `outputs` the checks of
output paths and the writing of tables; `main` assembles the
parser and turns errors into one ``error:`` line: exit code 2 for bad input (checked before any
model loads wherever the check needs no tokenizer), 1 for a failure of the run (``--debug`` shows the
traceback). Results go to stdout (a table) or ``--out FILE`` (format by extension: .csv, .jsonl,
.parquet); progress and messages go to stderr; a command that writes files prints the main file's
path last.
"""
