"""Reaching and owning servers: commands and files over SSH (``shell``), the port forward
(``tunnel``, ``forwards``), the start script and the node-side supervisor (``start_script``,
``supervisor``), process groups (``procs``) and leases for what a dead run left (``leases``)."""
