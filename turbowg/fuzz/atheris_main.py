"""`python -m turbowg.fuzz.atheris_main TARGET [libFuzzer args...]`: one target under atheris/libFuzzer.

Started by `turbowg fuzz` (turbowg.fuzz.runner) when atheris is installed. Every loaded turbowg module is
instrumented for coverage after the target's imports have run.
"""

from __future__ import annotations

import sys


def main() -> None:
    import atheris

    from turbowg.fuzz import seeds, targets

    name = sys.argv[1]
    target = targets.get(name)
    for seed in seeds.seeds(name):  # imports everything the target reaches, before instrumenting
        try:
            target.fn(seed)
        except Exception:  # noqa: BLE001 - a seed that fails shows up again under libFuzzer
            pass
    atheris.instrument_all()
    atheris.Setup([sys.argv[0]] + sys.argv[2:], target.fn)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
