"""The protected inference gateway (docs/spec/gateway-v1.md; user guide docs/gateway.md).

``modelseal serve`` runs it; :mod:`.service` is everything a prediction goes through, :mod:`.app`
its HTTP front. Nothing here is imported by ``import modelseal``.
"""
