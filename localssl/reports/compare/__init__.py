"""``localssl compare``: rules trained and measured on equal terms, side by side (issue 11).

Every rule trains with the normal trainer into ``OUT/<rule>/`` on the same
encoder, data, budget (steps), batch, optimizer and seed; each is probed
with the same protocols, and so is a random-init encoder of the same shape
(METHODS 2.5: a result means something only against it); training images/s
and peak activation memory per step come from one process with ``localssl
bench``'s tools. The results: ``OUT/compare.csv`` (one row per rule and
random-init), ``OUT/compare.md`` (made from the CSV), ``OUT/compare.png``.

Modules: `runs` (each rule's configs and what its folder already holds),
`measure` (speed and memory), `output` (CSV, Markdown, plot), `run` (the
orchestrator) and `cli`, STYLE principle 13.
"""
from localssl.reports.compare.cli import add_compare_parser, compare_main
from localssl.reports.compare.run import run_compare, validate_compare

__all__ = ["add_compare_parser", "compare_main", "run_compare", "validate_compare"]
