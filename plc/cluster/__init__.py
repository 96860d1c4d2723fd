"""The high-availability layer: config rendering from ha/ (render.py), the local cluster
launcher (local.py) and its CLI, `plc cluster` (cluster_cmd.py). See docs/ha.md."""
