"""actstore.ingest: job specs, model loading, hook points, positions, SAE encoding, the runner.

bitsandbytes (imported by sae_lens and by transformers' quantizers) warns on every
import on a CPU without the optional ``kernels`` package that its 4-bit CPU kernels
are missing, though it falls back to its own; that one logger is quieted to errors
so that every command does not open with the warning. Quantized ingest is unaffected.
"""

import logging

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
