"""The attack lab: small datasets, models and attacks that measure how well modelseal's defences hold.

The lab is an optional extra (``pip install modelseal[lab]``) built on torch, numpy and scikit-learn.
This package imports none of them itself, so ``import modelseal.lab`` stays cheap; import the modules:

- :mod:`modelseal.lab.data` — ``load_dataset``: seeded, stratified train / test / attacker-pool splits.
- :mod:`modelseal.lab.models` — ``build``, ``train``, ``predict``, ``accuracy``, ``agreement``.
- :mod:`modelseal.lab.extraction` — model stealing through queries: ``copycat``, ``knockoff_random``,
  ``knockoff_adaptive``, ``jacobian_augmentation``.
- :mod:`modelseal.lab.targets` — what the attacks query: a local model, an ONNX or sealed file, or a
  live gateway over HTTP with one or several (sybil) API keys.
- :mod:`modelseal.lab.encoders` — SimCLR encoders, linear probes, encoder extraction (MSE, InfoNCE,
  SoftNN) and a coverage-priced defence for embeddings (seed 003).
- :mod:`modelseal.lab.art_reference` — IBM ART's CopycatCNN and KnockoffNets on the same victims.
- :mod:`modelseal.lab.removal` — the removal-attack benchmark of ownership proofs.
- :mod:`modelseal.lab.stealing` — the stealing lab's report (``modelseal lab report``).

Everything is CPU-only and deterministic given its seeds.
"""
