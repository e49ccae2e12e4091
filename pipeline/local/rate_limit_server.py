"""A rate limit service on loopback that speaks Envoy's RLS protocol (`ShouldRateLimit`), as Beam's
EnvoyRateLimiter calls it: `per_second` hits per one-second window, OVER_LIMIT with the time to the next
window after that. It records every answer, so a test can tell what was allowed and what was refused."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent import futures

import grpc
from apache_beam.io.components import rate_limit_pb2 as rls
from google.protobuf.duration_pb2 import Duration

METHOD = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"


class RateLimitServer:
    def __init__(self, per_second: int, observe: Callable[[], int] = lambda: 0):
        self.per_second = per_second
        self.observe = observe  # read at each grant: e.g. how many calls the limited service has had by then
        self.allowed: list[float] = []  # monotonic time of each hit allowed
        self.observed: list[int] = []  # observe() at each grant
        self.refused = 0
        self.requests: list[rls.RateLimitRequest] = []
        self._lock = threading.Lock()
        self._server = grpc.server(futures.ThreadPoolExecutor(8))
        handler = grpc.unary_unary_rpc_method_handler(
            self._should_rate_limit,
            request_deserializer=rls.RateLimitRequest.FromString,
            response_serializer=rls.RateLimitResponse.SerializeToString,
        )
        service, method = METHOD.rsplit("/", 1)
        self._server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(service[1:], {method: handler})])
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{self.port}"

    def _should_rate_limit(self, request: rls.RateLimitRequest, context) -> rls.RateLimitResponse:
        now = time.monotonic()
        window = int(now)
        with self._lock:
            self.requests.append(request)
            in_window = sum(1 for t in self.allowed if int(t) == window)
            if in_window + request.hits_addend <= self.per_second:
                self.allowed.append(now)
                self.observed.append(self.observe())
                return rls.RateLimitResponse(overall_code=rls.RateLimitResponse.OK)
            self.refused += 1
        reset = Duration()
        reset.FromNanoseconds(int((window + 1 - now) * 1e9) + 1)
        status = rls.RateLimitResponse.DescriptorStatus(
            code=rls.RateLimitResponse.OVER_LIMIT, duration_until_reset=reset
        )
        return rls.RateLimitResponse(overall_code=rls.RateLimitResponse.OVER_LIMIT, statuses=[status])

    def __enter__(self) -> RateLimitServer:
        self._server.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.stop(grace=None)
