"""`kvmesh lab`: a whole mesh on one machine, without Docker.

supervisor.py   starts the children (servers and kvmesh processes), notices the first
                that dies, stops them all
view.py         the live view: one row per source, from the typed pair status
lab.py          the Lab, which joins them (the config comes from tools.meshconfig)
"""

from pipeline.tools.lab.lab import Lab, LabError, LabOptions, run_lab, scrape

__all__ = ["Lab", "LabError", "LabOptions", "run_lab", "scrape"]
