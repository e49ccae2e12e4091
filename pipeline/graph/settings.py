"""What the Beam steps need from the options: picklable, resolved once at launch, holding no secret."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.dataset.clips import KEEP
from pipeline.dataset.layout import FILES
from pipeline.dataset.storage import StoreSettings
from pipeline.dataset.transcripts import MOSTLY_INSIDE
from pipeline.service.api_key import read_api_key
from pipeline.service.client import GetAudioClient, RetryPolicy


@dataclass(frozen=True)
class ClientSettings:
    """The GetAudio client's own settings: what decides whether two steps can share one client."""

    api_host: str | None
    api_key_file: str | None
    max_attempts: int
    rpc_timeout_s: float

    def client(self, max_attempts: int | None = None) -> GetAudioClient:
        """A client built from these settings, with the key read as the workers read it."""
        return GetAudioClient(
            self.api_host,
            api_key=read_api_key(self.api_key_file),
            retry=RetryPolicy(max_attempts=max_attempts or self.max_attempts),
            rpc_timeout_s=self.rpc_timeout_s,
        )


RATE_LIMIT_DESCRIPTORS = ({"method": "GetAudio"},)  # what each call asks the rate limit service for


@dataclass(frozen=True)
class FetchSettings:
    """The fetch step's settings."""

    output: str
    client: ClientSettings
    audio_format: str
    max_in_flight: int
    with_transcripts: bool = False
    clip_format: str = "wav"
    channels: str = KEEP
    layout: str = FILES  # resolved: --shards N alone is webdataset (layout.resolve_layout)
    shards: int = 0
    rate_limit_service: str | None = None  # host:port of an Envoy rate limit service
    rate_limit_domain: str = "soniox-clips"
    edge_words: str = MOSTLY_INSIDE
    total_rows: int = 0
    store: StoreSettings = field(default_factory=StoreSettings)

    def rate_limiter(self):
        """Beam's EnvoyRateLimiter for --rate_limit_service (None without one): it blocks each GetAudio attempt,
        retries included, until the service allows it, so the limit holds across every worker of the job."""
        if not self.rate_limit_service:
            return None
        from apache_beam.io.components.rate_limiter import EnvoyRateLimiter

        descriptors = [dict(d) for d in RATE_LIMIT_DESCRIPTORS]
        return EnvoyRateLimiter(self.rate_limit_service, self.rate_limit_domain, descriptors, namespace="clips")
