"""Development tools, not the product: the local GetAudio server, the sample store it serves, the demo."""
