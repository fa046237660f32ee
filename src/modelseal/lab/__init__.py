"""The attack lab: small datasets, models and attacks that measure how well modelseal's defences hold.

The lab is an optional extra (``pip install modelseal[lab]``) built on torch, numpy and scikit-learn.
This package imports none of them itself, so ``import modelseal.lab`` stays cheap; import the modules:

- :mod:`modelseal.lab.data` — ``load_dataset``: seeded, stratified train / test / attacker-pool splits.
- :mod:`modelseal.lab.models` — ``build``, ``train``, ``predict``, ``accuracy``, ``agreement``.
- :mod:`modelseal.lab.extraction` — model stealing through queries: ``copycat``, ``knockoff_random``.

Everything is CPU-only and deterministic given its seeds.
"""
