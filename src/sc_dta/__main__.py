"""``python -m sc_dta``: the ``sc-dta`` command line."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
