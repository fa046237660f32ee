"""atheris fuzz target: the gateway's request parsing and input checks.

Any body, under either content type, must either give a batch the model can run or raise a
GatewayError (which the app answers with a 4xx); any other exception would be a 500, so it is a bug.

    python fuzz/fuzz_gateway_request.py -max_total_time=60 [CORPUS_DIR]
"""

from __future__ import annotations

import contextlib
import sys

import atheris

with atheris.instrument_imports():
    import numpy as np

    from modelseal.gateway.app import parse_inputs
    from modelseal.gateway.errors import GatewayError
    from modelseal.gateway.service import Gateway


class _Runner:
    row_shape = (4,)
    dtype = np.dtype(np.float32)


_gateway = Gateway.__new__(Gateway)  # only check_rows is used: it needs the runner's input shape
_gateway.runner = _Runner()  # type: ignore[assignment]


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    content_type = "application/x-npy" if fdp.ConsumeBool() else "application/json"
    body = fdp.ConsumeBytes(fdp.remaining_bytes())
    with contextlib.suppress(GatewayError):
        x = _gateway.check_rows(parse_inputs(body, content_type))
        assert x.dtype == np.float32 and x.ndim == 2 and x.shape[1] == 4 and len(x) > 0
        assert np.isfinite(x).all()


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
