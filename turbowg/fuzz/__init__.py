"""Fuzz targets for every parser that sees hostile bytes, and the runner behind `turbowg fuzz`.

- `turbowg.fuzz.targets`: one function per target taking `bytes`, registered by name in `TARGETS`. A target
  returns normally for any input a correct parser survives; anything else it raises (an undocumented
  exception from the parser, a `PropertyFailure` when a property is broken) is a finding.
- `turbowg.fuzz.seeds`: valid seed inputs per target, made with the project's own encoders (the corpus in
  tests/fuzz_corpus/ is written from them by `turbowg fuzz --make-corpus DIR`).
- `turbowg.fuzz.runner`: atheris (coverage-guided, when installed) or a seeded random-mutation loop over the
  corpus, time- or count-bounded; the `turbowg fuzz` subcommand.
"""
