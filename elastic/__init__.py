"""Elastic language model core: structure, submap, schedule.

Importable without TorchServe so that another server can host it (TorchServe 0.12 is in
limited maintenance, see ../shared/notes/torchserve-0.12.md).
"""
