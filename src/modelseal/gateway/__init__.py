"""The protected inference gateway (issue 6; design: docs/spec/gateway-v1.md).

Built so far: traceable answers (:mod:`.trace`) and output policies (:mod:`.policies`), as pure
functions over score arrays. The server, keys, quotas and the extraction monitor are not built yet.
"""
