"""Stress-test campaigns: the grid (``config``), exact-length prompts (``prompts``), the timing
streaming client (``stream``), the metric table and arithmetic (``metrics``), peak memory
(``memory``) and the outputs (``report``)."""
