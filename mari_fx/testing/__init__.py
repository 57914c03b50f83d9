"""Outside the core pipeline: example rankers (:mod:`.examples`), the factories the CLI can load
(:mod:`.factories`), the demo (:mod:`.demo`, ``make demo``) and the coverage table
(:mod:`.coverage`, ``python -m mari_fx.testing.coverage``)."""
