"""Test seam: count the checkpoint reads of every process a test starts (growth ranks too).

With ``tests/readcount`` on PYTHONPATH and ``FLM_TEST_READ_LOG=FILE`` set, every
``CheckpointReader.get`` (the one tensor read of growth.checkpoint; ``TensorSource`` and
the distance rule go through it) appends ``PID<TAB>DIRECTORY<TAB>TENSOR`` to FILE, then
reads as usual. Nothing is replaced: the bytes still come from disk.
"""

import os

if os.environ.get("FLM_TEST_READ_LOG"):
    from tests.helpers.readcount.counter import install

    install(os.environ["FLM_TEST_READ_LOG"])
