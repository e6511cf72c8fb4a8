"""Interoperability with MOTFM (milad1378yz/MOTFM): importing its checkpoints and configs
(``python -m utils.motfm import``)."""
