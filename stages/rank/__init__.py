"""What every rank runs: ``worker`` (the entry point torchrun starts), ``trainer`` (the one
training loop, driving an engine through ``stages.engines.protocol.Engine``), ``elastic``
(sealed checkpoints, restarts, non-finite losses) and ``export`` (the canonical final/)."""
