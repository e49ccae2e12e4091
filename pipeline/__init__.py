"""Soniox clip pipeline: builds speech datasets from the Soniox Storage API's GetAudio call."""

__version__ = "0.2.0"
