"""The language-model view every part shares.

Architecture adapter and hook names (``arch``), tokenisation (``tokens``), model loading (``models``),
the download cache (``cache``), the key-statistics corpus (``corpus``), the ``EditCase`` type (``case``),
repository paths (``paths``) and small file helpers (``io``). ``editors/`` and ``circuits/`` import from
here and never from ``bench/``; this package imports none of the three.
"""
