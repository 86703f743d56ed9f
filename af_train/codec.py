"""Moved to :mod:`af_train.tokenizers.encodec`; this name stays for older imports (tools/demo.py)."""

from af_train.tokenizers.encodec import *  # noqa: F401,F403
from af_train.tokenizers.encodec import BANDWIDTH_CODEBOOKS, MODEL_NAME, codebooks_for_bandwidth  # noqa: F401
