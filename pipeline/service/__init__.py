"""The GetAudio service's client: the generated stubs (wire/), the API key's reader, the throttle, and the client
with its retries and resume. No Beam graph (the key's reader only uses Beam's filesystems); imports only
pipeline.core."""
