"""The data plane's clock: what deadlines, idle times and request durations are read from.

`clock()` is `time.monotonic()`: CLOCK_MONOTONIC, the clock the event loop's `time()` reads too
(asyncio's exactly; uvloop's in millisecond ticks cached for a loop turn), so a deadline set from
one compares with a time read from the other, and the sweep (dataplane.py) may use either.

The hot path reads it here rather than through `loop.time()`: a precise reading costs one C call,
where the loop's method costs a lookup and a call, and one reading per request event serves both
its deadline and its latency. A `Final` name, so compiled code holds the function itself instead
of finding it in a module's namespace on every call.
"""

from __future__ import annotations

import time
from typing import Final

clock: Final = time.monotonic
